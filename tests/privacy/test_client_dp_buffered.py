"""Client-level DP on buffered (FedBuff) fogs: each push is the sum of ``buffer_k`` updates, at most one per agent,
each clipped to C over all its layer groups and discounted by its public staleness weight, plus N(0, (2zC)^2),
over ``buffer_k`` (``BufferedFog(private=...)``); charged as the Gaussian mechanism at rate 1 with sensitivity 2C
(one agent's update replaced). Over the loopback grid with the agent's real train handler, a virtual clock and a
real core Flight server on loopback."""

from __future__ import annotations

import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from flwr.app import Message
from flwr.clientapp import ClientApp
from hypothesis import given, settings
from hypothesis import strategies as st
from privacy_helpers import LoopbackCore, make_devices, start_core

from hyprstream.agent.client_app import handle_train
from hyprstream.errors import HyprstreamError, ValidationError
from hyprstream.fog.aggregate import UpdateSum
from hyprstream.fog.aggregator import FogAggregator, RoundPlan
from hyprstream.fog.buffered import BufferedFog
from hyprstream.fog.dp import ClientDpRounds, PrivateFogAggregator
from hyprstream.fog.engine import buffered_privacy, run_buffered
from hyprstream.fog.loopback import LoopbackGrid
from hyprstream.privacy.config import ClientDpConfig
from hyprstream.privacy.noise import SeededRandom, gaussian
from hyprstream.protocol import ReplyStatus, TrainReply, TrainRequest
from hyprstream.store import layer_table as lt

pytestmark = pytest.mark.unit

PLAN = RoundPlan(task="digits", layers=("fc2", "head"), local_steps=3, batch_size=16, lr=0.05, timeout_s=30.0)
SECONDS = {101: 1.0, 102: 1.7, 103: 4.1}  # simulated seconds of each agent's job


class Agents:
    """The agent's real train handler, each reply kept by the request's seed; ``failing`` agents raise."""

    def __init__(self, failing=(), poisoned=()) -> None:
        self.replies: dict[int, TrainReply] = {}
        self.failing = set(failing)
        self.poisoned = set(poisoned)  # these send a delta of NaN
        self.app = ClientApp()

        @self.app.train("layerwise")
        def train(msg, context):
            if context.node_id in self.failing:
                raise RuntimeError("device fault")
            request = TrainRequest.from_content(msg.content)
            reply = handle_train(request, Path(context.node_config["store-dir"]))
            if context.node_id in self.poisoned:
                from dataclasses import replace

                reply = replace(reply, delta={n: np.full_like(v, np.nan) for n, v in reply.delta.items()})
            self.replies[request.seed] = reply
            return Message(reply.to_content(), reply_to=msg)


@pytest.fixture()
def core(tmp_path: Path):
    core = start_core(tmp_path / "core")
    yield core
    core.close()


def _fog(tmp_path: Path, core: LoopbackCore, dp: ClientDpConfig, agents: Agents, *, buffer_k: int = 2,
         ledger=None):
    nodes = sorted(SECONDS)
    store_of = dict(zip(nodes, make_devices(tmp_path, len(nodes)), strict=True))
    grid = LoopbackGrid(agents.app, nodes, node_config=lambda node: {"store-dir": str(store_of[node])})
    fog = FogAggregator("fog-a", grid, nodes, core.client, "digits", PLAN, seed=0)
    runner = PrivateFogAggregator(fog, dp, source=SeededRandom(7), ledger=ledger)
    return BufferedFog(fog, buffer_k=buffer_k, max_staleness=50, duration=lambda node, d: SECONDS[node],
                       private=buffered_privacy(runner))


def _epsilon(z: float, pushes: int, delta: float) -> tuple[float, float]:
    """PLD and RDP epsilon of ``pushes`` Gaussian mechanisms (multiplier z, nothing sampled), from dp-accounting."""
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), pushes)
    return (dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(delta),
            dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta))


