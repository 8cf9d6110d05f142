"""Data at rest on a device: with the store encrypted, no file the agent writes under its state directory
holds device samples or model weights in the clear, and the encrypted models still load and infer."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_daemon import TRACES, HoldLast, config

from hyprstream.agent.daemon import Agent
from hyprstream.agent.monitor import load_trace
from hyprstream.agent.policy import InferencePlan
from hyprstream.agent.profile import ExecutionProvider, InferenceSettings, ModelVariant
from hyprstream.agent.publisher import MemoryPublisher
from hyprstream.errors import HyprstreamError

CPU, FP32, INT8 = ExecutionProvider.CPU, ModelVariant.FP32, ModelVariant.INT8


def files_holding(root: Path, needles: list[bytes]) -> list[str]:
    """``file: needle index`` for every file under ``root`` that contains one of ``needles``."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found += [f"{path.relative_to(root)}: {i}" for i, n in enumerate(needles) if n in data]
    return found


def weight_needles(weights: dict[str, np.ndarray]) -> list[bytes]:
    """64 raw float32 bytes from the middle of every tensor big enough to hold them."""
    out = []
    for array in weights.values():
        raw = np.ascontiguousarray(array, dtype=np.float32).tobytes()
        if len(raw) >= 64:
            mid = (len(raw) // 2) & ~3
            out.append(raw[mid - 32: mid + 32])
    return out


@pytest.fixture(scope="module")
def trained():
    """digits-cnn (convolutions: its int8 variant is calibrated statically on device samples), trained briefly."""
    import torch

    from hyprstream.learning.task import get_task
    from hyprstream.learning.trainer import model_weights, train_layers

    torch.set_num_threads(1)
    task = get_task("digits-cnn")
    train, test = task.load_reference_data(0)
    model = task.build_model(seed=0)
    train_layers(task, model, task.layer_groups(model), train, steps=150, batch_size=32, lr=1e-2, seed=0)
    return task, model, model_weights(model), train, test


@pytest.mark.integration
@pytest.mark.slow
def test_daemon_export_keeps_samples_and_weights_off_the_disk_in_the_clear(tmp_path, trained):
    from hyprstream.agent.export import read_manifest
    from hyprstream.agent.handoff import save_model
    from hyprstream.agent.inference import InferenceEngine, TorchPredictor
    from hyprstream.agent.pipeline import create_tables
    from hyprstream.store import Store

    task, model, weights, train, test = trained
    cfg = config(tmp_path, task="digits-cnn")
    samples = train.x[:300]
    with Store.open(cfg.store_dir, create=True, key=cfg.store_key) as store:
        create_tables(store, task, cfg.profile.store)
        store.append(task.table, task.to_table(type(train)(samples, train.y[:300])))
    save_model(cfg.state_dir, task.name, 5, weights, key=cfg.store_key)
    agent = Agent(cfg, monitor=HoldLast(load_trace(TRACES / "cpu_saturated.csv")),
                  publisher=MemoryPublisher("plant-7", "pi-03", "s"))
    stop = threading.Event()
    runner = threading.Thread(target=agent.run, args=(stop,))
    runner.start()
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and getattr(getattr(agent, "engine", None), "version", None) != 5:
            time.sleep(0.2)
        assert agent.engine.version == 5
    finally:
        stop.set()
        runner.join(60)
    assert not runner.is_alive()
    out = cfg.state_dir / "onnx" / task.name / "v5"
    files = read_manifest(out)
    assert files.quantization == "static-qdq"  # the int8 export did read device samples
    # the calibration rows (the store's last 256) and the weights appear in no file of the state directory
    rows = [np.ascontiguousarray(r, dtype=np.float32).tobytes() for r in samples[-256:]]
    assert files_holding(cfg.state_dir, rows + weight_needles(weights)) == []
    # ... and the encrypted files serve: fp32 as torch computes, int8 with the same classes
    engine = InferenceEngine(task, InferenceSettings(), cuda_allowed=False, key=cfg.store_key)
    engine.load(files)
    ref = TorchPredictor(task, model=model)(test.x)
    np.testing.assert_allclose(engine.predict(test.x), ref, rtol=1e-4, atol=1e-4)
    engine.apply(InferencePlan(CPU, INT8))
    assert engine.stats().variant is INT8 and engine.stats().backend == "onnxruntime"
    assert np.mean(engine.predict(test.x).argmax(1) == ref.argmax(1)) >= 0.95
    engine.close()


@pytest.mark.integration
@pytest.mark.slow
def test_calibration_is_read_only_by_a_static_export_and_tampered_models_are_refused(tmp_path, trained):
    from hyprstream.agent.export import export_in_subprocess
    from hyprstream.agent.handoff import load_model, save_model
    from hyprstream.agent.inference import InferenceEngine, TorchPredictor
    from hyprstream.learning.task import get_task
    from hyprstream.learning.trainer import model_weights

    task, model, weights, train, test = trained
    key = os.urandom(32)
    asked = []

    def calibration():
        asked.append(1)
        return train.x[:64]

    mlp = save_model(tmp_path / "state", "digits", 1, model_weights(get_task("digits").build_model(seed=0)), key=key)
    dynamic = export_in_subprocess("digits", 1, mlp, tmp_path / "state" / "onnx" / "digits" / "v1",
                                   calibration=calibration, key=key)
    assert dynamic.quantization == "dynamic" and asked == []  # the MLP export never asked for device samples
    cnn = save_model(tmp_path / "state", task.name, 2, weights, key=key)
    files = export_in_subprocess(task.name, 2, cnn, tmp_path / "state" / "onnx" / task.name / "v2",
                                 calibration=calibration, key=key)
    assert files.quantization == "static-qdq" and asked == [1]
    assert files_holding(tmp_path / "state", [r.tobytes() for r in train.x[:64]] + weight_needles(weights)) == []

    engine = InferenceEngine(task, InferenceSettings(), cuda_allowed=False, key=key)
    engine.load(files)
    ref = TorchPredictor(task, model=model)(test.x[:50])
    np.testing.assert_allclose(engine.predict(test.x[:50]), ref, rtol=1e-4, atol=1e-4)
    # a flipped byte, or a plaintext model put in place of the sealed one: refused, the served model stays
    good = files.fp32.read_bytes()
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x01
    for bad, reason in ((bytes(flipped), "cannot decrypt"), (b"\x08\x07" + good[40:], "not encrypted")):
        files.fp32.write_bytes(bad)
        with pytest.raises(HyprstreamError, match=f"refusing model file .*model.fp32.onnx: .*{reason}"):
            engine.load(files)
        assert engine.version == 2
        np.testing.assert_allclose(engine.predict(test.x[:50]), ref, rtol=1e-4, atol=1e-4)
    # the same bytes under another version's name do not decrypt either (files are bound to their place)
    files.fp32.write_bytes(good)
    moved = files.fp32.parent.parent / "v3" / files.fp32.name
    moved.parent.mkdir()
    moved.write_bytes(good)
    with pytest.raises(HyprstreamError, match="cannot decrypt"):
        engine.load(type(files)(task.name, 3, moved, None, "none", cnn))
    # the saved weights are sealed too: without the key they are refused, with it they load
    with pytest.raises(HyprstreamError, match="encrypted; the store key is needed"):
        load_model(cnn)
    assert all(np.array_equal(load_model(cnn, key)[k], v) for k, v in weights.items())
    engine.close()


@pytest.mark.integration
def test_models_sealed_under_another_key_are_refused_and_removed_for_the_next_round(tmp_path, caplog):
    """After a store key rotation the saved models no longer decrypt: the daemon refuses them, serves
    nothing from them, and removes them so that the next train request saves the version again."""
    from hyprstream.agent.handoff import save_model
    from hyprstream.learning.task import get_task
    from hyprstream.learning.trainer import model_weights

    cfg = config(tmp_path, task="digits")
    retired = os.urandom(32)
    weights = model_weights(get_task("digits").build_model(seed=0))
    old = [save_model(cfg.state_dir, "digits", v, weights, key=retired) for v in (3, 4)]
    (cfg.state_dir / "onnx" / "digits" / "v4").mkdir(parents=True)
    agent = Agent(cfg, monitor=HoldLast(load_trace(TRACES / "cpu_saturated.csv")),
                  publisher=MemoryPublisher("plant-7", "pi-03", "s"))
    stop = threading.Event()
    runner = threading.Thread(target=agent.run, args=(stop,))
    with caplog.at_level("ERROR", logger="hyprstream.agent"):
        runner.start()
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and any(p.exists() for p in old):
                time.sleep(0.1)
        finally:
            stop.set()
            runner.join(60)
    assert not runner.is_alive()
    assert not any(p.exists() for p in old) and not (cfg.state_dir / "onnx" / "digits" / "v4").exists()
    assert agent.engine.version is None
    refused = [r.getMessage() for r in caplog.records if "refused and removed" in r.getMessage()]
    assert len(refused) == 2 and all("cannot decrypt" in m for m in refused)
    # the next train request saves the version again, under the current key
    assert save_model(cfg.state_dir, "digits", 4, weights, key=cfg.store_key) is not None
