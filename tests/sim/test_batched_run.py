"""One experiment through both engines: the batched engine gives the global versions the Flower engine gives.

The experiment combines what the batched engine must keep: two fogs of three agents on a mixed fleet (a
battery profile whose strategy may change), two layer groups trained, int8 updates, DP-SGD on every device
(its Poisson samples, clipping, noise and ledger) and client-level DP at the fogs (Poisson-sampled clients,
clipping, seeded noise). Both runs are seeded alike; every fog round and
global version must agree: who was asked and who contributed, bytes, epsilons, accuracy and loss, and the
final weights (float tolerance: the batched pass sums in another order, so an int8 value may land one step
away here and there).
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from hyprstream.config import parse
from hyprstream.sim import harness
from hyprstream.sim.experiment import Experiment

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXPERIMENT = {
    "name": "engines", "seed": 3,
    "task": {"name": "digits"},
    "partition": {"scheme": "dirichlet", "alpha": 1.0, "min_samples": 20},
    "fleet": {"fogs": 2, "agents_per_fog": 3, "profiles": {"x86-gateway": 0.5, "rpi4": 0.5}},
    "training": {"global_steps": 2, "layers": ["fc2", "head"], "local_steps": 8, "batch_size": 16, "lr": 0.01,
                 "update_encoding": "int8"},
    "privacy": {"client_dp": {"noise_multiplier": 0.5, "placement": "central", "client_sampling_rate": 0.8,
                              "clip": 1.0, "epsilon_budget": 100.0, "delta": 1e-5},
                "dpsgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "epsilon_budget": 50.0, "delta": 1e-5}},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for engine in ("flower", "batched"):
        exp = parse(Experiment, {**EXPERIMENT, "runtime": {"engine": engine}})
        folder = tmp_path_factory.mktemp(engine)
        out[engine] = (folder, harness.run(exp, folder))
    return out


def rows(folder, name):
    return pq.read_table(folder / f"{name}.parquet").to_pylist()


def test_same_rounds_and_versions(runs):
    (fa, ra), (fb, rb) = runs["flower"], runs["batched"]
    assert ra.final_version == rb.final_version == 4
    a, b = rows(fa, "metrics"), rows(fb, "metrics")
    assert len(a) == len(b) == 6  # two fogs and the global row, per step
    exact = ("kind", "fog", "round", "version", "participants", "declined", "refused", "failed", "bytes_up",
             "bytes_down", "bytes_core", "client_epsilon", "device_epsilon")
    for x, y in zip(a, b, strict=True):
        assert {k: x[k] for k in exact} == {k: y[k] for k in exact}
        assert y["accuracy"] == pytest.approx(x["accuracy"], abs=0.01)
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-3)
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-4)
    assert rows(fa, "participation") == rows(fb, "participation")  # who was asked, who contributed, bytes
    assert rows(fa, "fleet") == rows(fb, "fleet")  # the simulated fleet, strategies and batteries
    assert rows(fa, "privacy") == rows(fb, "privacy") != []  # every device's DP-SGD spend, round by round


def test_same_final_weights(runs):
    a, b = runs["flower"][1].final_weights, runs["batched"][1].final_weights
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=2e-3, err_msg=name)
        assert np.isclose(b[name], a[name], rtol=1e-4, atol=1e-6).mean() >= 0.98, name


def test_the_batched_run_keeps_its_devices_in_one_table(runs):
    folder, result = runs["batched"]
    assert (folder / harness.DEVICE_TABLE).is_file()
    assert {p.suffix for p in (folder / "devices").iterdir()} <= {".privacy", ".json"}  # ledgers, no stores
    assert not (folder / "flower").exists()  # no Flower runtime was started
    assert (runs["flower"][0] / "devices").is_dir()
