"""``hyprstream fog run`` on Flower's deployment engine: real SuperLink, real SuperNodes running the agent
ClientApp (secure-aggregation middleware), a real core Flight server with its signed audit log, all on
loopback. The fog runs its fixed number of rounds with a round-robin layer schedule, [privacy.secagg] and
[privacy.client_dp], then exits 0; each committed version's audit entry carries the spend. (The plain,
non-private ``fog run`` over SuperNodes runs in tests/e2e and in test_buffered.py.)"""

import json
import subprocess
import sys

import numpy as np
import pytest
from fogrun import digits_stores, fog_toml, free_port, run_fog_over_supernodes

from hyprstream.learning.task import get_task
from hyprstream.learning.trainer import model_weights
from hyprstream.core import signing
from hyprstream.core.audit import AuditLog, iter_entries
from hyprstream.core.auth import Principal, Role, TokenRegistry
from hyprstream.coreapi.client import CoreClient
from hyprstream.core.repository import ModelRepository
from hyprstream.core.server import CoreFlightServer
from hyprstream.privacy.accountant import GaussianEvent, epsilon
from hyprstream.privacy.ledger import PrivacyLedger, Scope
from hyprstream.store import Store, to_table

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROUNDS = 2


@pytest.fixture()
def core(tmp_path):
    tokens = TokenRegistry()
    tokens.add("admin-token", Principal("admin", Role.ADMIN))
    tokens.add("fog-token", Principal("fog-west", Role.FOG))
    audit = AuditLog(tmp_path / "audit" / "audit.jsonl", signing.generate_key())
    server = CoreFlightServer(ModelRepository(tmp_path / "core", audit=audit), tokens)
    location = server.start_background()
    task = get_task("digits")
    with CoreClient(location, "admin-token") as admin:
        admin.register_model("digits-model", to_table(model_weights(task.build_model(seed=0)), layer=task.layer_of))
    yield location, audit.path
    server.stop()
    audit.close()


def test_fog_runs_round_robin_rounds_over_supernodes_with_secure_aggregation_and_client_dp(core, tmp_path):
    location, audit_path = core
    stores = digits_stores(tmp_path, 2, 200)
    port = free_port()
    state = tmp_path / "fog-state"
    config = fog_toml(tmp_path / "fog.toml", name="fog-west", location=location, token="fog-token",
                      model="digits-model", state_dir=state, body=f"""
[superlink]
port = {port}
[rounds]
task = "digits"
layers = ["fc2", "head"]
schedule = "round_robin"
local_steps = 5
min_agents = 2
min_replies = 2
timeout_s = 180
max_rounds = {ROUNDS}
[privacy.secagg]
clip = 0.5
stage_timeout_s = 120.0
min_clients = 2
[privacy.client_dp]
noise_multiplier = 1.0
placement = "central"
epsilon_budget = 10.0
delta = 1e-5
""")
    run_fog_over_supernodes(config, port, stores)  # exits 0 after max_rounds

    # z = 1, every agent every round (q = 1): the model's epsilon after rounds 1 and 2 at delta 1e-5
    expected = [epsilon([GaussianEvent(1.0, 1.0, 1)] * r, 1e-5) for r in range(1, ROUNDS + 1)]
    with CoreClient(location, "admin-token") as admin:
        versions = admin.list_versions("digits-model")
    assert [v["version"] for v in versions] == list(range(ROUNDS + 1))
    assert [v["actor"] for v in versions[1:]] == ["fog-west"] * ROUNDS
    assert [v["layers"] for v in versions[1:]] == [["fc2"], ["head"]]  # round-robin layer schedule
    assert [v["participants"] for v in versions[1:]] == [0] * ROUNDS  # client-level DP: the count is not released
    assert all(np.isfinite(v["update_norm"]) and v["update_norm"] > 0 for v in versions[1:])

    # core's audit log: intact, and each committed version's entry carries the spend and the transcript
    verify = subprocess.run([sys.executable, "-m", "hyprstream.cli", "audit", "verify", str(audit_path)],
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    pushes = [e for e in iter_entries(audit_path) if e.action == "model.push" and e.outcome == "ok"]
    assert [p.details["version"] for p in pushes] == list(range(1, ROUNDS + 1))
    assert all(p.actor == "fog-west" for p in pushes)
    assert [p.details["privacy"]["epsilon"] for p in pushes] == pytest.approx(expected)
    for p in pushes:
        assert {k: p.details["privacy"][k] for k in ("delta", "noise_multiplier", "sample_rate", "clip")} == \
            {"delta": 1e-5, "noise_multiplier": 1.0, "sample_rate": 1.0, "clip": 0.5}
        assert len(p.details["transcript_sha256"]) == 64

    # the fog's durable ledger: one model entry per round, bound to the version core committed
    with Store.open(state / "privacy", readonly=True) as store:
        entries = PrivacyLedger(store).entries(Scope.MODEL, "digits-model")
    assert [e.charge.version for e in entries] == list(range(1, ROUNDS + 1))
    assert [e.epsilon for e in entries] == [p.details["privacy"]["epsilon"] for p in pushes]

    # status.json tells the outcome and the spend
    status = json.loads((state / "status.json").read_text())
    assert status["status"] == "finished" and status["rounds"] == ROUNDS
    assert status["privacy"] == {"epsilon": pytest.approx(expected[-1]), "epsilon_budget": 10.0, "delta": 1e-5}

    # the fog's own log keeps every round's line, readable by its owner only
    fog_log = state / "fog.log"
    assert fog_log.stat().st_mode & 0o077 == 0
    lines = fog_log.read_text().splitlines()
    assert [n for n in range(1, ROUNDS + 1) if any(f"round {n}: secure round" in line for line in lines)] == \
        list(range(1, ROUNDS + 1)), lines
