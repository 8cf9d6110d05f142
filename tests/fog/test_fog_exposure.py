"""What a fog exposes to the network: ``hyprstream fog run`` with TLS and SuperNode authentication, its
public port on 127.0.0.2 (another address than the loopback 127.0.0.1 the fog keeps for itself), a real
core Flight server, and an attacker: a separate ``flwr`` process holding only the fog's CA certificate.
The attacker can neither register a node key, nor list the fog's runs, nor start a run; a SuperNode
whose key the operator registered on the fog host trains a round. One deployment for the module."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fogrun import ENV, digits_stores, fog_toml, free_port

from hyprstream.learning.task import get_task
from hyprstream.learning.trainer import model_weights
from hyprstream.core.auth import Principal, Role, TokenRegistry
from hyprstream.core.certs import init_deployment
from hyprstream.coreapi.client import CoreClient
from hyprstream.core.repository import ModelRepository
from hyprstream.core.server import CoreFlightServer
from hyprstream.fog.service import executable, stop_process
from hyprstream.store import to_table

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PUBLIC = "127.0.0.2"  # the fog's address as devices (and the attacker) reach it
REFUSED = ("this port serves the Flower Fleet API only; the fog's Control and ServerAppIo APIs are reachable "
           "from the fog host alone")


def node_key(path: Path) -> Path:
    """An ECDSA P-384 key pair in OpenSSH format (``path`` and ``path.pub``), as SuperNodes use."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH))
    return pub


def said(out: subprocess.CompletedProcess) -> str:
    """What a ``flwr`` command printed, its line wrapping undone."""
    return " ".join((out.stdout + out.stderr).split())


def flwr(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([executable("flwr"), *args], env={**ENV, "FLWR_HOME": str(home), "COLUMNS": "1000"}, capture_output=True,
                          text=True, timeout=timeout)


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        assert proc.poll() is None, path.read_text()
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} after {timeout_s} s")


