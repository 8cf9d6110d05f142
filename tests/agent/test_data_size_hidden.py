"""What a fog and the broker's subscribers learn of a device's data size: at most a coarse bucket.

Two devices whose stores differ in size (150 and 200 readings, the same power-of-two bucket) answer the
fog's device query, publish telemetry and decline a round their DP-SGD budget cannot pay for, each through
the real code path (the agent's ClientApp over the loopback grid, the agent daemon's telemetry); what the
fog and the subscribers receive is the same for both, and carries no row count or epsilon computed from it."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from flwr.app import RecordDict

from hyprstream.agent.client_app import app
from hyprstream.agent.handoff import PolicyState, write_policy
from hyprstream.agent.profile import Strategy, load_profile
from hyprstream.learning.task import Dataset, get_task
from hyprstream.learning.trainer import model_weights
from hyprstream.fog.loopback import LoopbackGrid
from hyprstream.privacy.accountant import GaussianEvent, epsilon
from hyprstream.protocol import DEVICE_QUERY_TYPE, ReplyStatus, TrainReply, TrainRequest
from hyprstream.store import Store

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SIZES = (150, 200)
DPSGD = "\n[privacy.dpsgd]\nnoise_multiplier = 1.1\nmax_grad_norm = 1.0\nepsilon_budget = {budget}\n"


def fill_store(path: Path, rows: int, key: bytes | None = None) -> None:
    task = get_task("digits")
    train, _ = task.load_reference_data(0)
    with Store.open(path, create=True, key=key) as store:
        store.create_table(task.table, task.schema)
        store.append(task.table, task.to_table(Dataset(train.x[:rows], train.y[:rows])))


def numbers(value) -> list[float]:
    """Every number in a decoded JSON value (booleans excluded)."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers(v)]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in numbers(v)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


@pytest.fixture(scope="module")
def devices(tmp_path_factory):
    """Two devices of SIZES readings behind the loopback grid, run as by the agent daemon with a DP-SGD
    budget no round can pay for."""
    root = tmp_path_factory.mktemp("sizes")
    profile = root / "profile.toml"
    profile.write_text((ROOT / "firmware-configs" / "x86-gateway.toml").read_text() + DPSGD.format(budget=0.05))
    configs = {}
    for node, rows in enumerate(SIZES, start=1):
        store, state = root / f"dev-{node}", root / f"dev-{node}.state"
        fill_store(store, rows)
        state.mkdir()
        write_policy(state, PolicyState(Strategy.FULL, time.time(), 3600.0, False, "test", str(profile)))
        configs[node] = {"store-dir": str(store), "state-dir": str(state), "device-id": f"dev-{node}"}
    with LoopbackGrid(app, list(configs), node_config=configs.__getitem__) as grid:
        yield grid


def ask_all(grid: LoopbackGrid, content, message_type: str) -> list:
    replies = grid.send_and_receive([grid.create_message(content, message_type, n, "round-1") for n in grid.node_ids])
    assert all(not r.has_error() for r in replies), [r.error.reason for r in replies if r.has_error()]
    return sorted(replies, key=lambda r: r.metadata.src_node_id)


def test_the_device_query_tells_the_fog_no_row_count(devices):
    replies = [dict(r.content["config"].items()) for r in ask_all(devices, RecordDict(), DEVICE_QUERY_TYPE)]
    assert [r.pop("device_id") for r in replies] == ["dev-1", "dev-2"]
    assert replies[0] == replies[1]  # 150 and 200 readings: the same answer
    assert not set(SIZES) & set(numbers(replies[0]))


def test_a_budget_decline_carries_no_epsilon_computed_from_the_data_size(devices):
    task = get_task("digits")
    request = TrainRequest("digits", 1, "digits", ("head",), local_steps=20, batch_size=16, lr=0.01, seed=0,
                           weights=model_weights(task.build_model(seed=0)))
    replies = [TrainReply.from_content(r.content) for r in ask_all(devices, request.to_content(), "train.layerwise")]
    assert all(r.status is ReplyStatus.DECLINED and "privacy budget" in r.reason for r in replies), replies
    assert replies[0].reason == replies[1].reason, [r.reason for r in replies]
    would_be = [f"{epsilon([GaussianEvent(1.1, 16 / n, 20)], 1e-5):.4g}" for n in SIZES]
    assert not any(eps in replies[0].reason for eps in would_be)


def _first_telemetry(tmp_path: Path, rows: int, spent_rounds: int) -> dict:
    """The first telemetry payload of an agent daemon over a store of ``rows`` readings whose privacy ledger
    holds ``spent_rounds`` DP-SGD rounds at the sampling rate of its data size (batch 16, 20 steps)."""
    from hyprstream.agent.daemon import Agent, AgentConfig
    from hyprstream.agent.monitor import TraceMonitor, load_trace
    from hyprstream.agent.publisher import MemoryPublisher
    from hyprstream.privacy.dpsgd import MECHANISM
    from hyprstream.privacy.ledger import Budget, Charge, PrivacyLedger, Scope

    tmp_path.mkdir()
    path = tmp_path / "profile.toml"
    path.write_text((ROOT / "firmware-configs" / "rpi4.toml").read_text() + DPSGD.format(budget=6.0))
    key = os.urandom(32)
    cfg = AgentConfig(profile_path=path, profile=load_profile(path), fleet="plant-7", device_id="pi-03",
                      store_dir=tmp_path / "store", state_dir=tmp_path / "state", store_key=key)
    fill_store(cfg.store_dir, rows, key)
    with Store.open(cfg.profile.privacy.ledger_dir(cfg.store_dir.resolve()), create=True) as store:
        for r in range(spent_rounds):
            PrivacyLedger(store).charge(Scope.DEVICE, "pi-03", Charge(GaussianEvent(1.1, 16 / rows, 20), "digits", r,
                                                                       f"r{r}", MECHANISM), Budget(6.0, 1e-5))
    pub = MemoryPublisher("plant-7", "pi-03", "s")
    trace = load_trace(ROOT / "tests" / "agent" / "traces" / "cpu_saturated.csv")
    agent = Agent(cfg, monitor=TraceMonitor(trace * 50), publisher=pub)
    stop = threading.Event()
    runner = threading.Thread(target=agent.run, args=(stop,))
    runner.start()
    try:
        while not any(t.endswith("/telemetry") for t, *_ in pub.messages):
            assert runner.is_alive()
            time.sleep(0.1)
    finally:
        stop.set()
        runner.join(60)
    assert not runner.is_alive()
    return json.loads(next(p for t, p, *_ in pub.messages if t.endswith("/telemetry")))


def test_telemetry_carries_no_row_count_and_no_epsilon_computed_from_it(tmp_path):
    sent = [_first_telemetry(tmp_path / f"n{rows}", rows, spent_rounds=2) for rows in SIZES]
    for payload, rows in zip(sent, SIZES, strict=True):
        spent = epsilon([GaussianEvent(1.1, 16 / rows, 20)] * 2, 1e-5)
        found = numbers(payload)
        assert rows not in found and not any(abs(v - spent) < 1e-9 for v in found), payload
    assert sent[0]["privacy"] == sent[1]["privacy"]
    assert sent[0].keys() == sent[1].keys() and "store" not in sent[0]
