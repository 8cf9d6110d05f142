"""Buffered asynchronous aggregation (FedBuff) on a fog: the real agent ClientApp on an in-process
grid, a real core Flight server on loopback."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message
from flwr.clientapp import ClientApp

from hyprstream.agent.client_app import answer_train
from hyprstream.coreapi.client import CoreClient
from hyprstream.errors import HyprstreamError, ValidationError
from hyprstream.fog.aggregator import FogAggregator, RoundPlan
from hyprstream.fog.buffered import BufferedFog, async_versions_per_second, buffered_weight
from hyprstream.fog.engine import run_buffered
from hyprstream.fog.loopback import LoopbackGrid
from hyprstream.protocol import TrainReply
from hyprstream.store import to_arrays

pytestmark = pytest.mark.integration

SEED = 7


class Agents:
    """The agent ClientApp, recording each reply by its request's seed; ``failing`` nodes raise."""

    def __init__(self, failing=()):
        self.replies: dict[int, TrainReply] = {}
        self.failing = set(failing)
        self.app = ClientApp()

        @self.app.train("layerwise")
        def train(msg: Message, context) -> Message:
            if context.node_id in self.failing:
                raise RuntimeError("device fault")
            reply = answer_train(msg.content, context)
            self.replies[int(msg.content["config"]["seed"])] = reply
            return Message(reply.to_content(), reply_to=msg)


def make_fog(site, agents, nodes, *, drop=(), timeout_s=60.0):
    grid = LoopbackGrid(agents.app, nodes, node_config=lambda n: {"store-dir": str(site.stores[n])},
                        drop=lambda node, msg: node in drop)
    plan = RoundPlan(task="digits", layers=("fc2", "head"), local_steps=2, batch_size=16, lr=0.05,
                     timeout_s=timeout_s)
    core = CoreClient(site.location, "fog")
    return FogAggregator("fog-a", grid, nodes, core, "m", plan, seed=SEED), core


def seed_of(fog, dispatch_index, node):
    return SEED * 1_000_003 + dispatch_index * 1009 + fog.node_ids.index(node)


def test_pushes_every_k_updates_with_staleness_weighted_mean(site):
    agents = Agents()
    fog, core = make_fog(site, agents, [1, 2, 3])
    durations = {1: 1.0, 2: 1.0, 3: 2.5}
    with core:
        buffered = BufferedFog(fog, buffer_k=2, max_staleness=1, concurrency=3,
                               duration=lambda node, dispatch: durations[node])
        pushes = run_buffered([buffered], max_pushes=3)
        snapshots = [to_arrays(core.get_weights("m", version=v).table) for v in range(4)]

    # By hand: at t=1 agents 1 and 2 finish (version 0) -> push 1; agent 1 was sent version 0 again
    # before that push, agent 2 version 1. At t=2: agent 1 (staleness 1), agent 2 (0) -> push 2. At
    # t=2.5 agent 3's update of version 0 has staleness 2 > 1: refused. At t=3: 1 (staleness 1), 2 (0).
    assert [p.version for p in pushes] == [1, 2, 3]
    assert [p.base_version for p in pushes] == [0, 1, 2]
    assert [p.participants for p in pushes] == [2, 2, 2]
    assert [p.contributors for p in pushes] == [(1, 2), (1, 2), (1, 2)]
    assert [p.staleness for p in pushes] == [(0, 0), (1, 0), (1, 0)]
    assert [p.sim_time for p in pushes] == [1.0, 2.0, 3.0]
    assert [p.refused for p in pushes] == [0, 0, 1]
    assert "staleness 2 exceeds max_staleness 1" in pushes[2].reasons[0]
    assert 3 not in sum((p.contributors for p in pushes), ())
    # uplink bytes per agent: the contributors' replies (and agent 3's refused one), adding up to bytes_up
    assert all(set(p.contributors) <= set(p.uplink) and sum(p.uplink.values()) == p.bytes_up > 0 for p in pushes)
    assert set(pushes[2].uplink) == {1, 2, 3} and pushes[2].as_round().uplink == pushes[2].uplink

    for j, push in enumerate(pushes):
        replies = [agents.replies[seed_of(fog, d, n)] for d, n in zip(push.dispatches, push.contributors, strict=True)]
        weights = [r.num_examples / math.sqrt(1 + s) for r, s in zip(replies, push.staleness, strict=True)]
        assert push.weights == pytest.approx(weights)
        assert len({r.num_examples for r in replies}) == 2  # unequal data: the weights matter
        before, after = snapshots[j], snapshots[j + 1]
        for name in before:
            if not name.startswith(("fc2.", "head.")):
                np.testing.assert_array_equal(after[name], before[name])
                continue
            weighted = [w * r.delta[name].astype(np.float64) for w, r in zip(weights, replies, strict=True)]
            mean = sum(weighted) / sum(weights)
            np.testing.assert_allclose(after[name], before[name] + mean, rtol=1e-5, atol=1e-6)


