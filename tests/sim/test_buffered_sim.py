"""The simulator's buffered asynchronous (FedBuff) mode: configuration rules, the virtual duration of an
agent job, and seeded runs through Flower's simulation engine against the sync mode."""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from pathlib import Path
from types import MappingProxyType

import pyarrow.parquet as pq
import pytest

from hyprstream.config import parse
from hyprstream.errors import ConfigError
from hyprstream.fog.buffered import Dispatch
from hyprstream.sim import harness
from hyprstream.sim.buffered import job_duration, push_budget
from hyprstream.sim.compare import compare_runs, time_to_accuracy
from hyprstream.sim.experiment import Experiment, TrainingMode, load_experiment
from hyprstream.sim.fleet import VirtualFleet
from hyprstream.sim.report import write_report

ROOT = Path(__file__).resolve().parents[2]


def _exp(**sections) -> Experiment:
    data = {"name": "t", "fleet": {"fogs": 2, "agents_per_fog": 3},
            "training": {"mode": "buffered", "global_steps": 4}, **sections}
    return parse(Experiment, data)


@pytest.mark.unit
def test_buffered_mode_takes_secure_aggregation_and_client_level_dp():
    # secure buffered cohorts: each buffer is one secure round among the agents that filled it, and with
    # client-level DP its sum is released over the fixed buffer_k
    assert _exp(privacy={"secagg": {"clip": 50.0, "min_clients": 2}}).privacy.secagg is not None
    assert _exp(privacy={"secagg": {"clip": 50.0, "min_clients": 2},
                         "client_dp": {"noise_multiplier": 1.0}}).privacy.client_dp is not None
    # plain buffered pushes take client-level DP: the fog clips and noises each one
    assert _exp(privacy={"client_dp": {"noise_multiplier": 1.0, "clip": 1.0}}).privacy.client_dp is not None
    # secure cohorts too, with distributed noise when a cohort holds the inputs the noise is split over
    secure = {"secagg": {"clip": 1.0, "min_clients": 2}, "client_dp": {"noise_multiplier": 1.0,
                                                                       "placement": "distributed", "min_clients": 3}}
    assert _exp(privacy=secure, buffered={"buffer_k": 3}).privacy.client_dp.min_clients == 3
    with pytest.raises(ConfigError, match=r"buffered.buffer_k: 2 is below privacy.client_dp.min_clients \(3\)"):
        _exp(privacy=secure, buffered={"buffer_k": 2})
    # the same sections are fine in sync mode
    parse(Experiment, {"name": "t", "privacy": {"secagg": {"clip": 50.0, "min_clients": 2},
                                                "client_dp": {"noise_multiplier": 1.0}}})


@pytest.mark.unit
@pytest.mark.parametrize("key", ["buffer_k", "concurrency"])
def test_buffer_and_concurrency_at_most_agents_per_fog(key):
    with pytest.raises(ConfigError, match=f"buffered.{key}.*larger than fleet.agents_per_fog"):
        _exp(buffered={key: 4})
    assert getattr(_exp(buffered={key: 3}).buffered, key) == 3


@pytest.mark.unit
def test_push_budget_matches_the_sync_runs_agent_updates():
    # 4 steps x 3 agents = 12 updates per fog: 6 pushes of 2, or ceil(12 / 3) = 4 pushes of 3; 2 fogs
    assert push_budget(_exp(buffered={"buffer_k": 2})) == 12
    assert push_budget(_exp(buffered={"buffer_k": 3})) == 8
    assert _exp().training.mode is TrainingMode.BUFFERED


@pytest.mark.unit
def test_job_duration_by_hand():
    exp = _exp(fleet={"fogs": 1, "agents_per_fog": 1, "profiles": {"rpi3": 1.0}}, buffered={"buffer_k": 1},
               training={"mode": "buffered", "local_steps": 10, "batch_size": 32, "update_encoding": "int8"})
    fleet = VirtualFleet.build(exp)
    params = {"a.weight": ("body", (100, 10)), "a.bias": ("body", (100,)), "h.weight": ("head", (10, 100))}
    duration = job_duration(exp, fleet, {7: 0}, params)
    dispatch = Dispatch(index=1, node=7, version=0, layers=("head",), bytes_down=8_400, sent_at=0.0)
    # rpi3: 20 Mbit/s down, 10 Mbit/s up, 5 ms one way, 0.12 x 20 GFLOP/s. 320 samples through 2100
    # parameters forward (2 FLOPs each) and the 1000 of "head" backward (4 each); int8 reply: 1000 bytes
    # of values plus a 4-byte scale.
    down = 0.005 + 8_400 * 8 / 20e6
    compute = 320 * (2 * 2100 + 4 * 1000) / (0.12 * 20e9)
    up = 0.005 + 1_004 * 8 / 10e6
    assert duration(7, dispatch) == pytest.approx(down + compute + up, rel=1e-12)