def test_each_push_releases_the_clipped_discounted_sum_plus_noise_over_buffer_k(tmp_path, core):
    """Every push redone by hand from the replies the agents sent: each clipped to C (all their norms are above
    it), times 1/sqrt(1 + staleness), summed, plus the seeded N(0, (2zC)^2) (the draws in push order), over
    buffer_k = 2. No agent is twice in one push; core gets 0 participants; the epsilon after each push lies between
    dp-accounting's PLD and RDP values for that many Gaussian mechanisms at multiplier z."""
    from hyprstream.fog.engine import open_ledger
    from hyprstream.privacy.ledger import Scope

    clip, z = 0.05, 1.5
    dp = ClientDpConfig(noise_multiplier=z, clip=clip)
    agents = Agents()
    ledger = open_ledger(tmp_path / "ledger")
    fog = _fog(tmp_path, core, dp, agents, ledger=ledger)
    pushes = run_buffered([fog], max_pushes=4)
    assert [p.version for p in pushes] == [1, 2, 3, 4]
    assert all(len(set(p.contributors)) == len(p.contributors) == 2 for p in pushes)
    assert any(s > 0 for p in pushes for s in p.staleness)  # some updates are discounted
    assert [c["participants"] for c in core.pushes] == [0, 0, 0, 0]

    base = lt.to_arrays(fog._snapshot.table)
    names = sorted(lt.select_layers(fog._snapshot.table, PLAN.layers).column("name").to_pylist())
    size = sum(base[n].size for n in names)
    source = SeededRandom(7)
    norms = []
    for push, sent in zip(pushes, core.pushes, strict=True):
        total = {n: np.zeros(base[n].shape) for n in names}
        for node, dispatch, staleness in zip(push.contributors, push.dispatches, push.staleness, strict=True):
            reply = agents.replies[fog.fog.seed * 1_000_003 + dispatch * 1009 + fog.fog.node_ids.index(node)]
            assert reply.status is ReplyStatus.OK and reply.model_version == push.base_version - staleness
            norm = math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in reply.delta.values()))
            norms.append(norm)
            scale = min(1.0, clip / (norm * (1 + 1e-6))) / math.sqrt(1 + staleness)
            for name, value in reply.delta.items():
                total[name] += value.astype(np.float64) * scale
        noise = gaussian(source, size, z * 2 * clip)
        at = 0
        for name in names:  # the noise runs over the parameters by name
            n = base[name].size
            expected = (total[name].ravel() + noise[at:at + n]) / 2.0
            np.testing.assert_allclose(sent["delta"][name].ravel(), expected, rtol=1e-5, atol=1e-7)
            at += n
    assert min(norms) > clip
    for count, sent in enumerate(core.pushes, start=1):
        record = sent["privacy"]
        pld, rdp = _epsilon(z, count, dp.delta)
        assert pld * 0.999 <= record["epsilon"] <= rdp * 1.001
        assert record["sample_rate"] == 1.0 and record["sensitivity"] == 2 * clip and record["clip"] == clip
        assert record["expected_participants"] == 2.0
    entries = ledger.entries(Scope.MODEL, "digits")
    assert [e.charge.mechanism for e in entries] == ["client-gaussian-central-replace-one"] * 4
    assert all(e.charge.event.sample_rate == 1.0 and e.charge.event.noise_multiplier == z for e in entries)
    assert [e.charge.version for e in entries] == [1, 2, 3, 4]  # each bound to the version core committed
    ledger.store.close()


def test_a_refused_update_keeps_its_place_in_a_private_buffer_as_zeros(tmp_path, core):
    """Agent 101 sends NaN: it is refused (a reason says so) but its slot counts, as zeros, so that which agents
    fill a buffer does not depend on what an update holds; each push that has it releases the other update's
    clipped, discounted value plus the noise, over buffer_k = 2."""
    clip, z = 0.05, 1.0
    agents = Agents(poisoned={101})
    fog = _fog(tmp_path, core, ClientDpConfig(noise_multiplier=z, clip=clip), agents)
    pushes = run_buffered([fog], max_pushes=2)
    assert [p.version for p in pushes] == [1, 2]
    assert all(101 in p.contributors for p in pushes) and all(p.refused >= 1 for p in pushes)
    assert any("refused" in r and "NaN or Inf" in r for p in pushes for r in p.reasons)
    base = lt.to_arrays(fog._snapshot.table)
    names = sorted(lt.select_layers(fog._snapshot.table, PLAN.layers).column("name").to_pylist())
    source = SeededRandom(7)
    for push, sent in zip(pushes, core.pushes, strict=True):
        (other,) = [i for i, n in enumerate(push.contributors) if n != 101]
        node, dispatch, staleness = push.contributors[other], push.dispatches[other], push.staleness[other]
        reply = agents.replies[fog.fog.seed * 1_000_003 + dispatch * 1009 + fog.fog.node_ids.index(node)]
        norm = math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in reply.delta.values()))
        scale = min(1.0, clip / (norm * (1 + 1e-6))) / math.sqrt(1 + staleness)
        noise = gaussian(source, sum(base[n].size for n in names), z * 2 * clip)
        at = 0
        for name in names:
            n = base[name].size
            expected = (reply.delta[name].astype(np.float64).ravel() * scale + noise[at:at + n]) / 2.0
            np.testing.assert_allclose(sent["delta"][name].ravel(), expected, rtol=1e-5, atol=1e-7)
            at += n


def test_the_budget_finishes_a_private_buffered_fog(tmp_path, core):
    """The budget fits two pushes, not three: the fog stops after the second (finished, its reason the budget),
    and run_buffered returns instead of waiting for pushes that cannot come."""
    z = 1.0
    two, _ = _epsilon(z, 2, 1e-5)
    three, _ = _epsilon(z, 3, 1e-5)
    dp = ClientDpConfig(noise_multiplier=z, clip=0.5, epsilon_budget=(two + three) / 2)
    fog = _fog(tmp_path, core, dp, Agents())
    pushes = run_buffered([fog], max_pushes=10)
    assert [p.version for p in pushes] == [1, 2] and len(core.pushes) == 2
    assert "over the budget" in fog.finished and fog.next_time == math.inf
    assert fog.step() == []