def test_failing_and_silent_agents_do_not_stall_the_fog(site):
    agents = Agents(failing={3})
    fog, core = make_fog(site, agents, [1, 2, 3, 4], drop={4}, timeout_s=0.5)
    with core:
        buffered = BufferedFog(fog, buffer_k=2, max_staleness=3, duration=lambda node, d: 1.0 + 0.1 * node)
        pushes = run_buffered([buffered], max_pushes=3)
    assert [p.version for p in pushes] == [1, 2, 3]
    assert all(set(p.contributors) == {1, 2} for p in pushes)
    # Agents 3 (error) and 4 (silent past the timeout) fail at t=1.3 and t=1.4, rest until the next
    # push, and are asked again on the new version.
    assert pushes[0].failed == 0 and pushes[1].failed == 2
    reasons = " | ".join(pushes[1].reasons)
    assert "device fault" in reasons
    assert "agent 4 did not answer within 0.5 s (raise rounds.timeout_s; in a simulation, [runtime] " \
           "round_timeout_s)" in reasons  # who, and the setting that gives it longer
    assert pushes[2].failed == 0  # asked again at t=2.4, they fail after push 3


def test_real_time_mode_pushes_every_k_updates(site):
    agents = Agents()
    fog, core = make_fog(site, agents, [1, 2, 3])
    with core:
        buffered = BufferedFog(fog, buffer_k=3, max_staleness=5, concurrency=2)
        pushes = run_buffered([buffered], max_pushes=2)
        stop = threading.Event()
        more = run_buffered([buffered], max_pushes=5, stop=stop, on_push=lambda push: stop.set())
        head = core.head("m")
    assert [p.version for p in pushes] == [1, 2] and [p.version for p in more] == [3]
    assert [p.participants for p in pushes] == [3, 3]
    assert all(p.sim_time is None for p in pushes)
    assert head["version"] == 3


def test_a_selection_decides_which_idle_agents_get_a_job_and_the_fog_waits_for_an_eligible_one(site):
    """buffered + telemetry selection: only the agents ``choose`` picks are sent a job (agent 2 never is);
    while it picks none, the fog offers its idle agents again instead of failing."""
    agents = Agents()
    fog, core = make_fog(site, agents, [1, 2, 3])
    offered = []

    def choose(idle, slots, call):
        offered.append((idle, slots))
        return () if call <= 3 else tuple(n for n in idle if n != 2)  # nobody eligible at first

    with core:
        buffered = BufferedFog(fog, buffer_k=2, max_staleness=5, concurrency=2, choose=choose, poll_s=0.01)
        pushes = run_buffered([buffered], max_pushes=3)
    assert [p.version for p in pushes] == [1, 2, 3]
    assert all(2 not in p.contributors for p in pushes) and all(p.participants == 2 for p in pushes)
    assert len(offered) > 3 and offered[0] == ((1, 2, 3), 2)  # asked again while none was chosen


