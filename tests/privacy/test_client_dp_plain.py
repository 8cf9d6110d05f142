"""Client-level DP on plain rounds (no SecAgg+): the fog clips each agent's delta to C over all its layer groups,
sums, adds N(0, (zC)^2) and divides by the fixed expected count (``hyprstream.fog.dp.PrivateFogAggregator``), over
the loopback grid with the agent's real train handler and a real core Flight server on loopback."""

from __future__ import annotations

import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from flwr.clientapp import ClientApp
from hypothesis import given, settings
from hypothesis import strategies as st
from privacy_helpers import LoopbackCore, make_devices, start_core

from hyprstream.agent.client_app import handle_train, query_device
from hyprstream.errors import ValidationError
from hyprstream.fog.aggregate import UpdateSum
from hyprstream.fog.aggregator import FogAggregator, RoundPlan
from hyprstream.fog.dp import PrivateFogAggregator
from hyprstream.fog.loopback import LoopbackGrid
from hyprstream.privacy.config import ClientDpConfig
from hyprstream.privacy.noise import SeededRandom, gaussian
from hyprstream.protocol import ReplyStatus, TrainReply, TrainRequest, train_seed
from hyprstream.store import layer_table as lt

pytestmark = pytest.mark.unit

PLAN = RoundPlan(task="digits", layers=("fc2", "head"), local_steps=3, batch_size=16, lr=0.05, timeout_s=1.0)
HYBRID = "device-0000"  # trains the last requested layer group only


def _plan_for(store: Path, request: TrainRequest):
    from hyprstream.agent.policy import TrainPlan

    if store.name != HYBRID:
        return None
    return TrainPlan(True, "hybrid", request.layers[-1:], request.local_steps, request.batch_size, "cpu", math.inf)


def _app() -> ClientApp:
    from flwr.app import Message

    def train(msg, context):
        request = TrainRequest.from_content(msg.content)
        store = Path(context.node_config["store-dir"])
        reply = handle_train(request, store, plan=_plan_for(store, request))
        return Message(reply.to_content(), reply_to=msg)

    app = ClientApp()
    app.query("device")(query_device)
    app.train("layerwise")(train)
    return app


@pytest.fixture()
def core(tmp_path: Path):
    core = start_core(tmp_path / "core")
    yield core
    core.close()


def _fog(tmp_path: Path, core: LoopbackCore, n: int, dp: ClientDpConfig, *, seed: int = 7):
    paths = make_devices(tmp_path, n)
    nodes = list(range(101, 101 + n))
    store_of = dict(zip(nodes, paths, strict=True))
    grid = LoopbackGrid(_app(), nodes, node_config=lambda node: {"store-dir": str(store_of[node])})
    fog = FogAggregator("fog-a", grid, nodes, core.client, "digits", PLAN, seed=0)
    return PrivateFogAggregator(fog, dp, source=SeededRandom(seed)), store_of


def _accountant_epsilon(q: float, z: float, rounds: int, delta: float) -> tuple[float, float]:
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)),
                                              rounds)
    return (dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(delta),
            dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta))


