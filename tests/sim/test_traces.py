"""Trace-driven availability (``[fleet] availability_trace``): online intervals per device on the simulated clock,
their checks, the synthetic generator and the simulator following a trace."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hyprstream.cli import main, resolve_experiment
from hyprstream.errors import ConfigError
from hyprstream.sim import traces
from hyprstream.sim.experiment import load_experiment, reduced
from hyprstream.sim.traces import AvailabilityTrace


def _table(rows: list[tuple[int, float, float]]) -> pa.Table:
    d, s, e = zip(*rows, strict=True) if rows else ((), (), ())
    return pa.table({"device": pa.array(d, pa.int64()), "start_s": pa.array(s, pa.float64()),
                     "end_s": pa.array(e, pa.float64())})


@pytest.mark.unit
def test_online_follows_the_intervals_by_hand():
    # device 0: [10, 20) and [15, 30) merge into [10, 30); device 1: [0, 5); device 2: no row, never online
    trace = AvailabilityTrace.from_table(_table([(0, 15, 30), (0, 10, 20), (1, 0, 5)]), 3, period_s=40)
    assert trace.starts[0].tolist() == [10.0] and trace.ends[0].tolist() == [30.0]
    expect = {0: [False, True, False], 4.999: [False, True, False], 5: [False, False, False],
              10: [True, False, False], 29.9: [True, False, False], 30: [False, False, False],
              41: [False, True, False],  # the trace repeats: 41 s is 1 s into the second period
              52: [True, False, False]}
    for t, online in expect.items():
        assert trace.online(t).tolist() == online, t
    assert trace.fraction_online().tolist() == pytest.approx([20 / 40, 5 / 40, 0.0])
    assert AvailabilityTrace.from_table(_table([(0, 1, 3)]), 1).period_s == 3.0  # default: the latest end


@pytest.mark.unit
@pytest.mark.parametrize("rows, message", [
    ([(0, -1, 5)], "0 <= start_s < end_s"),
    ([(0, 5, 5)], "0 <= start_s < end_s"),
    ([(0, float("nan"), 5)], "0 <= start_s < end_s"),
    ([(0, 1, float("inf"))], "0 <= start_s < end_s"),
    ([(7, 1, 2)], "device 7 is not one of the fleet's 3 devices"),
    ([(-1, 1, 2)], "device -1"),
])
def test_a_bad_interval_is_refused_naming_its_row(rows, message):
    with pytest.raises(ConfigError, match=message):
        AvailabilityTrace.from_table(_table(rows), 3)


@pytest.mark.unit
def test_a_bad_trace_file_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ConfigError, match="no column"):
        AvailabilityTrace.from_table(pa.table({"device": [0], "start": [0.0], "end_s": [1.0]}), 1)
    with pytest.raises(ConfigError, match="after the period"):
        AvailabilityTrace.from_table(_table([(0, 1, 50)]), 1, period_s=40)
    with pytest.raises(ConfigError, match="integers"):
        AvailabilityTrace.from_table(pa.table({"device": [0.5], "start_s": [0.0], "end_s": [1.0]}), 1)
    bad = tmp_path / "trace.txt"
    bad.write_text("device,start_s,end_s\n")
    with pytest.raises(ConfigError, match="parquet"):
        traces.read_table(bad)
    with pytest.raises(ConfigError, match="file not found"):
        traces.read_table(tmp_path / "missing.parquet")
    garbage = tmp_path / "trace.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(ConfigError, match="not a readable trace"):
        traces.read_table(garbage)
    csv = tmp_path / "trace.csv"
    csv.write_text("device,start_s,end_s\n0,0,10\n1,5,6\n")
    assert AvailabilityTrace.load(csv, 2).online(5.5).tolist() == [True, True]
    # a reduced run keeps the rows of its first devices
    assert AvailabilityTrace.load(csv, 1, first=True).devices == 1
    with pytest.raises(ConfigError, match="device 1 is not one"):
        AvailabilityTrace.load(csv, 1)


@pytest.mark.unit
def test_the_synthetic_trace_is_seeded_and_online_for_the_share_its_means_give():
    a = traces.synthetic(200, 5 * 86400, mean_online_s=3600, mean_offline_s=1800, seed=4, spread=0.0)
    assert a.equals(traces.synthetic(200, 5 * 86400, mean_online_s=3600, mean_offline_s=1800, seed=4, spread=0.0))
    assert not a.equals(traces.synthetic(200, 5 * 86400, mean_online_s=3600, mean_offline_s=1800, seed=5,
                                         spread=0.0))
    trace = AvailabilityTrace.from_table(a, 200, period_s=5 * 86400)
    for s, e in zip(trace.starts, trace.ends, strict=True):
        assert np.all(s[1:] > e[:-1]) and np.all(e > s) and s.min() >= 0 and e.max() <= 5 * 86400
    # alternating exponential sessions of means 1 h and 30 min: online 2/3 of the time
    assert trace.fraction_online().mean() == pytest.approx(2 / 3, abs=0.02)
    at = np.linspace(0, 5 * 86400, 500, endpoint=False)
    assert np.mean([trace.online(t).mean() for t in at]) == pytest.approx(2 / 3, abs=0.02)
    spread = traces.synthetic(200, 5 * 86400, mean_online_s=3600, mean_offline_s=1800, seed=4)
    shares = AvailabilityTrace.from_table(spread, 200, period_s=5 * 86400).fraction_online()
    assert shares.std() > 0.1  # devices differ
    with pytest.raises(ValueError):
        traces.synthetic(0, 10, mean_online_s=1, mean_offline_s=1)


@pytest.mark.unit
def test_the_cli_writes_a_trace_an_experiment_takes(tmp_path, capsys):
    path = tmp_path / "fleet.parquet"
    assert main(["simulate", "trace", str(path), "--devices", "10", "--duration-s", "7200", "--seed", "2"]) == 0
    assert "online intervals of 10 devices" in capsys.readouterr().out
    assert AvailabilityTrace.load(path, 10).devices == 10
    base = resolve_experiment("quickstart").read_text()
    exp_path = tmp_path / "exp.toml"
    exp_path.write_text(base.replace("[fleet]", f'[fleet]\navailability_trace = "{path}"', 1))
    exp = load_experiment(exp_path)
    assert exp.fleet.availability_trace == str(path)
    cases = {f'availability_trace = "{tmp_path / "nope.parquet"}"': "file not found",
             f'availability_trace = "{path}"\nagents_per_fog = 4': "device 8 is not one of the fleet's 8 devices"}
    for extra, expected in cases.items():
        exp_path.write_text(base.replace("agents_per_fog = 5", "").replace("[fleet]", f"[fleet]\n{extra}", 1))
        with pytest.raises(ConfigError, match=expected):
            load_experiment(exp_path)
    exp_path.write_text(base.replace("[fleet]", f'[fleet]\navailability_trace = "{path}"', 1)
                        .replace("[training]", '[training]\nmode = "buffered"', 1))
    assert load_experiment(exp_path).fleet.availability_trace == str(path)  # the buffered mode follows it too


@pytest.mark.unit
def test_the_fleet_plans_each_step_from_the_trace_at_its_simulated_time(tmp_path):
    from hyprstream.sim.fleet import VirtualFleet

    path = tmp_path / "t.parquet"
    pq.write_table(_table([(1, 0, 100), (2, 50, 100), (3, 0, 10), (3, 20, 100)]), path)
    exp = load_experiment(resolve_experiment("quickstart"))
    exp = dataclasses.replace(exp, fleet=dataclasses.replace(exp.fleet, fogs=1, agents_per_fog=4,
                                                             availability_trace=str(path)))
    fleet = VirtualFleet.build(exp)
    assert fleet.plan_step(1, 0.0).online.tolist() == [False, True, False, True]
    assert fleet.plan_step(2, 15.0).online.tolist() == [False, True, False, False]
    assert fleet.plan_step(3, 60.0).online.tolist() == [False, True, True, True]


@pytest.mark.integration
@pytest.mark.slow
def test_a_simulation_asks_only_the_devices_the_trace_has_online(tmp_path):
    """A reduced quickstart on a trace: device 0 never online, device 1 online only for the first simulated
    instant, the others always; the fleet table says so and only online devices are asked to train."""
    from hyprstream.sim import harness

    exp = reduced(load_experiment(resolve_experiment("quickstart")))
    rows = [(d, 0.0, 1e6) for d in range(2, exp.num_agents)] + [(1, 0.0, 1e-9)]
    path = tmp_path / "trace.csv"
    traces.write(_table(rows), path)
    exp = dataclasses.replace(exp, fleet=dataclasses.replace(exp.fleet, availability_trace=str(path)))
    result = harness.run(exp, tmp_path / "run")
    fleet = pq.read_table(tmp_path / "run" / "fleet.parquet").to_pylist()
    part = pq.read_table(tmp_path / "run" / "participation.parquet").to_pylist()
    online = {(r["round"], r["device"]) for r in fleet if r["online"]}
    assert not any(d == 0 for _, d in online) and not any(r["device"] == 0 for r in part)
    assert (1, 1) in online and (2, 1) not in online  # step 2 starts after the first simulated instant
    assert all((step, d) in online for step in (1, 2) for d in range(2, exp.num_agents))
    assert part and all((p["round"], p["device"]) in online for p in part)
    assert result.final_version >= 1