def test_on_a_virtual_clock_a_selection_waits_in_simulated_time_and_gives_up_after_max_wait(site):
    """Virtual clock: while the selection picks none of the idle agents and none trains, simulated time moves
    on by ``retry_s`` (nothing sleeps) and they are offered again at the new instant; agent 1 is eligible from
    t = 150 s, agent 2 never. A fog whose agents never become eligible fails after ``max_wait_s``."""
    agents = Agents()
    fog, core = make_fog(site, agents, [1, 2])
    instants = []

    def choose_at(buffered):
        def choose(idle, slots, call):
            instants.append(buffered.now)
            return tuple(n for n in idle if n == 1 and buffered.now >= 150.0)
        return choose

    with core:
        buffered = BufferedFog(fog, buffer_k=1, max_staleness=5, duration=lambda node, d: 2.0, retry_s=60.0)
        buffered.choose = choose_at(buffered)
        pushes = run_buffered([buffered], max_pushes=2)
        assert [p.contributors for p in pushes] == [(1,), (1,)]
        assert [p.sim_time for p in pushes] == [182.0, 184.0]  # offered at 0, 60, 120, 180: sent at 180
        assert sorted(set(instants))[:4] == [0.0, 60.0, 120.0, 180.0]
        never = BufferedFog(fog, buffer_k=1, max_staleness=5, duration=lambda node, d: 2.0, retry_s=60.0,
                            max_wait_s=600.0, choose=lambda idle, slots, call: ())
        with pytest.raises(HyprstreamError, match="none of its 2 idle agent.s. was eligible for 600 simulated"):
            run_buffered([never], max_pushes=1)
    with pytest.raises(ValidationError, match="retry_s"):
        BufferedFog(fog, buffer_k=1, max_staleness=5, retry_s=0.0)


def test_async_commits_more_versions_per_simulated_second_than_sync_with_a_straggler(site):
    agents = Agents()
    nodes = [1, 2, 3, 4]
    durations = {1: 1.0, 2: 1.0, 3: 1.0, 4: 10.0}  # agent 4 is a 10x straggler
    fog, core = make_fog(site, agents, nodes)
    with core:
        sync_time = 0.0
        sync_versions = 0
        for round_no in (1, 2):  # synchronous rounds wait for the slowest agent
            result = fog.run_round(round_no)
            sync_versions += result.version is not None
            sync_time += max(durations[n] for n in result.nodes)
        buffered = BufferedFog(fog, buffer_k=2, max_staleness=100,
                               duration=lambda node, dispatch: durations[node])
        pushes = run_buffered([buffered], max_pushes=100, sim_until=10.0)
    assert sync_versions == 2 and sync_time == 20.0
    sync_rate = sync_versions / sync_time
    async_rate = async_versions_per_second(pushes)
    assert async_rate > 10 * sync_rate
    # The straggler's first update arrives at t=10, many versions late, and is counted with
    # weight num_examples / sqrt(1 + staleness).
    late = [(p, i) for p in pushes for i, n in enumerate(p.contributors) if n == 4]
    assert late, "the straggler's update was buffered"
    push, i = late[0]
    assert push.staleness[i] >= 10
    reply = agents.replies[seed_of(fog, push.dispatches[i], 4)]
    assert push.weights[i] == pytest.approx(buffered_weight(reply.num_examples, push.staleness[i]))


def test_every_agent_failing_is_an_error_not_a_hang(site):
    agents = Agents(failing={1, 2})
    fog, core = make_fog(site, agents, [1, 2])
    with core, pytest.raises(HyprstreamError, match="every agent declined or failed"):
        run_buffered([BufferedFog(fog, buffer_k=1, max_staleness=0)], max_pushes=1)