def test_a_plain_round_releases_the_clipped_sum_plus_noise_over_the_fixed_denominator(tmp_path, core):
    """Every agent's training redone by hand: each delta clipped to C over the groups it trained (the hybrid
    device's fc2 counts as zeros), summed, plus the seeded N(0, (zC)^2), over D = q n; core gets no count."""
    clip, z = 0.05, 1.0
    dp = ClientDpConfig(noise_multiplier=z, clip=clip)
    private, store_of = _fog(tmp_path, core, 4, dp)
    base = private.pull()
    result = private.run_round(1)
    assert result.version == 1 and result.participants == 4 and core.pushes[0]["participants"] == 0

    index = {node: i for i, node in enumerate(private.node_ids)}
    names = lt.select_layers(base.table, PLAN.layers).column("name").to_pylist()
    shapes = {n: a.shape for n, a in lt.to_arrays(base.table).items() if n in names}
    total = {n: np.zeros(shapes[n], dtype=np.float64) for n in names}
    norms = []
    for node, store in store_of.items():
        request = TrainRequest("digits", base.version, "digits", PLAN.layers, PLAN.local_steps, PLAN.batch_size,
                               PLAN.lr, train_seed(0, 1, index[node]), lt.to_arrays(base.table))
        reply = handle_train(request, store, plan=_plan_for(store, request))
        assert reply.status is ReplyStatus.OK
        norm = math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in reply.delta.values()))
        norms.append(norm)
        scale = min(1.0, clip / (norm * (1 + 1e-6)))
        for name, value in reply.delta.items():
            total[name] += value.astype(np.float64) * scale
        if store.name == HYBRID:
            assert set(reply.layers) == {"head"}
    assert min(norms) > clip  # every delta was clipped
    noise = gaussian(SeededRandom(7), sum(int(np.prod(s)) for s in shapes.values()), z * clip)
    at = 0
    pushed = core.pushes[0]["delta"]
    assert set(pushed) == set(names)  # the hybrid-skipped group is released too (zeros plus noise)
    for name in sorted(names):  # the noise vector runs over the parameters by name
        size = int(np.prod(shapes[name]))
        expected = (total[name].ravel() + noise[at:at + size]) / 4.0
        np.testing.assert_allclose(pushed[name].ravel(), expected, rtol=1e-5, atol=1e-7)
        at += size

    record = core.pushes[0]["privacy"]
    pld, rdp = _accountant_epsilon(1.0, z, 1, dp.delta)
    assert pld * 0.999 <= record["epsilon"] <= rdp * 1.001
    assert record["clip"] == clip and record["expected_participants"] == 4.0 and record["noise_multiplier"] == z
    (audited,) = core.audited_pushes()
    assert audited["privacy"]["epsilon"] == record["epsilon"] and audited["participants"] == 0


def test_int8_replies_are_clipped_as_the_fog_decodes_them(tmp_path, core):
    """With int8 updates the fog clips what it decodes (each tensor's int8 values times its scale): the release
    is the sum of the decoded, clipped deltas plus the noise, over D."""
    from dataclasses import replace

    clip = 0.05
    private, store_of = _fog(tmp_path, core, 3, ClientDpConfig(noise_multiplier=1.0, clip=clip))
    private.fog.plan = replace(PLAN, update_encoding="int8")
    base = private.pull()
    assert private.run_round(1).version == 1
    index = {node: i for i, node in enumerate(private.node_ids)}
    names = lt.select_layers(base.table, PLAN.layers).column("name").to_pylist()
    total: dict[str, np.ndarray] = {}
    for node, store in store_of.items():
        request = TrainRequest("digits", base.version, "digits", PLAN.layers, PLAN.local_steps, PLAN.batch_size,
                               PLAN.lr, train_seed(0, 1, index[node]), lt.to_arrays(base.table),
                               update_encoding="int8")
        sent = handle_train(request, store, plan=_plan_for(store, request))
        decoded = TrainReply.from_content(sent.to_content()).delta  # what travels, as the fog reads it
        assert any(not np.array_equal(decoded[n], sent.delta[n]) for n in decoded)  # int8 is lossy
        norm = math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in decoded.values()))
        scale = min(1.0, clip / (norm * (1 + 1e-6)))
        for name, value in decoded.items():
            total[name] = total.get(name, 0.0) + value.astype(np.float64) * scale
    shapes = {n: a.shape for n, a in lt.to_arrays(base.table).items() if n in names}
    noise = gaussian(SeededRandom(7), sum(int(np.prod(s)) for s in shapes.values()), clip)
    at = 0
    for name in sorted(names):
        size = int(np.prod(shapes[name]))
        part = total.get(name, np.zeros(shapes[name]))
        np.testing.assert_allclose(core.pushes[0]["delta"][name].ravel(), (part.ravel() + noise[at:at + size]) / 3.0,
                                   rtol=1e-5, atol=1e-7)
        at += size


def test_a_started_round_releases_even_when_nobody_took_part(tmp_path, core):
    """Whether a round releases must not depend on who took part: a round none of whose agents is sampled (or
    answers) releases the noise alone over the same D, and is charged like any other."""
    dp = ClientDpConfig(noise_multiplier=1.0, clip=0.5)
    private, _ = _fog(tmp_path, core, 3, dp, seed=11)
    base = private.pull()
    result = private.run_round(1, nodes=())
    assert result.version == 1 and result.participants == 0 and result.nodes == ()
    names = sorted(lt.select_layers(base.table, PLAN.layers).column("name").to_pylist())
    shapes = {n: a.shape for n, a in lt.to_arrays(base.table).items() if n in names}
    noise = gaussian(SeededRandom(11), sum(int(np.prod(s)) for s in shapes.values()), 0.5)
    pushed = np.concatenate([core.pushes[0]["delta"][n].ravel() for n in names])
    np.testing.assert_allclose(pushed, noise / 3.0, rtol=1e-5, atol=1e-7)  # D = q n = 3
    pld, rdp = _accountant_epsilon(1.0, 1.0, 1, dp.delta)
    assert pld * 0.999 <= core.pushes[0]["privacy"]["epsilon"] <= rdp * 1.001


