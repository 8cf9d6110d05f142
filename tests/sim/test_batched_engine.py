"""The batched engine (``[runtime] engine = "batched"``) against what it stands for.

- Device by device: every task's devices answer a train request as the agent's ClientApp does
  (``handle_train`` on the device's own store, the reply through its wire form), in fp32 and int8.
- Fog by fog: a :class:`BatchedFog` round equals a :class:`FogAggregator` round over the real ClientApp
  (``LoopbackGrid``), plain, robust and with client-level DP's clipping, with bad devices (NaN data, a norm
  over the bound) refused or declined as the real round refuses or declines them.
- The pieces: ``store_rows`` against one ``store`` per delta, ``int8_roundtrip`` against the codec, the device
  table and the ``sampled`` partition, and every setting the engine does not run refused by name.
- Whole runs: the same experiment through both engines gives the same global versions (``test_same_run*``).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyprstream.agent.client_app import app, handle_train, strategy_plan
from hyprstream.agent.profile import Strategy
from hyprstream.codec import decode_int8, encode_int8
from hyprstream.coreapi.records import Snapshot
from hyprstream.errors import ConfigError, ValidationError
from hyprstream.fog.aggregate import Aggregation, UpdateMatrix, UpdateSum
from hyprstream.fog.aggregator import FogAggregator, RoundPlan
from hyprstream.fog.loopback import LoopbackGrid
from hyprstream.learning.task import get_task
from hyprstream.learning.trainer import model_weights
from hyprstream.protocol import TrainReply, TrainRequest
from hyprstream.sim import partition
from hyprstream.sim.batched import BatchedDevices, BatchedFog, Job, int8_roundtrip
from hyprstream.sim.devices import FleetData
from hyprstream.store import Store
from hyprstream.store import layer_table as lt

pytestmark = pytest.mark.unit


def fleet_of(task, sizes, seed=0) -> FleetData:
    """Devices holding disjoint shares of the task's reference data (as the task loads it: what
    ``to_table`` takes)."""
    train, _ = task.load_reference_data(seed)
    order = np.random.default_rng(seed).permutation(len(train))
    return FleetData.from_parts(train, np.split(order[:sum(sizes)], np.cumsum(sizes)[:-1]))


def decoded(task, raw: FleetData) -> FleetData:
    """What the batched engine trains on: the device table decoded by the task, as a device decodes its store."""
    return FleetData.from_table(task, raw.to_table(task), len(raw))


def write_stores(task, raw: FleetData, root) -> list:
    """One store per device, as the Flower engine prepares them."""
    paths = []
    for i in range(len(raw)):
        path = root / f"device-{i}"
        with Store.open(path, create=True) as store:
            store.create_table(task.table, task.schema)
            store.append(task.table, task.to_table(raw.dataset(i)))
        paths.append(path)
    return paths


def assert_trained_alike(mine, theirs, *, step, what):
    """Batched and per-device training agree to float precision; where Adam's step sits on a ~0 gradient a
    rounding difference moves that element by a sliver of the step size (see tests/sim/test_batched.py); an
    int8 value may land one step (``step``) away where the two rounding inputs straddle a threshold."""
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=step, err_msg=what)
    close = np.isclose(mine, theirs, rtol=1e-4, atol=2e-6)
    assert close.mean() >= 0.98, f"{what}: {close.size - close.sum()} of {close.size} elements differ"


# every shipped task but text (a pretrained MiniLM: too large for a unit test's budget; its layers are
# Linear and LayerNorm, which the generic vmapped pass covers in the other tasks)
@pytest.mark.parametrize("name", ["digits", "digits-cnn", "sensor", "fashion_mnist"])
@pytest.mark.parametrize("encoding", ["fp32", "int8"])
def test_every_device_answers_as_the_client_app(tmp_path, name, encoding):
    task = get_task(name)
    model = task.build_model(seed=2)
    weights = model_weights(model)
    layers = tuple(task.layer_groups(model)[-2:])
    raw = fleet_of(task, [30, 9, 41])
    stores = write_stores(task, raw, tmp_path)
    seeds = (101, 102, 103)
    engine = BatchedDevices(task, decoded(task, raw), chunk=2)
    job = engine.submit(Job(weights, 7, name, layers, 5, 16, 0.01, encoding, (0, 1, 2), seeds))
    result = engine.result(job)
    assert not result.declined and len(result.rows) == 1 and engine.passes == 1
    rows = result.rows[0]
    assert list(rows.positions) == [0, 1, 2] and rows.layers == layers
    for i, (store, seed) in enumerate(zip(stores, seeds)):
        request = TrainRequest("m", 7, name, layers, 5, 16, 0.01, seed, weights, update_encoding=encoding)
        reply = TrainReply.from_content(handle_train(request, store).to_content())  # as the fog receives it
        assert list(rows.delta) == list(reply.delta)  # the model's order: the order int8 draws its rounding in
        assert rows.num_examples[i] == reply.num_examples
        assert rows.bytes_up[i] == reply.payload_bytes()
        assert rows.loss[i] == pytest.approx(reply.train_loss, rel=1e-5)
        for param, theirs in reply.delta.items():
            scale = float(np.abs(theirs).max()) / 127 if encoding == "int8" else 0.0
            assert_trained_alike(rows.delta[param][i], theirs, step=scale + 1e-3 * 0.01 * 5,
                                 what=f"{name} {encoding} {param} device {i}")


def test_strategies_as_the_client_app_plans_them():
    task = get_task("digits")
    weights = model_weights(task.build_model(seed=0))
    data = fleet_of(task, [20, 20, 20])
    engine = BatchedDevices(task, data)
    engine.strategies = (Strategy.FULL, Strategy.HYBRID, Strategy.MINIMAL)
    engine.hybrid_keep = (1, 1, 1)
    layers = ("fc1", "fc2", "head")
    job = engine.submit(Job(weights, 0, "digits", layers, 3, 8, 0.01, "fp32", (0, 1, 2), (1, 2, 3)))
    result = engine.result(job)
    request = TrainRequest("m", 0, "digits", layers, 3, 8, 0.01, 0, {})
    assert result.declined == {2: strategy_plan(request, Strategy.MINIMAL, 1).reason}
    by_layers = {r.layers: list(r.positions) for r in result.rows}
    assert by_layers == {layers: [0], tuple(strategy_plan(request, Strategy.HYBRID, 1).layers): [1]}
    assert engine.passes == 2  # one pass per set of trained layers


def test_fogs_on_the_same_version_share_one_pass():
    task = get_task("digits")
    weights = model_weights(task.build_model(seed=0))
    engine = BatchedDevices(task, fleet_of(task, [10] * 6))
    a = engine.submit(Job(weights, 3, "digits", ("head",), 2, 4, 0.01, "fp32", (0, 1, 2), (1, 2, 3)))
    b = engine.submit(Job({k: v.copy() for k, v in weights.items()}, 3, "digits", ("head",), 2, 4, 0.01, "int8",
                          (3, 4, 5), (4, 5, 6)))
    other = {k: v + 1 for k, v in weights.items()}
    c = engine.submit(Job(other, 3, "digits", ("head",), 2, 4, 0.01, "fp32", (0,), (9,)))
    engine.result(b)
    assert engine.passes == 2 and all(j.result is not None for j in (a, b, c))
    with pytest.raises(ValidationError, match="task 'sensor'"):
        engine.submit(Job(weights, 3, "sensor", ("head",), 2, 4, 0.01, "fp32", (0,), (1,)))


# -- fog rounds: BatchedFog against FogAggregator over the real ClientApp ----------------------------------


def snapshot_of(task, weights, version=4) -> Snapshot:
    return Snapshot("m", version, lt.to_table(weights, layer=task.layer_of), {})


def round_pair(tmp_path, plan: RoundPlan, raw: FleetData, *, clip=None, seed=5):
    """One round of fog ``fog-a`` (seed ``seed``) over every device of ``data``: through the real ClientApp and
    through the batched engine; both ``Gathered``."""
    task = get_task(plan.task)
    weights = model_weights(task.build_model(seed=1))
    stores = write_stores(task, raw, tmp_path)
    nodes = list(range(len(raw)))
    grid = LoopbackGrid(app, nodes, node_config=lambda n: {"store-dir": str(stores[n])})
    real = FogAggregator("fog-a", grid, nodes, None, "m", plan, seed=seed)
    batched = BatchedFog("fog-a", BatchedDevices(task, decoded(task, raw)), nodes, None, "m", plan, seed=seed)
    base = snapshot_of(task, weights)
    return [fog.gather(fog.start_round(3, base), clip=clip) for fog in (real, batched)]


def assert_gathered_alike(real, mine, *, step):
    for key in ("declined", "refused", "failed", "bytes_up", "contributors", "uplink"):
        assert getattr(mine, key) == getattr(real, key), key
    assert [r.split(":")[0] for r in mine.reasons] == [r.split(":")[0] for r in real.reasons]
    for (la, na), (lb, nb) in zip(mine.losses, real.losses, strict=True):
        assert na == nb and la == pytest.approx(lb, rel=1e-5)
    for layer, m in mine.matrices.items():
        r = real.matrices[layer]
        assert (m.count, type(m)) == (r.count, type(r))
        if m.count:
            assert m.total_weight == pytest.approx(r.total_weight)
            for name, value in m.aggregate(Aggregation.MEAN if isinstance(m, UpdateSum) else Aggregation.MEDIAN).items():
                theirs = r.aggregate(Aggregation.MEAN if isinstance(r, UpdateSum) else Aggregation.MEDIAN)[name]
                assert_trained_alike(value, theirs, step=step, what=f"{layer}/{name}")


@pytest.mark.parametrize("encoding, aggregation", [("fp32", Aggregation.MEAN), ("int8", Aggregation.MEAN),
                                                   ("fp32", Aggregation.MEDIAN)])
def test_a_batched_round_gathers_what_the_client_app_round_gathers(tmp_path, encoding, aggregation):
    plan = RoundPlan(task="digits", layers=("fc2", "head"), local_steps=4, batch_size=8, lr=0.01,
                     update_encoding=encoding, aggregation=aggregation)
    real, mine = round_pair(tmp_path, plan, fleet_of(get_task("digits"), [25, 12, 30, 8]))
    assert len(real.contributors) == 4
    assert_gathered_alike(real, mine, step=1e-4 + (2e-3 if encoding == "int8" else 0))


def test_client_level_dp_clips_each_device_as_the_fog_does(tmp_path):
    plan = RoundPlan(task="digits", layers=("head",), local_steps=6, batch_size=8, lr=0.05)
    real, mine = round_pair(tmp_path, plan, fleet_of(get_task("digits"), [25, 12, 30]), clip=0.01)
    assert mine.matrices["head"].total_weight == 3.0  # weight 1 per clipped delta
    assert_gathered_alike(real, mine, step=1e-6)


def test_bad_devices_are_refused_or_declined_as_the_real_round_does(tmp_path):
    task = get_task("digits")
    data = fleet_of(task, [20, 20, 20])
    x = data.x.copy()
    x[data.offsets[1]:data.offsets[2]] = np.nan  # device 1's data is poisoned: its delta is NaN
    data = FleetData(x, data.y, data.offsets)
    # fp32: the fog refuses the NaN delta; int8: the agent cannot encode it and its ClientApp fails
    for encoding, attr in (("fp32", "refused"), ("int8", "failed")):
        plan = RoundPlan(task="digits", layers=("head",), local_steps=2, batch_size=8, lr=0.01,
                         update_encoding=encoding)
        real, mine = round_pair(tmp_path / encoding, plan, data)
        assert getattr(mine, attr) == getattr(real, attr) == 1 and len(mine.contributors) == 2
        assert_gathered_alike(real, mine, step=1e-4 + (2e-3 if encoding == "int8" else 0))
    # a norm bound every update exceeds: all refused, nothing kept
    plan = RoundPlan(task="digits", layers=("head",), local_steps=2, batch_size=8, lr=0.01, max_update_norm=1e-9)
    real, mine = round_pair(tmp_path / "bound", plan, fleet_of(task, [20, 20]))
    assert mine.refused == real.refused == 2 and mine.matrices["head"].count == 0
    assert all("exceeds the bound" in r for r in mine.reasons)


def test_a_round_not_started_by_the_fog_is_refused():
    task = get_task("digits")
    engine = BatchedDevices(task, fleet_of(task, [10, 10]))
    plan = RoundPlan(task="digits", layers=("head",), local_steps=1, batch_size=4, lr=0.01)
    a = BatchedFog("a", engine, [0], None, "m", plan)
    b = BatchedFog("b", engine, [1], None, "m", plan)
    pending = a.start_round(1, snapshot_of(task, model_weights(task.build_model(seed=0))))
    with pytest.raises(ValidationError, match="was not started here"):
        b.gather(pending)
    with pytest.raises(ValidationError, match="has no agents"):
        a.start_round(2, pending.base, nodes=[1])


# -- the pieces ---------------------------------------------------------------------------------------------


deltas = st.integers(1, 6).flatmap(lambda k: st.tuples(
    st.just(k),
    st.lists(st.floats(-1e3, 1e3, width=32), min_size=k * 5, max_size=k * 5),
    st.lists(st.floats(0, 1e4), min_size=k, max_size=k)))


@given(deltas, st.sampled_from([UpdateSum, UpdateMatrix]), st.integers(0, 2))
@settings(max_examples=60, deadline=None)
def test_store_rows_keeps_what_one_store_per_delta_keeps(case, kind, before):
    k, values, weights = case
    table = np.array(values, np.float32).reshape(k, 5)
    rows = {"w": np.ascontiguousarray(table[:, :3]), "b": np.ascontiguousarray(table[:, 3:])}
    shapes = {"w": (3,), "b": (2,)}
    one, many = kind(shapes, k + before), kind(shapes, k + before)
    for i in range(before):  # rows already kept, with a weight the new ones may exceed
        for m in (one, many):
            m.store({"w": np.full(3, i + 1.0, np.float32), "b": np.ones(2, np.float32)}, 0.5)
    for i in range(k):
        one.store({n: m[i] for n, m in rows.items()}, weights[i])
    many.store_rows(rows, np.array(weights))
    assert many.count == one.count and many.total_weight == pytest.approx(one.total_weight)
    if one.total_weight > 0:
        for name, value in many.mean().items():
            np.testing.assert_allclose(value, one.mean()[name], rtol=1e-5, atol=1e-3)


def test_store_rows_refuses_what_does_not_fit():
    m = UpdateSum({"w": (2,)}, 2)
    with pytest.raises(ValidationError, match="more than 2"):
        m.store_rows({"w": np.zeros((3, 2), np.float32)}, np.ones(3))
    with pytest.raises(ValidationError, match="expected \\(1, 2\\)"):
        m.store_rows({"w": np.zeros((1, 3), np.float32)}, np.ones(1))
    with pytest.raises(ValidationError, match="finite and >= 0"):
        m.store_rows({"w": np.zeros((1, 2), np.float32)}, np.array([-1.0]))
    with pytest.raises(ValidationError, match="rows of"):
        m.store_rows({"v": np.zeros((1, 2), np.float32)}, np.ones(1))
    assert m.count == 0


@given(st.lists(st.tuples(st.sampled_from(["normal", "zeros", "nan", "tiny"]), st.integers(0, 2**40)),
                min_size=1, max_size=6))
@settings(max_examples=60, deadline=None)
def test_int8_roundtrip_is_the_codec_row_by_row(devices):
    rng = np.random.default_rng(0)
    shapes = {"a": (3, 4), "b": (5,)}
    delta = {n: np.zeros((len(devices), *s), np.float32) for n, s in shapes.items()}
    for i, (kind, _) in enumerate(devices):
        for n, s in shapes.items():
            delta[n][i] = {"normal": rng.normal(size=s), "zeros": np.zeros(s), "tiny": np.full(s, 1e-40),
                           "nan": np.full(s, np.nan)}[kind] if (kind != "zeros" or n == "b") else rng.normal(size=s)
    got, bad = int8_roundtrip(delta, [seed for _, seed in devices])
    for i, (kind, seed) in enumerate(devices):
        assert bad[i] == (kind == "nan")
        if kind == "nan":
            continue
        codec = np.random.default_rng([seed, 0x18])
        for n in shapes:
            np.testing.assert_array_equal(got[n][i], decode_int8(*encode_int8(delta[n][i], codec)))


def test_the_device_table_round_trips_and_refuses_what_is_not_one(tmp_path):
    task = get_task("digits")
    data = fleet_of(task, [5, 0, 7])
    path = tmp_path / "devices.arrow"
    data.save(task, path)
    back = FleetData.load(task, path, 3)
    assert list(back.sizes) == [5, 0, 7]
    np.testing.assert_array_equal(back.x, data.x)
    np.testing.assert_array_equal(back.dataset(2).y, data.dataset(2).y)
    table = data.to_table(task)
    with pytest.raises(ValidationError, match=r"ids must lie in \[0, 2\)"):
        FleetData.from_table(task, table, 2)
    with pytest.raises(ValidationError, match="grouped by device"):
        FleetData.from_table(task, table.take(pa.array(np.arange(len(table))[::-1])), 3)
    with pytest.raises(ValidationError, match="no 'device' column"):
        FleetData.from_table(task, table.drop_columns(["device"]), 3)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(ValidationError, match="not a readable device table"):
        FleetData.load(task, path, 3)


def test_sampled_partition():
    rng = np.random.default_rng(3)
    parts = partition.sampled(100, 1000, 20, 40, rng)
    sizes = np.array([len(p) for p in parts])
    assert len(parts) == 1000 and sizes.min() >= 20 and sizes.max() <= 40
    counts = np.bincount(np.concatenate(parts), minlength=100)
    assert counts.max() - counts.min() <= 1  # consecutive passes: every sample used as evenly as possible
    again = partition.sampled(100, 1000, 20, 40, np.random.default_rng(3))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    with pytest.raises(ValidationError, match="cannot be drawn from 10"):
        partition.sampled(10, 5, 5, 11, rng)
    with pytest.raises(ValidationError, match="cannot draw"):
        partition.sampled(10, 5, 6, 5, rng)


def test_what_the_batched_engine_does_not_run_is_refused_by_name(tmp_path):
    from hyprstream.config import parse
    from hyprstream.sim.experiment import Experiment

    base = {"name": "x", "runtime": {"engine": "batched"}}
    cases = {
        "training.mode": {"training": {"mode": "buffered"}},
        "runtime.ray_address": {"runtime": {"engine": "batched", "ray_address": "127.0.0.1:1"}},
        "runtime.device": {"runtime": {"engine": "batched", "device": "tpu"}},
    }
    for key, extra in cases.items():
        with pytest.raises(ConfigError) as err:
            parse(Experiment, {**base, **extra})
        assert err.value.key == key or key in str(err.value), (key, str(err.value))
    with pytest.raises(ConfigError, match="engine = \\\\?\"batched\\\\?\""):
        parse(Experiment, {"name": "x", "fleet": {"fogs": 3, "agents_per_fog": 5000},
                           "partition": {"scheme": "sampled"}})
    exp = parse(Experiment, {"name": "x", "fleet": {"fogs": 3, "agents_per_fog": 5000},
                             "partition": {"scheme": "sampled"}, "runtime": {"engine": "batched"}})
    assert exp.num_agents == 15000
    assert replace(exp.runtime, device="cpu").device == "cpu"


def test_the_frozen_cut_is_made_only_where_it_is_the_same_function():
    import torch
    from torch import nn

    from hyprstream.sim.batched import split_frozen

    task = get_task("digits")
    model = task.build_model(seed=0)
    x = torch.randn(6, 64)
    cut = split_frozen(model, ["head.weight", "head.bias"], x)
    with torch.no_grad():
        torch.testing.assert_close(cut.suffix(*cut.prefix(x)), model(x))
    assert split_frozen(model, ["fc1.weight", "head.weight"], x) is None  # the trained part reads the input

    class Mixing(nn.Module):  # the frozen part centres each batch: an example's value depends on the others
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.body(x)
            return self.head(h - h.mean(dim=0))

    assert split_frozen(Mixing(), ["head.weight", "head.bias"], torch.randn(5, 4)) is None
    with_dropout = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    assert split_frozen(with_dropout, ["2.weight", "2.bias"], torch.randn(5, 4)) is None
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert split_frozen(plain, ["2.weight", "2.bias"], torch.randn(5, 4)) is not None


# -- DP-SGD: each device's Poisson samples, clipping, noise and ledger, as its ClientApp's -----------------


@pytest.mark.parametrize("name, layers", [("digits", ("head",)), ("digits", ("fc2", "head")),
                                          ("digits-cnn", ("conv2", "fc", "head"))])  # conv: Opacus' clipping
def test_private_devices_answer_as_the_client_app(tmp_path, name, layers):
    from hyprstream.agent.client_app import PrivateTraining
    from hyprstream.privacy.dpsgd import DpSgd, ledger_dir_for
    from hyprstream.privacy.ledger import Budget, PrivacyLedger, Scope

    task = get_task(name)
    weights = model_weights(task.build_model(seed=2))
    raw = fleet_of(task, [30, 9, 41])
    stores = write_stores(task, raw, tmp_path / "real")
    settings = DpSgd(1.1, 0.5, Budget(50.0, 1e-5), secure=False)
    engine = BatchedDevices(task, decoded(task, raw), chunk=2)
    engine.dpsgd, engine.ledgers = settings, tmp_path / "batched"
    seeds = (7, 8, 9)
    job = engine.submit(Job(weights, 3, name, layers, 6, 8, 0.01, "fp32", (0, 1, 2), seeds, model="m",
                            group="fog-0/round-1"))
    rows = engine.result(job).rows[0]
    for i, (store, seed) in enumerate(zip(stores, seeds)):
        request = TrainRequest("m", 3, name, layers, 6, 8, 0.01, seed, weights)
        private = PrivateTraining(settings, ledger_dir_for(store), f"device-{i}")
        reply = handle_train(request, store, privacy=private, round="fog-0/round-1")
        assert rows.loss[i] == pytest.approx(reply.train_loss, rel=1e-4)
        for param, theirs in reply.delta.items():
            assert_trained_alike(rows.delta[param][i], theirs, step=1e-3 * 0.01 * 6, what=f"{name} {param} {i}")
        # the same charge in the same ledger format: one entry per device, its event and round
        with Store.open(ledger_dir_for(tmp_path / "batched" / f"device-{i:04d}"), readonly=True) as mine, \
                Store.open(ledger_dir_for(store), readonly=True) as theirs:
            a = PrivacyLedger(mine).entries(Scope.DEVICE)
            b = PrivacyLedger(theirs).entries(Scope.DEVICE)
            assert [(e.charge.event, e.charge.round, e.epsilon) for e in a] == \
                [(e.charge.event, e.charge.round, e.epsilon) for e in b]


def test_a_device_over_its_budget_declines_and_trains_nothing(tmp_path):
    from hyprstream.agent.client_app import BUDGET_DECLINE
    from hyprstream.privacy.dpsgd import DpSgd
    from hyprstream.privacy.ledger import Budget

    task = get_task("digits")
    weights = model_weights(task.build_model(seed=0))
    engine = BatchedDevices(task, decoded(task, fleet_of(task, [8, 200])))
    # one round of 40 steps at rate 1 (8 examples, batch 8) costs far more than 5; at rate 0.04 it does not
    engine.dpsgd, engine.ledgers = DpSgd(1.0, 1.0, Budget(5.0, 1e-5), secure=False), tmp_path
    result = engine.result(engine.submit(Job(weights, 0, "digits", ("head",), 40, 8, 0.01, "fp32", (0, 1), (1, 2),
                                             model="m", group="g")))
    assert result.declined == {0: BUDGET_DECLINE}
    assert [list(r.positions) for r in result.rows] == [[1]]


# -- secure aggregation: the protocol's output, computed ------------------------------------------------------


def secure_fog(task, raw, *, secagg, strategies=None):
    from hyprstream.privacy.noise import SeededRandom
    from hyprstream.sim.batched import BatchedSecureFog

    engine = BatchedDevices(task, decoded(task, raw))
    if strategies is not None:
        engine.strategies, engine.hybrid_keep = strategies, [1] * len(strategies)
    plan = RoundPlan(task=task.name, layers=("fc2", "head"), local_steps=5, batch_size=8, lr=0.01)
    fog = BatchedFog("fog-a", engine, list(range(len(raw))), None, "m", plan, seed=4)
    return BatchedSecureFog(fog, secagg, source=SeededRandom(0))


def test_a_batched_secure_round_releases_the_mean_of_the_clipped_quantized_inputs(tmp_path):
    from hyprstream.privacy.config import SecAggConfig
    from hyprstream.privacy.contribution import encode
    from hyprstream.privacy.noise import SeededRandom
    from hyprstream.protocol import train_seed

    task = get_task("digits")
    raw = fleet_of(task, [30, 25, 40, 12])
    secure = secure_fog(task, raw, secagg=SecAggConfig(clip=0.05, min_clients=2))
    base = snapshot_of(task, model_weights(task.build_model(seed=1)))
    pending = secure.start_round(1, base)
    counts = {"declined": 0, "refused": 0, "failed": 0, "silent": 0}
    uplink: dict = {}
    result = secure._run_stages(pending, counts, [], uplink, {})
    delta, _, transcript = secure._release(pending, result)
    assert result.survivors == (1, 2, 3, 4) and not any(counts.values()) and len(transcript) == 64
    assert set(uplink) == {0, 1, 2, 3} and set(uplink.values()) == {pending.spec.dim * pending.spec.quantizer.dtype.itemsize}
    # the reference: each device's ClientApp training, encoded by hand as its middleware encodes it, summed
    spec, stores = pending.spec, write_stores(task, raw, tmp_path)
    total = np.zeros(spec.dim, dtype=np.int64)
    for pos, store in enumerate(stores, start=1):
        seed = train_seed(4, 1, pos - 1)
        reply = handle_train(TrainRequest("m", base.version, "digits", ("fc2", "head"), 5, 8, 0.01, seed,
                                          lt.to_arrays(base.table)), store)
        enc = encode(reply.delta, reply.num_examples, spec, SeededRandom(train_seed(seed, 0, pos)))
        total += spec.quantizer.decode_sum(enc.vector, 1)
    want = spec.layout.unflatten(spec.quantizer.dequantize(total[:spec.layout.size]) / 4, np.float32)
    # the field's levels (here ~1e-9) are finer than float32 training agrees to: float tolerance, not a level
    for name, value in want.items():
        np.testing.assert_allclose(delta[name], value, rtol=1e-4, atol=1e-8, err_msg=name)


def test_a_batched_secure_round_drops_and_aborts_as_the_protocol_does():
    from hyprstream.privacy.config import SecAggConfig

    task = get_task("digits")
    raw = fleet_of(task, [20] * 5)
    # two devices in minimal: three inputs, fewer than min_clients = 4: nothing released, the reason named
    secure = secure_fog(task, raw, secagg=SecAggConfig(clip=0.5, min_clients=4),
                        strategies=(Strategy.FULL, Strategy.MINIMAL, Strategy.FULL, Strategy.MINIMAL, Strategy.FULL))
    base = snapshot_of(task, model_weights(task.build_model(seed=1)))
    round_ = secure.finish_round(secure.start_round(1, base, nodes=[0, 1, 2, 3, 4]))
    assert round_.version is None and round_.declined == 2 and round_.participants == 0
    assert any("aborted" in r and "at least 4 needed" in r for r in round_.reasons), round_.reasons
    # a hybrid device trains the head only: its input carries zeros and a zero weight for fc2, as its
    # middleware encodes it, and counts
    secure = secure_fog(task, raw, secagg=SecAggConfig(clip=0.5, min_clients=2),
                        strategies=(Strategy.HYBRID,) + (Strategy.FULL,) * 4)
    pending = secure.start_round(1, base)
    counts = {"declined": 0, "refused": 0, "failed": 0, "silent": 0}
    result = secure._run_stages(pending, counts, [], {}, {})
    assert pending.spec.n_groups == 2 and result.survivors == (1, 2, 3, 4, 5) and not any(counts.values())
