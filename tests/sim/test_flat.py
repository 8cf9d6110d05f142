"""The flat FedAvg baseline against the hierarchical run of the same (reduced) experiment."""

from dataclasses import replace

import pyarrow.parquet as pq
import pytest

from hyprstream.cli import resolve_experiment
from hyprstream.sim import harness
from hyprstream.sim.compare import compare_runs
from hyprstream.sim.experiment import load_experiment, reduced
from hyprstream.sim.flat import FLAT, run_flat
from hyprstream.sim.report import write_report

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WALL = {"wall_s"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    exp = reduced(load_experiment(resolve_experiment("quickstart")))
    exp = replace(exp, training=replace(exp.training, global_steps=3))
    out = {name: tmp_path_factory.mktemp(name) for name in ("hier", "flat", "flat2")}
    hier = harness.run(exp, out["hier"])
    flat = run_flat(exp, out["flat"])
    flat2 = run_flat(exp, out["flat2"])
    return exp, out, hier, flat, flat2


def rows(path, kind):
    return [r for r in pq.read_table(path / "metrics.parquet").to_pylist() if r["kind"] == kind]


def test_same_clients_and_bytes_as_the_hierarchy(runs):
    exp, out, hier, flat, _ = runs
    h, f = rows(out["hier"], "global"), rows(out["flat"], "global")
    assert [r["round"] for r in f] == [1, 2, 3] and {r["fog"] for r in f} == {FLAT}
    assert [r["version"] for r in f] == [1, 2, 3]
    # the same agents are online each round (the fleet's availability) and all of them train
    assert [r["participants"] for r in f] == [r["participants"] for r in h]
    n_params = sum(a.size for a in flat.final_weights.values())
    # every layer in fp32 both ways: the same payload bytes, counted the same way
    assert all(r["bytes_up"] == r["bytes_down"] == r["participants"] * n_params * 4 for r in f)
    assert [r["bytes_up"] for r in f] == [r["bytes_up"] for r in h]
    assert all(r["bytes_core"] == 0 for r in f) and all(r["bytes_core"] > 0 for r in h)
    sims = [r["sim_s"] for r in f]
    assert all(b > a > 0 for a, b in zip(sims, sims[1:]))
    assert f[-1]["accuracy"] == pytest.approx(flat.final_accuracy)
    assert f[-1]["accuracy"] > f[0]["accuracy"]
    part = pq.read_table(out["flat"] / "participation.parquet").to_pylist()
    assert sum(p["contributed"] for p in part) == sum(r["participants"] for r in f)


def test_flat_baseline_is_reproducible(runs):
    _, out, _, _, _ = runs
    a = pq.read_table(out["flat"] / "metrics.parquet").drop_columns(list(WALL)).to_pylist()
    b = pq.read_table(out["flat2"] / "metrics.parquet").drop_columns(list(WALL)).to_pylist()
    assert a == b


def test_report_and_compare(runs):
    exp, out, hier, flat, _ = runs
    path = write_report(exp, flat.metrics, out["flat"], final_accuracy=flat.final_accuracy,
                        final_version=flat.final_version, baseline="flat")
    text = path.read_text()
    assert text.startswith("# Simulation report: quickstart (flat FedAvg baseline)")
    assert "Flower's FedAvg over all 6 agents" in text
    for png in ("accuracy.png", "bytes.png", "participation.png"):
        assert (out["flat"] / png).stat().st_size > 1000
    table = compare_runs(out["hier"], out["flat"])
    assert f"B {flat.final_accuracy:.4f}" in table and "(A/B = 1.00)" in table