# -- seeded runs on Flower's simulation engine: 2 fogs x 3 agents, one Raspberry Pi 3 among x86 gateways
def small(mode: str) -> Experiment:
    exp = load_experiment(ROOT / "simulations" / "stragglers-async.toml")
    return dataclasses.replace(
        exp, name=f"small-{mode}",
        fleet=dataclasses.replace(exp.fleet, agents_per_fog=3,
                                  profiles=MappingProxyType({"x86-gateway": 5 / 6, "rpi3": 1 / 6})),
        training=dataclasses.replace(exp.training, mode=TrainingMode(mode), global_steps=4, local_steps=10),
        buffered=dataclasses.replace(exp.buffered, buffer_k=2, sim_seconds=0.12))


CLIENT_DP = {"noise_multiplier": 1.0, "clip": 0.05}


def small_dpsgd() -> Experiment:
    """The buffered run with DP-SGD on every device (seeded noise, a budget no device reaches here) and
    client-level DP at each fog (each push clipped and noised, central placement)."""
    from hyprstream.privacy.config import ClientDpConfig, DpSgdConfig

    exp = small("buffered")
    dpsgd = DpSgdConfig(noise_multiplier=1.0, max_grad_norm=1.0, epsilon_budget=50.0, delta=1e-5, secure=False)
    privacy = dataclasses.replace(exp.privacy, dpsgd=dpsgd, client_dp=ClientDpConfig(**CLIENT_DP))
    return dataclasses.replace(exp, name="small-async-dpsgd", privacy=privacy)


def small_fleet(trace: Path) -> Experiment:
    """The buffered run over a fleet with state: battery hubs (seed 23: devices 1 and 4 start at 72 and 50 %,
    hybrid; 2 and 3 at 98 and 90 %, full; 5 at 23 %, minimal), device 0 never online by ``trace``, each fog
    choosing 2 agents by telemetry; the push budget, not a simulated time, ends the run (a hub's job takes
    seconds over its link)."""
    from hyprstream.sim import traces

    exp = small("buffered")
    rows = [(d, 0.0, 1e6) for d in range(1, exp.num_agents)]
    traces.write(traces.pa.table({"device": [r[0] for r in rows], "start_s": [r[1] for r in rows],
                                  "end_s": [r[2] for r in rows]}), trace)
    fleet = dataclasses.replace(exp.fleet, profiles=MappingProxyType({"battery-sensor-hub": 1.0}),
                                clients_per_round=2, availability_trace=str(trace))
    return dataclasses.replace(exp, name="small-async-fleet", seed=23, fleet=fleet,
                               buffered=dataclasses.replace(exp.buffered, sim_seconds=None))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, mode in (("sync", "sync"), ("async", "buffered"), ("async-again", "buffered"),
                       ("async-dpsgd", "dpsgd"), ("async-fleet", "fleet")):
        path = tmp_path_factory.mktemp(name)
        exp = small_dpsgd() if mode == "dpsgd" else small_fleet(path / "trace.csv") if mode == "fleet" else small(mode)
        result = harness.run(exp, path)
        write_report(exp, result.metrics, path, final_accuracy=result.final_accuracy,
                     final_version=result.final_version)
        out[name] = (exp, path, result)
    return out


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path / "metrics.parquet").to_pylist()


@pytest.mark.integration
@pytest.mark.slow
def test_buffered_run_writes_metrics(runs):
    exp, path, result = runs["async"]
    fleet = VirtualFleet.build(exp)
    assert sum(p.name.startswith("Raspberry Pi 3") for p in fleet.profiles) == 1
    rows = _rows(path)
    pushes = [r for r in rows if r["kind"] == "fog_round"]
    glob = [r for r in rows if r["kind"] == "global"]
    # every push commits the next version at core, in simulated-time order, within the budget
    assert [r["version"] for r in pushes] == list(range(1, len(pushes) + 1))
    assert result.final_version == len(pushes) > push_budget(exp)  # 0.12 s is more than the update budget
    sims = [r["sim_s"] for r in pushes]
    assert sims == sorted(sims) and 0 < sims[-1] <= exp.buffered.sim_seconds + 0.011
    assert {r["fog"] for r in pushes} == {"fog-0", "fog-1"}
    assert all(r["participants"] == exp.buffered.buffer_k for r in pushes)
    # a global row every `fogs` pushes, on the version and time of the last of them
    assert [r["round"] for r in glob] == list(range(1, len(glob) + 1))
    for g in glob:
        mine = [r for r in pushes if r["round"] == g["round"]]
        assert len(mine) <= exp.fleet.fogs and g["version"] == mine[-1]["version"]
        assert g["sim_s"] == mine[-1]["sim_s"] and g["accuracy"] == mine[-1]["accuracy"]
    assert glob[-1]["accuracy"] == pytest.approx(result.final_accuracy)
    assert "Mode: buffered asynchronous (FedBuff)" in (path / "report.md").read_text()


