"""Pieces of the simulator without Flower: natural partition, experiment checks, metrics tables."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from hyprstream.learning.task import get_task
from hyprstream.config import parse
from hyprstream.errors import ConfigError
from hyprstream.fog.aggregator import FogRound
from hyprstream.sim.experiment import Experiment, PartitionScheme, UpdateEncoding, load_experiment, reduced
from hyprstream.sim.harness import natural_groups, split
from hyprstream.sim.metrics import MetricsLog

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_natural_partition_gives_each_device_one_mote():
    exp = load_experiment(ROOT / "simulations" / "sensor-motes.toml")
    task = get_task("sensor")
    train, _ = task.load_reference_data(exp.seed)
    groups = natural_groups(task, exp, train)
    assert sorted(np.unique(groups)) == [1, 2, 3, 4]
    parts = split(exp, task, train)
    assert len(parts) == 4
    assert [set(groups[p]) for p in parts] == [{1}, {2}, {3}, {4}]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(train)))
    # the task's own split: the motes' readings in it add up to the training set, each mote non-empty
    assert all(len(p) > 1000 for p in parts)
    # reduced (CI) keeps one device per mote
    assert reduced(exp).num_agents == 4


def test_natural_partition_errors():
    exp = load_experiment(ROOT / "simulations" / "sensor-motes.toml")
    task = get_task("sensor")
    train, _ = task.load_reference_data(exp.seed)
    wrong = replace(exp, fleet=replace(exp.fleet, agents_per_fog=3))
    with pytest.raises(ConfigError, match="4 sources, but the fleet has 3 agents"):
        split(wrong, task, train)
    digits = replace(exp, task=replace(exp.task, name="digits"))
    dtask = get_task("digits")
    dtrain, _ = dtask.load_reference_data(0)
    with pytest.raises(ConfigError, match="no natural grouping"):
        split(digits, dtask, dtrain)


def test_experiment_takes_int8_with_secure_aggregation_and_refuses_an_unknown_encoding():
    data = {"name": "x", "training": {"update_encoding": "int8"}, "privacy": {"secagg": {"clip": 1.0}}}
    assert parse(Experiment, data).training.update_encoding is UpdateEncoding.INT8  # secure rounds in 16 bits
    ok = parse(Experiment, {"name": "x", "training": {"update_encoding": "int8"}})
    assert ok.training.update_encoding is UpdateEncoding.INT8
    with pytest.raises(ConfigError, match="update_encoding"):
        parse(Experiment, {"name": "x", "training": {"update_encoding": "int4"}})
    assert parse(Experiment, {"name": "x", "partition": {"scheme": "natural"}}).partition.scheme \
        is PartitionScheme.NATURAL


def _round(fog, step, nodes, contributors, up):
    return FogRound(fog=fog, round=step, base_version=0, version=1, layers=("fc1",), participants=len(contributors),
                    declined=0, refused=0, failed=0, bytes_up=sum(up.values()), bytes_down=10 * len(nodes),
                    train_loss=0.5, seconds=0.0, delta={"fc1.weight": np.zeros(3, np.float32)}, nodes=nodes,
                    contributors=contributors, uplink=up)


def test_metrics_tables(tmp_path):
    from hyprstream.privacy.accountant import GaussianEvent
    from hyprstream.privacy.ledger import Budget, Charge, PrivacyLedger, Scope
    from hyprstream.store import Store

    log = MetricsLog()
    device_of = {101: 0, 102: 1, 103: 2}
    for step, base in ((1, 0), (2, 2)):
        r = _round("fog-0", step, (101, 102), (101,), {101: 12, 102: 0})
        log.add_fog_round(r, accuracy=0.5, loss=1.0, wall_s=1.0, sim_s=step, bytes_core=12, client_epsilon=0.1 * step)
        log.add_participation(r, device_of)
        log.base_versions[step] = base
        log.add_global(step, base + 1, accuracy=0.5, loss=1.0, rounds=[r], wall_s=1.0, sim_s=step)
    # device 2's ledger: charges for the rounds that started from versions 0 and 2
    devices = tmp_path / "devices"
    budget = Budget(10.0, 1e-5)
    with Store.open(devices / "device-0002.privacy", create=True) as store:
        ledger = PrivacyLedger(store)
        eps = [ledger.charge(Scope.DEVICE, "device-0002", Charge(GaussianEvent(1.0, 0.01, 30), "m", v, f"r{v}",
                                                                  "dpsgd"), budget).epsilon for v in (0, 2)]
    log.read_device_privacy(devices, step_of=log.step_of_base)
    log.write_run(tmp_path)
    rows = pq.read_table(tmp_path / "metrics.parquet").to_pylist()
    g = [r for r in rows if r["kind"] == "global"]
    assert [r["bytes_core"] for r in g] == [12, 12]
    assert [r["client_epsilon"] for r in g] == pytest.approx([0.1, 0.2])
    assert [r["device_epsilon"] for r in g] == pytest.approx(eps)
    assert 0 < eps[0] < eps[1]
    part = pq.read_table(tmp_path / "participation.parquet").to_pylist()
    assert [(p["round"], p["device"], p["contributed"], p["bytes_up"]) for p in part] == [
        (1, 0, True, 12), (1, 1, False, 0), (2, 0, True, 12), (2, 1, False, 0)]
    priv = pq.read_table(tmp_path / "privacy.parquet").to_pylist()
    assert [(p["device"], p["round"]) for p in priv] == [(2, 1), (2, 2)]
    assert [p["epsilon"] for p in priv] == pytest.approx(eps)


@pytest.mark.integration
def test_central_reference(tmp_path):
    from hyprstream.learning.trainer import evaluate
    from hyprstream.sim import clock
    from hyprstream.sim.central import CENTRAL, run_central

    exp = load_experiment(ROOT / "simulations" / "quickstart.toml")
    exp = replace(exp, training=replace(exp.training, global_steps=2, local_steps=5))
    result = run_central(exp, tmp_path)
    rows = pq.read_table(tmp_path / "metrics.parquet").to_pylist()
    g = [r for r in rows if r["kind"] == "global"]
    assert [(r["fog"], r["round"], r["bytes_up"], r["bytes_down"]) for r in g] == [(CENTRAL, 1, 0, 0), (CENTRAL, 2, 0, 0)]
    task = get_task("digits")
    model = task.build_model(seed=exp.seed)
    n = sum(p.numel() for p in model.parameters())
    steps = 5 * exp.num_agents  # the fleet's minibatch steps of one round
    one = clock.compute_s(clock.training_flops(n, n, steps * exp.training.batch_size), 1.0)
    assert [r["sim_s"] for r in g] == pytest.approx([one, 2 * one])
    _, test = task.load_reference_data(exp.seed)
    _, untrained = evaluate(task, model, task.from_table(task.to_table(test)))
    assert g[-1]["accuracy"] == pytest.approx(result.final_accuracy)
    assert result.final_accuracy > untrained + 0.3
