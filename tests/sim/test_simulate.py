"""The default experiment end to end: Flower's simulation engine, a real core Flight server, real stores."""

import json

import numpy as np
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from hyprstream.cli import resolve_experiment
from hyprstream.sim import harness
from hyprstream.sim.experiment import load_experiment
from hyprstream.store import to_arrays

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    exp = load_experiment(resolve_experiment("quickstart"))
    out = tmp_path_factory.mktemp("quickstart")
    fetched = {}

    def on_step(step, rounds, row, core):
        # A plain pyarrow.flight client, while the run is live, with the observer's read-only token.
        client = flight.FlightClient(core.location)
        options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {core.reader_token}".encode())])
        ticket = flight.Ticket(json.dumps({"schema": "hyprstream.core/1", "command": "get_weights",
                                           "model": "digits-model"}).encode())
        table = client.do_get(ticket, options).read_all()
        fetched[step] = (int(table.schema.metadata[b"hyprstream.version"]), to_arrays(table, copy=True), row)
        client.close()

    result = harness.run(exp, out, on_step=on_step)
    return exp, out, result, fetched


def test_accuracy_and_versions(quickstart):
    exp, out, result, fetched = quickstart
    assert result.final_accuracy >= 0.85
    # every fog pushes once per global step
    assert result.final_version == exp.training.global_steps * exp.fleet.fogs


def test_flight_weights_match_what_the_simulation_reports(quickstart):
    exp, out, result, fetched = quickstart
    assert sorted(fetched) == list(range(1, exp.training.global_steps + 1))
    for step, (version, weights, row) in fetched.items():
        assert version == row.version
    version, weights, _ = fetched[exp.training.global_steps]
    assert version == result.final_version
    assert weights.keys() == result.final_weights.keys()
    for name in weights:
        np.testing.assert_array_equal(weights[name], result.final_weights[name])


def test_metrics_file(quickstart):
    exp, out, result, fetched = quickstart
    table = pq.read_table(out / "metrics.parquet")
    assert {"fog", "round", "version", "accuracy", "loss", "bytes_up", "bytes_down", "wall_s"} <= set(table.column_names)
    rows = table.to_pylist()
    fog_rows = [r for r in rows if r["kind"] == "fog_round"]
    global_rows = [r for r in rows if r["kind"] == "global"]
    assert len(fog_rows) == exp.training.global_steps * exp.fleet.fogs
    assert len(global_rows) == exp.training.global_steps
    assert all(1 <= r["participants"] <= exp.fleet.agents_per_fog for r in fog_rows)
    assert all(r["declined"] == r["refused"] == r["failed"] == 0 for r in fog_rows)
    n_params = sum(a.size for a in result.final_weights.values())
    # every online agent receives the whole float32 model and returns a delta of every (trained) parameter
    assert all(r["bytes_down"] == r["participants"] * n_params * 4 for r in fog_rows)
    assert all(r["bytes_up"] == r["participants"] * n_params * 4 for r in fog_rows)
    # virtual time only moves forward, and a step lasts as long as its slowest fog
    sims = [r["sim_s"] for r in global_rows]
    assert all(b > a for a, b in zip(sims, sims[1:]))
    for step, g in enumerate(global_rows, start=1):
        assert g["sim_s"] == pytest.approx(max(r["sim_s"] for r in fog_rows if r["round"] == step))
    assert global_rows[-1]["accuracy"] == pytest.approx(result.final_accuracy)
    assert global_rows[-1]["accuracy"] > global_rows[0]["accuracy"] - 0.05


def test_lineage_in_core_directory(quickstart):
    exp, out, result, fetched = quickstart
    manifest = json.loads((out / "core" / "digits-model" / "manifest.json").read_text())
    versions = manifest["versions"]
    assert [v["version"] for v in versions] == list(range(result.final_version + 1))
    actors = [v["actor"] for v in versions[1:]]
    assert sorted(set(actors)) == ["fog-0", "fog-1"]
    # both fogs start a step from the same version: the second push of a step is one update stale
    assert [v["staleness"]["fc1"] for v in versions[1:]] == [0, 1] * exp.training.global_steps
    stores = [p for p in (out / "devices").iterdir() if p.is_dir()]
    assert len(stores) == exp.num_agents  # and beside each, the strategy the simulated fleet gave it
    assert sorted(p.name for p in (out / "devices").glob("*.strategy.json")) == [
        f"{p.name}.strategy.json" for p in sorted(stores)]


def test_only_online_devices_outside_minimal_are_asked_to_train(quickstart):
    exp, out, result, fetched = quickstart
    fleet = pq.read_table(out / "fleet.parquet").to_pylist()
    asked = pq.read_table(out / "participation.parquet").to_pylist()
    assert len(fleet) == exp.num_agents * exp.training.global_steps
    for step in range(1, exp.training.global_steps + 1):
        eligible = {f["device"] for f in fleet if f["round"] == step and f["online"] and f["strategy"] != "minimal"}
        assert {p["device"] for p in asked if p["round"] == step} == eligible
    hubs = [f for f in fleet if f["profile"] == "battery-sensor-hub"]
    assert hubs and all(0 <= f["battery_percent"] <= 100 for f in hubs)
    assert all(f["battery_percent"] is None for f in fleet if f["profile"] != "battery-sensor-hub")
    # mains-powered devices on idle readings: full from the first step they are online
    assert all(f["strategy"] == "full" for f in fleet if f["profile"] != "battery-sensor-hub" and f["online"])


def test_cli_quick_run_report_and_compare(quickstart, tmp_path):
    import subprocess
    import sys

    exp, out, result, fetched = quickstart
    quick = tmp_path / "quick"
    proc = subprocess.run([sys.executable, "-m", "hyprstream.cli", "simulate", "--quick", "--out", str(quick)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "final accuracy" in proc.stdout
    # on the API Flower supports (flwr run on a SuperLink of the run's own): no deprecation banner
    assert "DEPRECATED" not in proc.stdout + proc.stderr and "deprecated" not in proc.stdout + proc.stderr
    assert (quick / "flower" / "flower-app" / "pyproject.toml").is_file()
    rows = pq.read_table(quick / "metrics.parquet").to_pylist()
    assert [r["round"] for r in rows if r["kind"] == "global"] == [1, 2]
    assert max(r["participants"] for r in rows if r["kind"] == "fog_round") <= 3
    report = (quick / "report.md").read_text()
    assert report.startswith("# Simulation report: quickstart")
    # the file's description is of the full experiment: the report says what this run was
    assert f"Reduced run (`--quick`): {exp.fleet.fogs} fog(s) x 3 agent(s), 2 global step(s) of" in report
    assert (quick / "accuracy.png").stat().st_size > 1000
    assert (quick / "strategy.png").stat().st_size > 1000
    assert "![strategy mix](strategy.png)" in (quick / "report.md").read_text()
    proc = subprocess.run([sys.executable, "-m", "hyprstream.cli", "simulate", "compare", str(out), str(quick),
                           "--out", str(tmp_path / "cmp")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    quick_final = [r for r in rows if r["kind"] == "global"][-1]["accuracy"]
    assert f"final accuracy: A {result.final_accuracy:.4f}, B {quick_final:.4f}" in proc.stdout
    assert "total uplink bytes" in proc.stdout and (tmp_path / "cmp" / "compare.png").exists()