@pytest.mark.integration
@pytest.mark.slow
def test_same_seed_same_metrics(runs):
    a, b = _rows(runs["async"][1]), _rows(runs["async-again"][1])
    for rows in (a, b):
        for r in rows:
            del r["wall_s"]
    assert a == b


@pytest.mark.integration
@pytest.mark.slow
def test_async_reaches_the_sync_accuracy_sooner_under_a_straggler(runs):
    sync = [r for r in _rows(runs["sync"][1]) if r["kind"] == "global"]
    fast = [r for r in _rows(runs["async"][1]) if r["kind"] == "global"]
    target = sync[-1]["accuracy"]
    t_sync, t_async = time_to_accuracy(sync, target), time_to_accuracy(fast, target)
    assert t_sync is not None and t_async is not None
    assert t_async < t_sync
    text = compare_runs(runs["sync"][1], runs["async"][1])
    assert f"sim s to reach A's final accuracy {target:.4f}: A {t_sync:.3f}, B {t_async:.3f}" in text


@pytest.mark.integration
@pytest.mark.slow
def test_buffered_run_with_dpsgd_charges_every_trained_update_and_reports_each_step(runs):
    """Buffered mode with DP-SGD on the devices: every job a device trained is charged to its ledger, each
    job adds to the device's spend, and its first charge and its total are its own Poisson-subsampled
    Gaussian (rate batch / its samples, z, the local steps of its jobs) composed from first principles with
    dp_accounting, and each global row carries the largest device
    epsilon by then (agents train from many versions: a charge counts from the step its base version existed)."""
    import dp_accounting

    from hyprstream.learning.task import get_task
    from hyprstream.store import Store

    exp, path, result = runs["async-dpsgd"]
    dp = exp.privacy.dpsgd
    task = get_task(exp.task.name)
    charges = pq.read_table(path / "privacy.parquet").to_pylist()
    assert charges and result.final_version >= 1
    sizes = {}
    for store in sorted((path / "devices").glob("device-[0-9][0-9][0-9][0-9]")):
        with Store.open(store, readonly=True) as s:
            sizes[int(store.name.removeprefix("device-"))] = s.num_rows(task.table)
    def event(device: int, jobs: int):
        q = min(1.0, exp.training.batch_size / sizes[device])
        return dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.GaussianDpEvent(dp.noise_multiplier)), exp.training.local_steps * jobs)

    def pld(device: int, jobs: int) -> float:
        return dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3).compose(
            event(device, jobs)).get_epsilon(dp.delta)

    jobs: dict[int, int] = {}
    for device in {c["device"] for c in charges}:
        spent = sorted(c["epsilon"] for c in charges if c["device"] == device)
        jobs[device] = len(spent)
        assert all(a < b for a, b in itertools.pairwise(spent))  # no two jobs at one spend: each adds to it
        # the first job's charge and the device's total, each PLD (the ledger's accountant) from first principles
        assert spent[0] == pytest.approx(pld(device, 1), rel=5e-3)
        assert spent[-1] == pytest.approx(pld(device, len(spent)), rel=5e-3)
    # every update a device contributed to a push was trained, hence charged
    participation = pq.read_table(path / "participation.parquet").to_pylist()
    contributed = Counter(p["device"] for p in participation if p["contributed"])
    assert all(jobs.get(d, 0) >= n for d, n in contributed.items()), (jobs, contributed)
    # each contribution's uplink bytes are its own (a buffered push records them per agent, as a round does)
    assert all(p["bytes_up"] > 0 for p in participation if p["contributed"]), participation
    rows = [r for r in _rows(path) if r["kind"] == "global"]
    shown = [r["device_epsilon"] for r in rows]
    assert all(e is not None for e in shown) and shown == sorted(shown)
    assert shown[-1] == pytest.approx(max(c["epsilon"] for c in charges))


