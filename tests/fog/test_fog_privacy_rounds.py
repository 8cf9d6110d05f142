"""The fog's round loop (``run_fog``) configured with [privacy.secagg] and [privacy.client_dp]: the agents'
real ClientApp over an in-process loopback grid, a real core Flight server on loopback. The fleet changes
between rounds, the fog restarts, and its durable ledger keeps the budget."""

import pytest
from test_fog_privacy_deploy import core  # noqa: F401 - the core fixture (server, audit log, model)

from hyprstream.agent.client_app import app as agent_app
from hyprstream.learning.task import Dataset, get_task
from hyprstream.core.audit import iter_entries
from hyprstream.fog.config import load_fog_config
from hyprstream.fog.loopback import LoopbackGrid
from hyprstream.fog.metrics import FogMetrics
from hyprstream.fog.server_app import run_fog
from hyprstream.privacy.accountant import GaussianEvent, epsilon
from hyprstream.privacy.ledger import PrivacyLedger, Scope
from hyprstream.store import Store

pytestmark = pytest.mark.integration


def fog_config(tmp_path, location, *, max_rounds, mode="sync", client_dp=True, extra="", secagg=True):
    (tmp_path / "fog.token").write_text("fog-token\n")
    path = tmp_path / "fog.toml"
    path.write_text(f"""
kind = "fog"
name = "fog-west"
[core]
location = "{location}"
token_file = "{tmp_path / 'fog.token'}"
model = "digits-model"
[rounds]
task = "digits"
layers = ["head"]
local_steps = 3
batch_size = 16
min_agents = 2
timeout_s = 30
max_rounds = {max_rounds}
mode = "{mode}"
{extra}
""" + ("""[privacy.secagg]
clip = 0.5
stage_timeout_s = 5.0
""" if secagg else "") + ("""[privacy.client_dp]
noise_multiplier = 1.0
epsilon_budget = 8.0
delta = 1e-5
""" + ("" if secagg else "clip = 0.5\n") if client_dp else ""))
    return load_fog_config(path)


def devices(tmp_path, n):
    task = get_task("digits")
    train, _ = task.load_reference_data(seed=0)
    stores = {}
    for i in range(n):
        path = tmp_path / f"device-{i:04d}"
        with Store.open(path, create=True) as store:
            store.create_table(task.table, task.schema)
            store.append(task.table, task.to_table(Dataset(train.x[i * 50:(i + 1) * 50], train.y[i * 50:(i + 1) * 50])))
        stores[101 + i] = path
    return stores


def test_private_rounds_follow_the_fleet_and_the_budget_survives_a_restart(core, tmp_path):  # noqa: F811
    location, audit_path = core
    stores = devices(tmp_path, 4)
    grid = LoopbackGrid(agent_app, list(stores), node_config=lambda node: {"store-dir": str(stores[node])})
    state = tmp_path / "fog-state"
    metrics = FogMetrics("fog-west")
    spent_after = []

    def leave_one(result):  # an agent leaves after round 1: round 2 runs over the other three
        spent_after.append(metrics.privacy())
        if result.round == 1:
            grid.node_ids.remove(104)

    rounds = run_fog(grid, fog_config(tmp_path, location, max_rounds=2), state_dir=state, on_round=leave_one,
                     metrics=metrics)
    assert [r.version for r in rounds] == [1, 2], [r.reasons for r in rounds]
    assert [set(r.contributors) for r in rounds] == [{101, 102, 103, 104}, {101, 102, 103}]
    assert all(r.bytes_up > 0 and r.train_loss != r.train_loss for r in rounds)  # secure: no per-client loss
    # z = 1, every agent (q = 1): 4.38 then 6.57 at delta 1e-5 (PLD), in the metrics after each round
    expected = [epsilon([GaussianEvent(1.0, 1.0, 1)] * k, 1e-5) for k in (1, 2, 3)]
    assert [p["epsilon"] for p in spent_after] == pytest.approx(expected[:2])
    assert spent_after[-1]["epsilon_budget"] == 8.0 and spent_after[-1]["delta"] == 1e-5
    assert f'hyprstream_fog_privacy_epsilon{{fog="fog-west"}} {expected[1]!r}' in metrics.render()  # full precision
    pushes = [e.details for e in iter_entries(audit_path) if e.action == "model.push" and e.outcome == "ok"]
    assert [p["privacy"]["epsilon"] for p in pushes] == pytest.approx(expected[:2])
    # core gets the mean's fixed denominator (q = 1 of the fog's agents), never the count: 0 is sent
    assert [(p["participants"], p["privacy"]["expected_participants"]) for p in pushes] == [(0, 4.0), (0, 3.0)]

    # a restarted fog reads its ledger: the third round (8.39 > 8) is never started, nothing is released
    restarted = FogMetrics("fog-west")
    rounds = run_fog(grid, fog_config(tmp_path, location, max_rounds=1), state_dir=state, metrics=restarted)
    assert rounds[0].version is None and any("over the budget" in r for r in rounds[0].reasons), rounds[0].reasons
    assert restarted.privacy()["epsilon"] == pytest.approx(expected[1])
    with Store.open(state / "privacy", readonly=True) as store:
        entries = PrivacyLedger(store).entries(Scope.MODEL, "digits-model")
    assert [e.charge.version for e in entries] == [1, 2]
    assert len([e for e in iter_entries(audit_path) if e.action == "model.push"]) == 2


