"""A fog reaches a core that asks for client certificates (mutual TLS, core's ``tls.client_ca``), as
docs/core.md's quick start sets it up: with ``core.tls_client_cert`` and ``core.tls_client_key`` the
fog's round pulls and pushes (real Flight server with TLS on loopback, the agents' real ClientApp over
the loopback grid); without them ``hyprstream fog run`` refuses to start with one line naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fogrun import ENV, fog_toml
from test_fog_privacy_rounds import devices

from hyprstream.agent.client_app import app as agent_app
from hyprstream.learning.task import get_task
from hyprstream.learning.trainer import model_weights
from hyprstream.core.auth import Principal, Role, TokenRegistry
from hyprstream.core.certs import init_deployment
from hyprstream.coreapi.client import CoreClient
from hyprstream.core.repository import ModelRepository
from hyprstream.core.server import CoreFlightServer
from hyprstream.errors import ConfigError
from hyprstream.fog.config import load_fog_config
from hyprstream.fog.loopback import LoopbackGrid
from hyprstream.fog.server_app import run_fog
from hyprstream.fog.service import check_core_tls
from hyprstream.store import to_table

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    """Core with TLS and mutual TLS: its CA signs its own certificate and the fog's client certificate."""
    tmp = tmp_path_factory.mktemp("mtls")
    pki = tmp / "pki"
    init_deployment(pki, server_names=["localhost", "127.0.0.1"], clients=["fog-west", "admin"])
    tokens = TokenRegistry()
    tokens.add("admin-token", Principal("admin", Role.ADMIN))
    tokens.add("fog-token", Principal("fog-west", Role.FOG))
    ca = (pki / "ca.pem").read_bytes()
    server = CoreFlightServer(ModelRepository(tmp / "core"), tokens, "grpc+tls://127.0.0.1:0",
                              tls_certificates=[((pki / "server.pem").read_bytes(), (pki / "server.key").read_bytes())],
                              verify_client=True, root_certificates=ca)
    location = server.start_background()
    task = get_task("digits")
    admin = CoreClient(location, "admin-token", tls_root_certs=ca, cert_chain=(pki / "client-admin.pem").read_bytes(),
                       private_key=(pki / "client-admin.key").read_bytes())
    admin.register_model("digits-model", to_table(model_weights(task.build_model(seed=0)), layer=task.layer_of))
    yield location, pki, admin
    admin.close()
    server.stop()


def config(tmp_path, location, pki, *, client_cert: bool):
    cert = (f'tls_client_cert = "{pki / "client-fog-west.pem"}"\ntls_client_key = "{pki / "client-fog-west.key"}"\n'
            if client_cert else "")
    # [core] is the last table fog_toml writes before the body: these keys belong to it
    return fog_toml(tmp_path / "fog.toml", name="fog-west", location=location, token="fog-token",
                    model="digits-model", state_dir=tmp_path / "state", body=f"""tls_root_cert = "{pki / 'ca.pem'}"
{cert}
[rounds]
task = "digits"
layers = ["head"]
local_steps = 2
batch_size = 16
min_agents = 2
timeout_s = 60
max_rounds = 1
""")


def test_with_its_client_certificate_the_fog_pulls_and_pushes(core, tmp_path):
    location, pki, admin = core
    cfg = load_fog_config(config(tmp_path, location, pki, client_cert=True))
    check_core_tls(cfg.core, source="fog.toml")  # core takes the connection
    stores = devices(tmp_path, 2)
    grid = LoopbackGrid(agent_app, list(stores), node_config=lambda node: {"store-dir": str(stores[node])})
    rounds = run_fog(grid, cfg)
    assert [r.version for r in rounds] == [1], [r.reasons for r in rounds]
    versions = admin.list_versions("digits-model")
    assert [(v["version"], v["actor"], v["layers"], v["participants"]) for v in versions[1:]] == \
        [(1, "fog-west", ["head"], 2)]


def test_without_a_client_certificate_fog_run_refuses_to_start(core, tmp_path):
    location, pki, _ = core
    path = config(tmp_path, location, pki, client_cert=False)
    with pytest.raises(ConfigError, match="asks for a client certificate") as refused:
        check_core_tls(load_fog_config(path).core, source=str(path))
    assert refused.value.key == "core.tls_client_cert"
    out = subprocess.run([sys.executable, "-m", "hyprstream.cli", "fog", "run", "--config", str(path)], env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "SuperLink on" not in out.stdout, out.stdout + out.stderr
    port = location.rsplit(":", 1)[1]
    assert out.stderr.splitlines() == [
        f"hyprstream: config error: {path}: core.tls_client_cert: core at localhost:{port} closed the connection: "
        "it asks for a client certificate (mutual TLS, core's tls.client_ca); set core.tls_client_cert and "
        "core.tls_client_key"]


def test_client_certificate_keys_are_checked(core, tmp_path):
    location, pki, _ = core
    path = config(tmp_path, location, pki, client_cert=True)
    text = path.read_text()
    cases = {  # the change to the config, the key named, the reason
        "pair": (text.replace(f'tls_client_key = "{pki / "client-fog-west.key"}"\n', ""), "core.tls_client_cert",
                 "a client certificate needs tls_client_cert and tls_client_key together"),
        "plain": (text.replace("grpc+tls://", "grpc://"), "core.tls_client_cert",
                  'a client certificate needs TLS: location = "grpc+tls://HOST:PORT"'),
        "other key": (text.replace("client-fog-west.key", "client-admin.key"), "core.tls_client_key",
                      f"{pki / 'client-admin.key'} is not the key of {pki / 'client-fog-west.pem'}"),
    }
    for name, (changed, key, reason) in cases.items():
        path.write_text(changed)
        with pytest.raises(ConfigError) as refused:
            load_fog_config(path)
        assert (refused.value.key, refused.value.reason) == (key, reason), name
    path.write_text(text.replace("client-fog-west.pem", "missing.pem"))
    out = subprocess.run([sys.executable, "-m", "hyprstream.cli", "config", "validate", str(path)], env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "core.tls_client_cert" in out.stdout + out.stderr and "missing.pem" in \
        out.stdout + out.stderr, out.stdout + out.stderr
