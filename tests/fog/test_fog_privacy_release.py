"""What a fog with [privacy.client_dp] releases to core: the mean over the fixed denominator, never the
realised participant count, and no round whose release core's ``max_update_norm`` would refuse. The
agents' real ClientApp over the loopback grid, a real core Flight server on loopback with its signed
audit log, one deployment for the module."""

import math

import numpy as np
import pytest
from test_fog_privacy_rounds import devices

from hyprstream.agent.client_app import app as agent_app
from hyprstream.learning.task import get_task
from hyprstream.learning.trainer import model_weights
from hyprstream.core import signing
from hyprstream.core.audit import AuditLog, iter_entries
from hyprstream.core.auth import Principal, Role, TokenRegistry
from hyprstream.coreapi.client import CoreClient
from hyprstream.core.repository import ModelRepository, ModelSettings
from hyprstream.core.server import CoreFlightServer
from hyprstream.fog.config import load_fog_config
from hyprstream.fog.loopback import LoopbackGrid
from hyprstream.fog.server_app import run_fog
from hyprstream.privacy.ledger import PrivacyLedger, Scope
from hyprstream.store import Store, to_table

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """Core with two digits models: ``loose`` (no norm bound) and ``tight`` (bound 1.0, below the noise
    of a client-level DP mean of the head); a fog token; four agents' stores."""
    tmp = tmp_path_factory.mktemp("release")
    tokens = TokenRegistry()
    tokens.add("admin-token", Principal("admin", Role.ADMIN))
    tokens.add("fog-token", Principal("fog-west", Role.FOG))
    audit = AuditLog(tmp / "audit" / "audit.jsonl", signing.generate_key())
    server = CoreFlightServer(ModelRepository(tmp / "core", audit=audit), tokens)
    location = server.start_background()
    task = get_task("digits")
    table = to_table(model_weights(task.build_model(seed=0)), layer=task.layer_of)
    with CoreClient(location, "admin-token") as admin:
        admin.register_model("loose", table)
        admin.register_model("tight", table, ModelSettings(max_update_norm=1.0))
    stores = devices(tmp, 4)
    (tmp / "fog.token").write_text("fog-token\n")
    yield location, audit.path, stores, tmp
    server.stop()
    audit.close()


def fog_config(tmp, location, model, *, sampling_rate=1.0):
    path = tmp / f"fog-{model}.toml"
    path.write_text(f"""
kind = "fog"
name = "fog-west"
[core]
location = "{location}"
token_file = "{tmp / 'fog.token'}"
model = "{model}"
[rounds]
task = "digits"
layers = ["head"]
local_steps = 3
batch_size = 16
min_agents = 4
timeout_s = 30
max_rounds = 1
[privacy.secagg]
clip = 0.5
stage_timeout_s = 5.0
[privacy.client_dp]
noise_multiplier = 1.0
client_sampling_rate = {sampling_rate}
epsilon_budget = 8.0
delta = 1e-5
""")
    return load_fog_config(path)


def pushes(audit_path, model):
    return [e.details for e in iter_entries(audit_path)
            if e.action == "model.push" and e.outcome == "ok" and e.subject == f"model/{model}"]


def test_core_gets_the_fixed_denominator_never_the_participant_count(deployment):
    location, audit_path, stores, tmp = deployment
    grid = LoopbackGrid(agent_app, list(stores), node_config=lambda node: {"store-dir": str(stores[node])})
    # rate 0.999 of 4 agents: the mean is over D = 3.996 whatever number of agents was sampled and survived
    [result] = run_fog(grid, fog_config(tmp, location, "loose", sampling_rate=0.999), state_dir=tmp / "state-loose")
    assert result.version == 1, result.reasons
    [push] = pushes(audit_path, "loose")
    assert push["participants"] == 0  # not released
    assert push["privacy"]["expected_participants"] == pytest.approx(3.996)
    with CoreClient(location, "admin-token") as admin:
        assert admin.list_versions("loose")[-1]["participants"] == 0


def test_a_round_core_would_refuse_is_not_started_nor_charged(deployment):
    location, audit_path, stores, tmp = deployment
    with CoreClient(location, "fog-token") as fog:
        head = fog.head("tight")
    assert head["max_update_norm"] == 1.0  # the fog reads core's bound
    size = get_task("digits").build_model(seed=0).head.weight.numel() + 10
    noise = 1.0 * 0.5 * math.sqrt(size) / 4  # z C sqrt(d) / D: ~3.2, above the bound of 1.0
    assert noise > 1.0
    grid = LoopbackGrid(agent_app, list(stores), node_config=lambda node: {"store-dir": str(stores[node])})
    state = tmp / "state-tight"
    [result] = run_fog(grid, fog_config(tmp, location, "tight"), state_dir=state)
    assert result.version is None and result.bytes_down == 0  # no agent was asked to train
    [reason] = result.reasons
    assert "max_update_norm 1" in reason and "noise" in reason, reason
    assert np.isclose(float(reason.split("noise of norm ")[1].split()[0]), noise, rtol=1e-3), reason
    with Store.open(state / "privacy", readonly=True) as store:
        assert PrivacyLedger(store).entries(Scope.MODEL, "tight") == []  # nothing spent
    assert pushes(audit_path, "tight") == []
    refused = [e for e in iter_entries(audit_path) if e.subject == "model/tight" and e.action == "model.push"]
    assert refused == []  # core was never sent a release it would refuse
