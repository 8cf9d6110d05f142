"""Inference: dynamic batching, ONNX export vs torch, int8 variants, provider choice, torch fallback."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from hyprstream.agent.batching import DynamicBatcher
from hyprstream.agent.policy import InferencePlan
from hyprstream.agent.profile import ExecutionProvider, InferenceSettings, ModelVariant
from hyprstream.errors import HyprstreamError, ValidationError

CPU, CUDA = ExecutionProvider.CPU, ExecutionProvider.CUDA
FP32, INT8 = ModelVariant.FP32, ModelVariant.INT8


# ---------------------------------------------------------------------------------------------- batching


@pytest.mark.unit
def test_concurrent_requests_share_batches_and_get_their_own_rows():
    sizes = []
    gate = threading.Event()

    def run(x):
        gate.wait(5)  # hold the first batch so that the others queue up behind it
        sizes.append(len(x))
        return x * 10

    batcher = DynamicBatcher(run, max_batch=8, max_wait_s=0.05)
    first = batcher.submit(np.array([[0.0]]))
    futures = [batcher.submit(np.array([[i], [i + 0.5]], dtype=float)) for i in range(1, 9)]
    gate.set()
    np.testing.assert_array_equal(first.result(5), [[0.0]])
    for i, f in enumerate(futures, start=1):
        np.testing.assert_array_equal(f.result(5), [[10 * i], [10 * i + 5]])
    assert sizes[0] <= 8 and all(s <= 8 for s in sizes)
    assert sum(sizes) == 17 and len(sizes) < 9  # fewer model calls than requests
    stats = batcher.stats()
    assert (stats.requests, stats.rows, stats.batches, stats.errors) == (9, 17, len(sizes), 0)
    batcher.close()


@pytest.mark.unit
def test_oversized_request_runs_alone_and_errors_reach_every_caller():
    seen = []

    def run(x):
        seen.append(len(x))
        if (x < 0).any():
            raise RuntimeError("negative input")
        return x

    batcher = DynamicBatcher(run, max_batch=4, max_wait_s=0.0)
    np.testing.assert_array_equal(batcher(np.arange(10).reshape(10, 1)), np.arange(10).reshape(10, 1))
    assert seen == [10]
    with pytest.raises(RuntimeError, match="negative"):
        batcher(np.array([[-1]]))
    assert batcher.stats().errors == 1
    np.testing.assert_array_equal(batcher(np.array([[3]])), [[3]])  # still serving
    with pytest.raises(ValidationError):
        batcher.submit(np.empty((0, 1)))
    batcher.close()
    with pytest.raises(HyprstreamError, match="closed"):
        batcher.submit(np.array([[1]]))


@pytest.mark.unit
def test_no_worker_thread_until_the_first_request():
    before = {t.name for t in threading.enumerate()}
    batcher = DynamicBatcher(lambda x: x, max_batch=2, max_wait_s=0.01, name="idle-check")
    assert "idle-check" not in {t.name for t in threading.enumerate()} - before
    batcher(np.ones((1, 1)))
    assert "idle-check" in {t.name for t in threading.enumerate()}
    batcher.close()


# ---------------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """digits (MLP) and digits-cnn, trained briefly and exported with int8 variants."""
    import torch

    from hyprstream.agent.export import export_version
    from hyprstream.learning.task import get_task
    from hyprstream.learning.trainer import model_weights, train_layers

    torch.set_num_threads(1)
    out = {}
    for name in ("digits", "digits-cnn"):
        task = get_task(name)
        train, test = task.load_reference_data(0)
        model = task.build_model(seed=0)
        train_layers(task, model, task.layer_groups(model), train, steps=200, batch_size=32, lr=1e-2, seed=0)
        d = tmp_path_factory.mktemp(name)
        weights = model_weights(model)
        from hyprstream.agent.handoff import save_model

        saved = save_model(d, task.name, 1, weights)
        files = export_version(name, 1, weights, d / "onnx", calibration=train.x[:256], weights_file=saved)
        out[name] = (task, model, test, files)
    return out


def onnx_ops(path: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("name, method, int8_ops", [
    ("digits", "dynamic", {"DynamicQuantizeLinear", "MatMulInteger"}),
    ("digits-cnn", "static-qdq", {"QuantizeLinear", "DequantizeLinear"}),
])
def test_onnx_matches_torch_and_int8_keeps_the_classes(exported, name, method, int8_ops):
    from hyprstream.agent.inference import OrtPredictor, TorchPredictor

    task, model, test, files = exported[name]
    assert files.quantization == method and int8_ops <= onnx_ops(files.int8)
    assert "Conv" in onnx_ops(files.fp32) if name == "digits-cnn" else "Conv" not in onnx_ops(files.fp32)
    ref = TorchPredictor(task, model=model)(test.x)
    fp32 = OrtPredictor(files.fp32, CPU, FP32)(test.x)
    np.testing.assert_allclose(fp32, ref, rtol=1e-4, atol=1e-4)
    int8 = OrtPredictor(files.int8, CPU, INT8)(test.x)
    agree = np.mean(int8.argmax(1) == ref.argmax(1))
    acc_ref, acc_int8 = np.mean(ref.argmax(1) == test.y), np.mean(int8.argmax(1) == test.y)
    assert agree >= 0.97 and acc_int8 >= acc_ref - 0.02 and acc_ref > 0.9


@pytest.mark.integration
@pytest.mark.slow
def test_engine_follows_the_plan_and_falls_back_to_torch(exported, tmp_path, caplog):
    from hyprstream.agent.export import ModelFiles
    from hyprstream.agent.inference import InferenceEngine, TorchPredictor

    task, model, test, files = exported["digits"]
    settings = InferenceSettings(max_batch_size=16, max_batch_wait_ms=2.0)
    engine = InferenceEngine(task, settings, cuda_allowed=False)
    assert not engine.ready and engine.version is None
    with pytest.raises(HyprstreamError, match="no inference model"):
        engine.predict(test.x[:2])
    engine.load(files)
    ref = TorchPredictor(task, model=model)(test.x[:40])
    np.testing.assert_allclose(engine.predict(test.x[:40]), ref, rtol=1e-4, atol=1e-4)
    st = engine.stats()
    assert (st.version, st.backend, st.provider, st.variant) == (1, "onnxruntime", CPU, FP32)
    engine.apply(InferencePlan(CPU, INT8))
    assert engine.stats().variant is INT8
    assert np.mean(engine.predict(test.x[:40]).argmax(1) == ref.argmax(1)) >= 0.95
    engine.apply(InferencePlan(CUDA, FP32))  # CUDA not allowed here: the CPU serves
    assert engine.stats().provider is CPU
    # an unreadable ONNX file: torch serves from the saved weights
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    engine.load(ModelFiles("digits", 2, broken, None, "none", files.weights))
    st = engine.stats()
    assert (st.version, st.backend) == (2, "torch")
    np.testing.assert_allclose(engine.predict(test.x[:40]), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(HyprstreamError, match="no weights to fall back on"):
        engine.load(ModelFiles("digits", 3, broken, None, "none", None))
    with pytest.raises(HyprstreamError, match="task"):
        engine.load(ModelFiles("sensor", 4, files.fp32, None, "none", None))
    engine.close()


@pytest.mark.integration
@pytest.mark.slow
def test_without_onnxruntime_torch_serves(exported, monkeypatch):
    import hyprstream.agent.inference as inference
    from hyprstream.errors import MissingExtraError

    def missing(module, *, extra, feature):
        raise MissingExtraError(module, extra, feature)

    monkeypatch.setattr(inference, "require", missing)
    task, model, test, files = exported["digits-cnn"]
    engine = inference.InferenceEngine(task, InferenceSettings(), cuda_allowed=True)
    engine.load(files)
    assert engine.stats().backend == "torch" and not inference.cuda_available()
    assert np.mean(engine.predict(test.x).argmax(1) == test.y) > 0.9
    engine.close()


@pytest.mark.integration
@pytest.mark.slow
def test_export_in_a_child_process(exported, tmp_path):
    from hyprstream.agent.export import export_in_subprocess
    from hyprstream.agent.inference import OrtPredictor

    task, model, test, files = exported["digits"]
    got = export_in_subprocess("digits", 1, files.weights, tmp_path / "out", threads=1, nice=5)
    assert got.version == 1 and got.quantization == "dynamic" and got.int8.exists()
    np.testing.assert_allclose(OrtPredictor(got.fp32, CPU, FP32)(test.x), OrtPredictor(files.fp32, CPU, FP32)(test.x),
                               rtol=1e-6, atol=1e-6)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(HyprstreamError, match="cancelled"):
        export_in_subprocess("digits", 1, files.weights, tmp_path / "again", cancel=cancel)
    with pytest.raises(HyprstreamError, match="failed"):
        export_in_subprocess("digits", 1, tmp_path / "missing.arrow", tmp_path / "none")
