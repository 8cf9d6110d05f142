"""The agent's inference in ``minimal`` goes to the fog's offload endpoint (real core Flight server and
fog endpoint on loopback); the ingest pipeline stores the fog's predictions with the fog's model version,
and falls back to the local model when the fog cannot answer."""

from __future__ import annotations

import numpy as np
import pytest

from hyprstream.agent.handoff import save_model
from hyprstream.agent.inference import InferenceEngine, TorchPredictor
from hyprstream.agent.offload import OffloadClient
from hyprstream.agent.pipeline import PREDICTIONS_TABLE, Pipeline, create_tables
from hyprstream.agent.policy import Strategy, plan_inference
from hyprstream.agent.profile import InferenceSettings, StoreRetention
from hyprstream.coreapi.client import CoreClient
from hyprstream.errors import HyprstreamError
from hyprstream.fog.offload import ModelSource, OffloadServer
from hyprstream.store import Store, to_arrays

pytestmark = pytest.mark.integration

TOKEN = "agent-token-9c41"
SETTINGS = InferenceSettings(max_batch_size=16, max_batch_wait_ms=2.0)


def test_minimal_strategy_offloads_and_falls_back(site, tmp_path):
    from hyprstream.agent.export import ModelFiles

    task = site.task
    _, test = task.load_reference_data(seed=0)
    x = test.x[:12]
    with CoreClient(site.location, "fog") as core:
        weights = to_arrays(core.get_weights("m").table, copy=True)
        server = OffloadServer(ModelSource(core, "m", task, refresh_s=0.0), (TOKEN,)).start()
        engine = InferenceEngine(task, SETTINGS, cuda_allowed=False, offload=OffloadClient(server.url, TOKEN))
        try:
            # not minimal: no offload, and without a local model nothing can answer
            engine.apply(plan_inference(Strategy.FULL, SETTINGS, cuda_usable=False, offload=True))
            assert not engine.ready
            engine.apply(plan_inference(Strategy.MINIMAL, SETTINGS, cuda_usable=False, offload=True))
            assert engine.ready
            with Store.open(tmp_path / "store", create=True) as store:
                create_tables(store, task, StoreRetention(max_mb=16, encrypt_at_rest=False))
                records = [{"features": [float(v) for v in row]} for row in x]
                result = Pipeline(task, store, engine).ingest("test", records)
                rows = task.features(task.records_to_table(records))  # what the device sends
                expected, _ = task.interpret(TorchPredictor(task, weights)(rows))
                assert result.model_version == 0
                np.testing.assert_array_equal(result.predictions, expected)
                stored = store.read(PREDICTIONS_TABLE)
                assert stored.num_rows == 12 and set(stored.column("model_version").to_pylist()) == {0}
            assert engine.stats().offloaded == 12

            server.stop()  # the fog goes away: without a local model the request fails clearly
            with pytest.raises(HyprstreamError, match="offload failed and no local model"):
                engine.classify(x)
            saved = save_model(tmp_path / "models", task.name, 5, weights)
            engine.load(ModelFiles(task.name, 5, tmp_path / "missing.onnx", None, "none", saved))  # torch serves
            version, pred, _ = engine.classify(rows)
            assert version == 5
            np.testing.assert_array_equal(pred, expected)
            assert engine.stats().offload_errors == 2
        finally:
            server.stop()
            engine.close()