@pytest.mark.unit
def test_settings_are_checked():
    fog = FogAggregator.__new__(FogAggregator)
    fog.node_ids = [1, 2]
    for kwargs, match in [({"buffer_k": 0, "max_staleness": 1}, "buffer_k"),
                          ({"buffer_k": 1, "max_staleness": -1}, "max_staleness"),
                          ({"buffer_k": 1, "max_staleness": 1, "concurrency": 3}, "concurrency")]:
        with pytest.raises(ValidationError, match=match):
            BufferedFog(fog, **kwargs)
    assert buffered_weight(9, 0) == 9.0 and buffered_weight(9, 3) == pytest.approx(4.5)
    with pytest.raises(ValidationError):
        buffered_weight(1, -1)


def fog_toml(site, body: str, top: str = "") -> Path:
    (site.tmp / "fog.token").write_text("fog\n")
    path = site.tmp / "fog.toml"
    path.write_text(f"""
kind = "fog"
name = "fog-a"
{top}
[core]
location = "{site.location}"
token_file = "{site.tmp / 'fog.token'}"
model = "m"
{body}
""")
    return path


def test_run_fog_in_buffered_mode_pushes_every_k_updates(site):
    from hyprstream.agent.client_app import app as agent_app
    from hyprstream.fog.config import load_fog_config
    from hyprstream.fog.metrics import FogMetrics
    from hyprstream.fog.server_app import run_fog

    cfg = load_fog_config(fog_toml(site, """
[rounds]
mode = "buffered"
buffer_k = 2
max_staleness = 2
concurrency = 3
layers = ["head"]
local_steps = 2
min_agents = 3
max_rounds = 3
"""))
    grid = LoopbackGrid(agent_app, [11, 12, 13], node_config=lambda n: {"store-dir": str(site.stores[n - 10])})
    metrics = FogMetrics("fog-a")
    seen = []
    rounds = run_fog(grid, cfg, state_dir=site.tmp / "state", metrics=metrics, on_round=seen.append)
    assert [r.version for r in rounds] == [1, 2, 3] and seen == rounds
    assert [r.participants for r in rounds] == [2, 2, 2]
    assert all(r.layers == ("head",) for r in rounds)
    assert metrics.snapshot()["hyprstream_fog_pushes_total"] == 3
    with CoreClient(site.location, "admin") as admin:
        versions = admin.list_versions("m")
    assert [v["layers"] for v in versions[1:]] == [["head"]] * 3
    assert [v["participants"] for v in versions[1:]] == [2, 2, 2]


@pytest.mark.slow
def test_hyprstream_fog_run_in_buffered_mode_over_supernodes(site):
    """``hyprstream fog run`` with ``mode = "buffered"``: a real SuperLink and SuperNodes running the
    agent ClientApp."""
    from fogrun import free_port, run_fog_over_supernodes

    port = free_port()
    config = fog_toml(site, f"""
[superlink]
port = {port}
[rounds]
mode = "buffered"
buffer_k = 2
max_staleness = 3
layers = ["head"]
local_steps = 2
min_agents = 2
timeout_s = 120
max_rounds = 2
""", top=f'state_dir = "{site.tmp / "fog-state"}"')
    run_fog_over_supernodes(config, port, [site.stores[1], site.stores[2]], timeout_s=400)
    with CoreClient(site.location, "admin") as admin:
        versions = admin.list_versions("m")
    assert [v["version"] for v in versions] == [0, 1, 2]
    assert [v["actor"] for v in versions[1:]] == ["fog-a", "fog-a"]
    assert [v["layers"] for v in versions[1:]] == [["head"], ["head"]]
    assert [v["participants"] for v in versions[1:]] == [2, 2]


def test_a_synchronous_round_names_the_agents_that_did_not_answer(site):
    agents = Agents()
    fog, core = make_fog(site, agents, [1, 2, 3], drop={3}, timeout_s=0.5)
    with core:
        r = fog.run_round(1)
    assert (r.participants, r.failed, r.version) == (2, 1, 1)
    assert r.reasons[0] == ("agent(s) 3 did not answer within 0.5 s (raise rounds.timeout_s; in a simulation, "
                            "[runtime] round_timeout_s)")