def test_the_budget_stops_plain_private_rounds(tmp_path, core):
    dp = ClientDpConfig(noise_multiplier=1.0, clip=0.5, epsilon_budget=8.0)
    private, _ = _fog(tmp_path, core, 3, dp)
    rounds = [private.run_round(r) for r in (1, 2, 3)]
    assert [r.version for r in rounds] == [1, 2, None]  # 4.38, 6.57, then 8.39 > 8
    assert rounds[2].nodes == () and any("over the budget" in why for why in rounds[2].reasons)
    for r, push in enumerate(core.pushes, start=1):
        pld, rdp = _accountant_epsilon(1.0, 1.0, r, 1e-5)
        assert pld * 0.999 <= push["privacy"]["epsilon"] <= rdp * 1.001
    assert private.spent() == pytest.approx(core.pushes[-1]["privacy"]["epsilon"])


def test_a_plain_private_fog_refuses_what_it_cannot_account(tmp_path, core):
    from dataclasses import replace

    from hyprstream.fog.aggregate import Aggregation
    from hyprstream.privacy.client_dp import NoisePlacement

    fog = FogAggregator("fog-a", LoopbackGrid(_app(), [1]), [1], core.client, "digits", PLAN)
    with pytest.raises(ValidationError, match="needs privacy.client_dp.clip"):
        PrivateFogAggregator(fog, ClientDpConfig(noise_multiplier=1.0))
    with pytest.raises(ValidationError, match="inside SecAgg"):
        PrivateFogAggregator(fog, ClientDpConfig(noise_multiplier=1.0, clip=1.0, placement=NoisePlacement.DISTRIBUTED))
    fog.plan = replace(PLAN, aggregation=Aggregation.MEDIAN)
    with pytest.raises(ValidationError, match="calibrated to the mean"):
        PrivateFogAggregator(fog, ClientDpConfig(noise_multiplier=1.0, clip=1.0))


SHAPES = {"w": (3, 4), "b": (4,)}
_finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)


def _delta(values: list[float]) -> dict[str, np.ndarray]:
    flat = np.asarray(values, dtype=np.float32)
    return {"w": flat[:12].reshape(3, 4), "b": flat[12:]}


def _clipped_sum(fog: FogAggregator, deltas: list[dict[str, np.ndarray]], clip: float) -> np.ndarray:
    matrices = {"g": UpdateSum(SHAPES, capacity=len(deltas) + 1)}
    for d in deltas:
        fog._add(matrices, TrainReply(ReplyStatus.OK, 0, ("g",), d, num_examples=10), clip=clip)
    m = matrices["g"]
    if not m.count:
        return np.zeros(16)
    mean = m.mean()
    return np.concatenate([mean["w"].ravel(), mean["b"].ravel()]).astype(np.float64) * m.total_weight


@settings(max_examples=60, deadline=None)
@given(deltas=st.lists(st.lists(_finite, min_size=16, max_size=16), min_size=1, max_size=6),
       clip=st.floats(min_value=1e-3, max_value=10.0), drop=st.integers(min_value=0, max_value=5))
def test_adding_or_removing_one_agent_moves_the_clipped_sum_by_at_most_the_clip(deltas, clip, drop):
    """The sensitivity the accountant assumes: whatever one agent sends (a huge norm, a tiny one, zeros), the
    un-noised sum with it and without it differ by at most C in L2, and its weight is 1 whatever it claims."""
    fog = FogAggregator("fog-a", None, [1], None, "m", RoundPlan("digits", ("g",), 1, 1, 0.1))
    arrays = [_delta(v) for v in deltas]
    without = [a for i, a in enumerate(arrays) if i != drop % len(arrays)]
    diff = _clipped_sum(fog, arrays, clip) - _clipped_sum(fog, without, clip)
    assert float(np.linalg.norm(diff)) <= clip * (1 + 1e-5)