@pytest.fixture(scope="module")
def fog(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exposure")
    init_deployment(tmp / "pki", server_names=[PUBLIC])
    tokens = TokenRegistry()
    tokens.add("admin-token", Principal("admin", Role.ADMIN))
    tokens.add("fog-token", Principal("fog-edge", Role.FOG))
    server = CoreFlightServer(ModelRepository(tmp / "core"), tokens)
    location = server.start_background()
    task = get_task("digits")
    with CoreClient(location, "admin-token") as admin:
        admin.register_model("digits-model", to_table(model_weights(task.build_model(seed=0)), layer=task.layer_of))
    port, state = free_port(), tmp / "fog-state"
    pki = tmp / "pki"
    config = fog_toml(tmp / "fog.toml", name="fog-edge", location=location, token="fog-token",
                      model="digits-model", state_dir=state, body=f"""
[superlink]
host = "{PUBLIC}"
port = {port}
ssl_certfile = "{pki / 'server.pem'}"
ssl_keyfile = "{pki / 'server.key'}"
ssl_ca_certfile = "{pki / 'ca.pem'}"
supernode_auth = true
database = "{state / 'superlink.db'}"
[rounds]
task = "digits"
layers = ["head"]
local_steps = 2
min_agents = 1
min_replies = 1
timeout_s = 180
max_rounds = 1
""")
    log = tmp / "fog.log"
    legacy = {"FLWR_INTERNAL_GRPC_CONTROL_API": "1", "FLWR_INTERNAL_GRPC_FLEET_API": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hyprstream.cli", "fog", "run", "--config", str(config)],
                            env={**ENV, **legacy}, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        wait_for_text(log, "SuperLink on", proc)
        yield {"tmp": tmp, "port": port, "state": state, "ca": pki / "ca.pem", "proc": proc, "log": log,
               "location": location}
    finally:
        stop_process(proc)
        server.stop()


@pytest.fixture(scope="module")
def attacker(fog):
    """The attacker's Flower home: a connection to the fog's public port with the fog's CA, nothing else."""
    home = fog["tmp"] / "attacker-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "victim"\n\n[superlink.victim]\n'
                                      f'address = "{PUBLIC}:{fog["port"]}"\nroot-certificates = "{fog["ca"]}"\n')
    return home


def operator(fog, *args: str) -> subprocess.CompletedProcess:
    """``flwr`` on the fog host through the connection ``fog run`` wrote into its Flower home."""
    return flwr(fog["state"] / "flwr-home", *args)


def registered_keys(fog) -> list[str]:
    listed = operator(fog, "supernode", "list", "fog", "--format", "json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    return [n["node-id"] for n in json.loads(listed.stdout)["nodes"]]


def test_an_attacker_cannot_register_a_node_key(fog, attacker):
    pub = node_key(fog["tmp"] / "attacker.key")
    before = registered_keys(fog)
    out = flwr(attacker, "supernode", "register", str(pub), "victim")
    assert out.returncode != 0 and REFUSED in said(out), said(out)
    assert registered_keys(fog) == before


def test_an_attacker_cannot_list_runs(fog, attacker):
    out = flwr(attacker, "ls", "victim", "--format", "json")
    answer = json.loads(out.stdout)
    assert answer["success"] is False and "runs" not in answer, out.stdout
    assert answer["error-message"].endswith(REFUSED)


def test_an_attacker_cannot_start_a_run(fog, attacker):
    app = fog["tmp"] / "evil-app"
    app.mkdir()
    (app / "evil.py").write_text("from flwr.serverapp import ServerApp\napp = ServerApp()\n\n"
                                 "@app.main()\ndef main(grid, context):\n"
                                 f"    open({str(fog['tmp'] / 'pwned')!r}, 'w').write('pwned')\n")
    (app / "pyproject.toml").write_text('[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
                                        '[project]\nname = "evil"\nversion = "1.0.0"\ndependencies = []\n'
                                        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n'
                                        '[tool.flwr.app]\npublisher = "evil"\n'
                                        '[tool.flwr.app.components]\nserverapp = "evil:app"\nclientapp = "evil:app"\n')
    out = flwr(attacker, "run", str(app), "victim")
    assert out.returncode != 0 and REFUSED in said(out), said(out)
    runs = operator(fog, "ls", "fog", "--format", "json")
    assert runs.returncode == 0, runs.stdout + runs.stderr
    assert [r["fab-id"] for r in json.loads(runs.stdout)["runs"]] == ["hyprstream/hyprstream-fog"]
    assert not (fog["tmp"] / "pwned").exists()


def test_the_control_and_runtime_apis_are_not_on_the_public_address(fog):
    """What the fog's SuperLink itself listens on (its Control, Runtime and Fleet APIs): 127.0.0.1 only."""
    home = fog["state"] / "flwr-home"
    address = next(line.split('"')[1] for line in (home / "config.toml").read_text().splitlines()
                   if line.startswith("address"))
    host, port = address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) != fog["port"]
    with socket.socket() as s:
        assert s.connect_ex((PUBLIC, int(port))) != 0  # refused on the public address


def listening(proc: psutil.Process) -> set[tuple[str, int]]:
    """The TCP addresses ``proc`` and its descendants listen on."""
    found = set()
    for p in [proc, *proc.children(recursive=True)]:
        try:
            found |= {c.laddr[:2] for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            continue
    return found


def test_the_fog_listens_on_loopback_except_its_public_fleet_port(fog):
    """Every socket of ``fog run`` and its processes (SuperLink, flwr run, SuperExec, ServerApp): the gateway
    on the public address, the rest on 127.0.0.1 (an environment asking Flower for its legacy gRPC servers
    changes nothing)."""
    found = listening(psutil.Process(fog["proc"].pid))
    assert (PUBLIC, fog["port"]) in found
    assert {host for host, _ in found - {(PUBLIC, fog["port"])}} == {"127.0.0.1"}, found


def test_only_fleet_api_requests_pass_the_public_port(fog):
    context = ssl.create_default_context(cafile=str(fog["ca"]))

    def post(method: str, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection(PUBLIC, fog["port"], context=context, timeout=30)
        try:
            conn.request(method, path, body=b"\x00garbage", headers={"Content-Type": "application/protobuf"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    refused = (403, json.dumps({"detail": REFUSED}).encode())
    for method, path in [("POST", "/v1/control/list-runs"), ("POST", "/v1/runtime/create-task"),
                         ("POST", "/v1/fleet/../control/list-runs"), ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
                         ("POST", "/v1/fleet/get-run?x=/v1/control"), ("GET", "/docs"), ("GET", "/health"),
                         ("PUT", "/v1/fleet/get-run")]:
        assert post(method, path) == refused, (method, path)
    status, body = post("POST", "/v1/fleet/get-run")  # passed on: the SuperLink itself refuses the garbage
    assert status in (400, 401, 422) and body != refused[1], (status, body)


def test_a_registered_supernode_trains(fog):
    stores = digits_stores(fog["tmp"], 1, 100)
    pub = node_key(fog["tmp"] / "device.key")
    reg = operator(fog, "supernode", "register", str(pub), "fog")
    assert reg.returncode == 0, reg.stdout + reg.stderr
    node = subprocess.Popen([executable("flower-supernode"), "--superlink", f"{PUBLIC}:{fog['port']}",
                             "--root-certificates", str(fog["ca"]), "--auth-supernode-private-key",
                             str(fog["tmp"] / "device.key"), "--port", str(free_port()),
                             "--node-config", f"store-dir='{stores[0]}'"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not listening(psutil.Process(node.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert {host for host, _ in listening(psutil.Process(node.pid))} == {"127.0.0.1"}  # its ClientAppIo
        assert fog["proc"].wait(timeout=540) == 0, fog["log"].read_text()
    finally:
        stop_process(node)
    with CoreClient(fog["location"], "admin-token") as admin:
        versions = admin.list_versions("digits-model")
    assert [(v["version"], v["actor"], v["layers"], v["participants"]) for v in versions[1:]] == \
        [(1, "fog-edge", ["head"], 1)]