def test_a_private_buffered_fog_refuses_what_it_cannot_account(tmp_path, core):
    from dataclasses import replace

    from hyprstream.fog.aggregate import Aggregation

    dp = ClientDpConfig(noise_multiplier=1.0, clip=1.0)
    agents = Agents()
    nodes = sorted(SECONDS)
    fog = FogAggregator("fog-a", LoopbackGrid(agents.app, nodes), nodes, core.client, "digits", PLAN)
    rounds = ClientDpRounds(fog, dp, 1.0)
    with pytest.raises(ValidationError, match="replace-one"):  # pushes are not Poisson samples
        BufferedFog(fog, buffer_k=2, max_staleness=1, private=rounds)
    rounds.replace_one = True
    with pytest.raises(ValidationError, match="buffer_k 4 is more than the fog's 3 agents"):
        BufferedFog(fog, buffer_k=4, max_staleness=1, private=rounds)
    fog.plan = replace(PLAN, aggregation=Aggregation.MEDIAN)
    with pytest.raises(ValidationError, match="calibrated to the mean"):
        BufferedFog(fog, buffer_k=2, max_staleness=1, private=rounds)
    # a secure cohort of 2 cannot carry noise split over 3 clients
    from hyprstream.fog.secure import SecureFogAggregator
    from hyprstream.privacy.client_dp import NoisePlacement
    from hyprstream.privacy.config import SecAggConfig

    fog.plan = PLAN
    secure = SecureFogAggregator(fog, SecAggConfig(clip=1.0), ClientDpConfig(
        noise_multiplier=1.0, placement=NoisePlacement.DISTRIBUTED, min_clients=3))
    with pytest.raises(ValidationError, match="min_clients = 3 inputs, more than a cohort of buffer_k 2"):
        BufferedFog(fog, buffer_k=2, max_staleness=1, secure=secure, private=buffered_privacy(secure))
    assert BufferedFog(fog, buffer_k=3, max_staleness=1, secure=secure, private=buffered_privacy(secure))


def test_a_buffer_the_remaining_agents_cannot_fill_is_named(tmp_path, core):
    """One update per agent per push: with one of three agents failing, a buffer of three cannot fill; the
    error says why instead of blaming every agent."""
    fog = _fog(tmp_path, core, ClientDpConfig(noise_multiplier=1.0, clip=1.0), Agents(failing={103}), buffer_k=3)
    with pytest.raises(HyprstreamError, match="only 2 agent.s. could fill this buffer of 3"):
        run_buffered([fog], max_pushes=1)


SHAPES = {"w": (3, 4), "b": (4,)}
_finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)


def _delta(values: list[float]) -> dict[str, np.ndarray]:
    flat = np.asarray(values, dtype=np.float32)
    return {"w": flat[:12].reshape(3, 4), "b": flat[12:]}


def _discounted_sum(fog: FogAggregator, deltas, weights, clip: float) -> np.ndarray:
    matrices = {"g": UpdateSum(SHAPES, capacity=len(deltas))}
    for d, w in zip(deltas, weights, strict=True):
        fog._add(matrices, TrainReply(ReplyStatus.OK, 0, ("g",), d, num_examples=10), weight=w, clip=clip)
    mean = matrices["g"].mean()
    return np.concatenate([mean["w"].ravel(), mean["b"].ravel()]).astype(np.float64) * matrices["g"].total_weight


@settings(max_examples=60, deadline=None)
@given(deltas=st.lists(st.lists(_finite, min_size=16, max_size=16), min_size=1, max_size=5),
       other=st.lists(_finite, min_size=16, max_size=16),
       staleness=st.lists(st.integers(min_value=0, max_value=50), min_size=5, max_size=5),
       clip=st.floats(min_value=1e-3, max_value=10.0), at=st.integers(min_value=0, max_value=4))
def test_replacing_one_agents_update_moves_the_discounted_sum_by_at_most_twice_the_clip(deltas, other, staleness,
                                                                                         clip, at):
    """The sensitivity a push is charged for: whatever one agent sends instead (huge, tiny, zeros), the
    un-noised sum of the clipped updates, each times its staleness weight (at most 1), moves by at most 2C."""
    fog = FogAggregator("fog-a", None, [1], None, "m", RoundPlan("digits", ("g",), 1, 1, 0.1))
    arrays = [_delta(v) for v in deltas]
    weights = [1 / math.sqrt(1 + s) for s in staleness[:len(arrays)]]
    swapped = list(arrays)
    swapped[at % len(arrays)] = _delta(other)
    diff = _discounted_sum(fog, arrays, weights, clip) - _discounted_sum(fog, swapped, weights, clip)
    assert float(np.linalg.norm(diff)) <= 2 * clip * (1 + 1e-5)
