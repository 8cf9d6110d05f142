"""The CUDA path on a machine with an NVIDIA GPU: training and inference on CUDA match the CPU path,
and NVML telemetry reports the GPU. Every test here skips cleanly without CUDA.

Run on a GPU machine with ``pytest tests/agent/test_gpu.py -m gpu``. ONNX Runtime's CUDA provider
needs ``onnxruntime-gpu`` (the ``cuda`` extra); with the CPU build those checks skip and say so.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU here)")]

ROOT = Path(__file__).resolve().parents[2]


def _cuda_ort() -> bool:
    from hyprstream.agent.inference import cuda_available

    return cuda_available()


@pytest.mark.parametrize("name", ["digits", "digits-cnn", "sensor-synthetic"])
def test_training_on_cuda_matches_the_cpu(name):
    from hyprstream.learning.task import Dataset, get_task
    from hyprstream.learning.trainer import model_weights, train_layers

    torch.backends.cudnn.allow_tf32 = False  # the comparison is of the arithmetic, not of TF32 rounding
    torch.backends.cuda.matmul.allow_tf32 = False
    if name == "sensor-synthetic":
        task = get_task("sensor")
        rng = np.random.default_rng(0)
        data = Dataset(np.abs(rng.normal(0, 2, (600, 4))).astype(np.float32), (rng.random(600) < 0.05).astype(np.int64))
    else:
        task = get_task(name)
        data, _ = task.load_reference_data(0)
    start = model_weights(task.build_model(seed=3))
    deltas = {}
    for device in ("cpu", "cuda"):
        model = task.build_model(seed=3)
        from hyprstream.learning.trainer import load_weights

        load_weights(model, start)
        layers = task.layer_groups(model)[-2:]
        result = train_layers(task, model, layers, data, steps=20, batch_size=32, lr=1e-3, seed=7, device=device)
        assert next(model.parameters()).device.type == device
        deltas[device] = result.delta
    assert set(deltas["cpu"]) == set(deltas["cuda"])
    for key in deltas["cpu"]:
        np.testing.assert_allclose(deltas["cuda"][key], deltas["cpu"][key], rtol=1e-3, atol=2e-5, err_msg=key)


def test_the_policy_sends_full_training_to_the_gpu():
    from hyprstream.agent.policy import plan_training
    from hyprstream.agent.profile import Strategy, load_profile
    from hyprstream.learning.task import get_task
    from hyprstream.learning.trainer import train_layers

    caps = load_profile(ROOT / "firmware-configs" / "jetson-orin-nano.toml").training
    plan = plan_training(Strategy.FULL, caps, layers=("fc2", "head"), local_steps=10, batch_size=32, gpu_usable=True)
    assert plan.device == "cuda"
    task = get_task("digits")
    train, _ = task.load_reference_data(0)
    model = task.build_model(seed=0)
    result = train_layers(task, model, plan.layers, train, steps=plan.local_steps, batch_size=plan.batch_size,
                          lr=1e-3, seed=0, device=plan.device, max_seconds=plan.max_seconds)
    assert result.steps == 10 and next(model.parameters()).is_cuda
    hybrid = plan_training(Strategy.HYBRID, caps, layers=("fc2", "head"), local_steps=10, batch_size=32,
                           gpu_usable=True)
    assert hybrid.device == "cpu"


@pytest.mark.parametrize("name", ["digits", "digits-cnn"])
def test_torch_inference_on_cuda_matches_the_cpu(name):
    from hyprstream.agent.inference import TorchPredictor
    from hyprstream.learning.task import get_task

    torch.backends.cudnn.allow_tf32 = False
    task = get_task(name)
    _, test = task.load_reference_data(0)
    model = task.build_model(seed=0)
    cpu = TorchPredictor(task, model=model, device="cpu")(test.x)
    cuda = TorchPredictor(task, model=task.build_model(seed=0), device="cuda")
    assert cuda.provider.value == "cuda"
    np.testing.assert_allclose(cuda(test.x), cpu, rtol=1e-4, atol=1e-5)


def test_onnx_runtime_on_cuda_matches_the_cpu(tmp_path):
    if not _cuda_ort():
        pytest.skip("ONNX Runtime here has no CUDA execution provider (install onnxruntime-gpu: the 'cuda' extra)")
    from hyprstream.agent.export import export_version
    from hyprstream.agent.inference import InferenceEngine, OrtPredictor
    from hyprstream.agent.policy import InferencePlan
    from hyprstream.agent.profile import ExecutionProvider, ModelVariant, load_profile
    from hyprstream.learning.task import get_task
    from hyprstream.learning.trainer import model_weights

    task = get_task("digits-cnn")
    train, test = task.load_reference_data(0)
    files = export_version("digits-cnn", 1, model_weights(task.build_model(seed=0)), tmp_path, calibration=train.x[:256])
    cpu = OrtPredictor(files.fp32, ExecutionProvider.CPU, ModelVariant.FP32)(test.x)
    gpu = OrtPredictor(files.fp32, ExecutionProvider.CUDA, ModelVariant.FP32)
    assert gpu.provider is ExecutionProvider.CUDA
    np.testing.assert_allclose(gpu(test.x), cpu, rtol=1e-3, atol=1e-4)
    engine = InferenceEngine(task, load_profile(ROOT / "firmware-configs" / "jetson-orin-nano.toml").inference)
    engine.apply(InferencePlan(ExecutionProvider.CUDA, ModelVariant.FP32))
    engine.load(files)
    assert engine.stats().provider is ExecutionProvider.CUDA
    np.testing.assert_allclose(engine.predict(test.x[:64]), cpu[:64], rtol=1e-3, atol=1e-4)
    engine.close()


def test_nvml_telemetry_reports_the_gpu(tmp_path):
    pytest.importorskip("pynvml")
    from hyprstream.agent.monitor import NvmlGpu, ResourceMonitor
    from hyprstream.telemetry.records import from_wire, to_wire

    gpu = NvmlGpu()
    if not gpu.available:
        pytest.skip("CUDA works but NVML sees no GPU (e.g. a Jetson, whose GPU NVML does not serve)")
    sample = ResourceMonitor(tmp_path, gpu=gpu).sample()
    g = sample.gpu
    assert g is not None and g.name and 0 <= g.util_percent <= 100
    total_mb = torch.cuda.get_device_properties(0).total_memory / 2**20
    assert abs(g.memory_total_mb - total_mb) / total_mb < 0.1
    assert 0 < g.memory_used_mb <= g.memory_total_mb
    # hold some GPU memory: NVML sees it
    block = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    assert gpu.read().memory_used_mb >= g.memory_used_mb + 400
    del block
    from agent_helpers import telemetry

    record = dataclasses.replace(telemetry(1), resources=sample)
    assert from_wire(to_wire(record)).resources.gpu == g
    gpu.close()