def test_secure_buffered_cohorts_with_client_level_dp_stop_at_the_budget(core, tmp_path):  # noqa: F811
    """``run_fog`` in buffered mode with [privacy.secagg] and [privacy.client_dp]: every cohort of two is a
    secure round whose sum the fog noises over the fixed denominator, charged to the durable ledger as one
    replace-one Gaussian release; the budget (8) fits two (4.38, 6.57), then the fog stops."""
    location, _ = core
    cfg = fog_config(tmp_path, location, max_rounds=5, mode="buffered", extra="buffer_k = 2\nmax_staleness = 4")
    stores = devices(tmp_path, 3)
    grid = LoopbackGrid(agent_app, list(stores), node_config=lambda n: {"store-dir": str(stores[n])})
    rounds = run_fog(grid, cfg, state_dir=tmp_path / "state", metrics=FogMetrics("fog-west"))
    assert [r.version for r in rounds] == [1, 2], [r.reasons for r in rounds]
    with Store.open(tmp_path / "state" / "privacy", readonly=True) as store:
        entries = PrivacyLedger(store).entries(Scope.MODEL, "digits-model")
    assert [e.charge.mechanism for e in entries] == ["client-gaussian-central-replace-one"] * 2
    expected = [epsilon([GaussianEvent(1.0, 1.0, 1)] * n, 1e-5) for n in (1, 2)]
    assert [e.epsilon for e in entries] == pytest.approx(expected)


def test_buffered_rounds_with_client_level_dp_noise_each_push_and_stop_at_the_budget(core, tmp_path):  # noqa: F811
    """``run_fog`` in buffered mode with [privacy.client_dp] and no SecAgg+: each push of two updates (one per
    agent) is clipped and noised by the fog and charged to its durable ledger as one replace-one Gaussian
    release at rate 1; the budget (8) fits two pushes (4.38, 6.57; a third would be 8.39), then the fog stops."""
    location, _ = core
    cfg = fog_config(tmp_path, location, max_rounds=5, mode="buffered", secagg=False,
                     extra="buffer_k = 2\nmax_staleness = 4")
    stores = devices(tmp_path, 3)
    grid = LoopbackGrid(agent_app, list(stores), node_config=lambda n: {"store-dir": str(stores[n])})
    metrics = FogMetrics("fog-west")
    rounds = run_fog(grid, cfg, state_dir=tmp_path / "state", metrics=metrics)
    assert [r.version for r in rounds] == [1, 2], [r.reasons for r in rounds]
    assert all(len(set(r.contributors)) == 2 for r in rounds)
    with Store.open(tmp_path / "state" / "privacy", readonly=True) as store:
        entries = PrivacyLedger(store).entries(Scope.MODEL, "digits-model")
    assert [e.charge.mechanism for e in entries] == ["client-gaussian-central-replace-one"] * 2
    assert [e.charge.version for e in entries] == [1, 2] and [e.charge.unit for e in entries] == ["device"] * 2
    expected = [epsilon([GaussianEvent(1.0, 1.0, 1)] * n, 1e-5) for n in (1, 2)]
    assert [e.epsilon for e in entries] == pytest.approx(expected)
    assert metrics.privacy()["epsilon"] == pytest.approx(expected[1])  # the fog's gauge


def test_buffered_rounds_with_secure_aggregation_push_cohort_means(core, tmp_path):  # noqa: F811
    """``run_fog`` with ``mode = "buffered"`` and ``[privacy.secagg]``: the agents' real ClientApp trains and
    holds; every ``buffer_k`` of them are one secure cohort round, and core commits each mean."""
    location, _ = core
    cfg = fog_config(tmp_path, location, max_rounds=3, mode="buffered", client_dp=False,
                     extra="buffer_k = 2\nmax_staleness = 4")
    stores = devices(tmp_path, 3)
    grid = LoopbackGrid(agent_app, list(stores), node_config=lambda n: {"store-dir": str(stores[n])})
    rounds = run_fog(grid, cfg, state_dir=tmp_path / "state", metrics=FogMetrics("fog-west"))
    assert [r.version for r in rounds] == [1, 2, 3], [r.reasons for r in rounds]
    assert [r.participants for r in rounds] == [2, 2, 2]
    assert all(r.train_loss != r.train_loss for r in rounds)  # NaN: nothing of a device's training is sent
