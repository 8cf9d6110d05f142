"""``hyprstream fog run`` with [privacy.secagg] and [privacy.client_dp] on Flower's deployment engine: real
SuperLink, real SuperNodes running the agent ClientApp (secure-aggregation middleware), a real core Flight
server with its signed audit log, all on loopback. Each committed version's audit entry carries the spend."""

import json
import socket
import subprocess
import sys
import time

import pytest
from test_fog_deploy import ENV, free_port

from hyprstream.agent.task import Dataset, get_task
from hyprstream.agent.trainer import model_weights
from hyprstream.core import signing
from hyprstream.core.audit import AuditLog, iter_entries
from hyprstream.core.auth import Principal, Role, TokenRegistry
from hyprstream.core.client import CoreClient
from hyprstream.core.repository import ModelRepository
from hyprstream.core.server import CoreFlightServer
from hyprstream.fog.service import executable, stop_process
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


def test_fog_run_with_secure_aggregation_and_client_dp(core, tmp_path):
    location, audit_path = core
    task = get_task("digits")
    train, _ = task.load_reference_data(seed=0)
    stores = []
    for i in range(2):
        path = tmp_path / f"device-{i}"
        with Store.open(path, create=True) as store:
            store.create_table(task.table, task.schema)
            store.append(task.table, task.to_table(Dataset(train.x[i::2][:200], train.y[i::2][:200])))
        stores.append(path)
    (tmp_path / "fog.token").write_text("fog-token\n")
    port = free_port()
    state = tmp_path / "fog-state"
    config = tmp_path / "fog.toml"
    config.write_text(f"""
kind = "fog"
name = "fog-west"
state_dir = "{state}"
[core]
location = "{location}"
token_file = "{tmp_path / 'fog.token'}"
model = "digits-model"
[superlink]
port = {port}
[rounds]
task = "digits"
layers = ["head"]
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
    fog = subprocess.Popen([sys.executable, "-m", "hyprstream.cli", "fog", "run", "--config", str(config)],
                           env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    nodes = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        supernode = executable("flower-supernode")
        for path in stores:
            nodes.append(subprocess.Popen(
                [supernode, "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                 "--node-config", f"store-dir='{path}'"],
                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        out, _ = fog.communicate(timeout=540)
        assert fog.returncode == 0, out
    finally:
        for proc in [*nodes, fog]:
            stop_process(proc)

    # z = 1, every agent every round (q = 1): the model's epsilon after rounds 1 and 2 at delta 1e-5
    expected = [epsilon([GaussianEvent(1.0, 1.0, 1)] * r, 1e-5) for r in range(1, ROUNDS + 1)]
    with CoreClient(location, "admin-token") as admin:
        versions = admin.list_versions("digits-model")
    assert [v["version"] for v in versions] == list(range(ROUNDS + 1))
    assert [v["participants"] for v in versions[1:]] == [2] * ROUNDS

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