@pytest.mark.integration
@pytest.mark.slow
def test_buffered_run_with_client_dp_charges_each_push_as_a_gaussian_release(runs):
    """Client-level DP in buffered mode: every push core committed carries the fixed denominator buffer_k, rate
    1, sensitivity 2C and 0 participants, and each fog's epsilon after its i-th push lies between dp-accounting's
    PLD and RDP values of i Gaussian mechanisms at multiplier z (each fog keeps its own ledger)."""
    import json

    import dp_accounting

    exp, path, _ = runs["async-dpsgd"]
    z, clip, delta = CLIENT_DP["noise_multiplier"], CLIENT_DP["clip"], exp.privacy.client_dp.delta
    versions = json.loads((path / "core" / "digits-model" / "manifest.json").read_text())["versions"][1:]
    assert versions and all(v["participants"] == 0 for v in versions)
    for v in versions:
        record = v["privacy"]
        assert record["sample_rate"] == 1.0 and record["sensitivity"] == 2 * clip
        assert record["expected_participants"] == exp.buffered.buffer_k and record["noise_multiplier"] == z
    pushes = [r for r in _rows(path) if r["kind"] == "fog_round"]
    assert {r["fog"] for r in pushes} == {"fog-0", "fog-1"}
    for fog in ("fog-0", "fog-1"):
        spent = [r["client_epsilon"] for r in pushes if r["fog"] == fog]
        assert all(a < b for a, b in itertools.pairwise(spent))  # every push is charged, one more each row
        for i in sorted({1, 2, len(spent)}):  # PLD (the ledger's accountant) to RDP, after i pushes
            event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), i)
            pld = dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(delta)
            rdp = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta)
            assert pld * 0.999 <= spent[i - 1] <= rdp * 1.001, (fog, i)
    assert f"each push charged at rate 1 with sensitivity 2 x clip {clip:g}" in (path / "report.md").read_text()


@pytest.mark.integration
@pytest.mark.slow
def test_buffered_run_offers_jobs_by_each_devices_state_and_a_telemetry_choice(runs):
    """Buffered mode with device state: the device the trace never has online and the hub in minimal are
    never sent a job; the hubs in hybrid train only their last layer group (their uplink is that group's
    bytes, by hand); each fog's telemetry choice keeps its two eligible agents busy; the fleet table
    records each step's state."""
    from hyprstream.codec import Encoding, encoded_nbytes
    from hyprstream.learning.task import get_task

    exp, path, result = runs["async-fleet"]
    part = pq.read_table(path / "participation.parquet").to_pylist()
    fleet = pq.read_table(path / "fleet.parquet").to_pylist()
    assert result.final_version >= 2
    took_part = Counter(p["device"] for p in part if p["contributed"])
    assert set(took_part) == {1, 2, 3, 4}  # not 0 (never online) nor 5 (minimal)
    assert fleet and all(not r["online"] for r in fleet if r["device"] == 0)
    assert {r["strategy"] for r in fleet if r["device"] in (1, 4)} == {"hybrid"}
    assert {r["strategy"] for r in fleet if r["device"] in (2, 3)} == {"full"}
    assert {r["strategy"] for r in fleet if r["device"] == 5} == {"minimal"}
    model = get_task(exp.task.name).build_model(seed=0)
    layer_of = get_task(exp.task.name).layer_of
    groups = list(dict.fromkeys(layer_of(n) for n, _ in model.named_parameters()))
    last = groups[-1:]  # the hub's max_layer_groups_hybrid = 1
    enc = Encoding(exp.training.update_encoding.value)
    hybrid_bytes = sum(encoded_nbytes(tuple(t.shape), enc) for n, t in model.named_parameters() if layer_of(n) in last)
    full_bytes = sum(encoded_nbytes(tuple(t.shape), enc) for n, t in model.named_parameters())
    per_job = {1: hybrid_bytes, 4: hybrid_bytes, 2: full_bytes, 3: full_bytes}
    jobs = 0
    for p in part:  # a row per update (a device may send two into one buffer), with that update's bytes
        if p["contributed"]:
            assert p["bytes_up"] == per_job[p["device"]], p
            jobs += 1
    assert hybrid_bytes < full_bytes
    # the push budget of the sync run's updates, each push of buffer_k of them
    rows = [r for r in _rows(path) if r["kind"] == "fog_round"]
    assert len(rows) == push_budget(exp) and all(r["participants"] == exp.buffered.buffer_k for r in rows)
    assert jobs == push_budget(exp) * exp.buffered.buffer_k
