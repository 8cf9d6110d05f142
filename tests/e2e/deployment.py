"""A three-tier deployment of real processes on loopback, for the end-to-end tests.

Keys, certificates and tokens come from the ``hyprstream certs init`` and ``hyprstream token create``
commands; core runs as ``hyprstream core run`` with TLS, each fog as ``hyprstream fog run`` (its
SuperLink with TLS and SuperNode authentication), each device as ``hyprstream agent run`` (its own
encrypted store filled through its watched directory, its own node key, telemetry to a mosquitto
broker over TLS with a password). Every process is started and stopped by its PID.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from hyprstream.learning.task import get_task
from hyprstream.learning.trainer import evaluate, load_weights, model_weights
from hyprstream.core import audit
from hyprstream.coreapi.client import CoreClient
from hyprstream.consistency import ConsistencyMode, ConsistencyPolicy
from hyprstream.core.repository import ModelSettings
from hyprstream.poc import PROFILE, write_broker_config, write_core_config
from hyprstream.store import to_arrays, to_table

BIN = str(Path(sys.executable).parent)
MOSQUITTO = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin")
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
SSH_KEYGEN = shutil.which("ssh-keygen")
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
       "PATH": os.pathsep.join([BIN, os.environ.get("PATH", "")])}
MODEL = "digits-model"

DEVICE_PROFILE = PROFILE  # a device on a shared test host that trains whenever asked


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout_s: float, step_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return False


def cli(*args: str, cwd: Path) -> str:
    """``hyprstream ARGS`` (this environment's); its stdout. Fails with its output when it fails."""
    run = subprocess.run([sys.executable, "-m", "hyprstream.cli", *args], cwd=cwd, env=ENV, capture_output=True,
                         text=True, timeout=300)
    if run.returncode != 0:
        raise RuntimeError(f"hyprstream {' '.join(args)} exited with {run.returncode}: {run.stderr[-2000:]}")
    return run.stdout


class Service:
    """A child process logging to ``log``; ``stop`` sends SIGTERM, then SIGKILL after a bounded wait, and
    then SIGKILLs whatever of its descendants is left."""

    def __init__(self, name: str, cmd: list[str], log: Path, *, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.cmd, self.log, self.cwd, self.env = name, cmd, log, cwd, env or ENV
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd, env=self.env)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, text: str, timeout_s: float = 180.0) -> None:
        if not wait_until(lambda: text in self.text() or not self.running(), timeout_s) or text not in self.text():
            raise RuntimeError(f"{self.name}: no {text!r} in its log within {timeout_s:.0f} s "
                               f"(running: {self.running()}):\n{self.text()[-3000:]}")

    def _descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def kill(self) -> None:
        """SIGKILL by PID (what a power cut does to the process); its descendants are left alone."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        kids = self._descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        _, alive = psutil.wait_procs(kids, timeout=10)
        for kid in alive:
            try:
                kid.kill()
            except psutil.Error:
                pass
        return self.proc.returncode


class Forwarder:
    """A TCP forwarder from 127.0.0.1:``port`` to ``target``: ``close`` cuts the link (the listener and
    every open connection), ``open`` restores it on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.open()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            listener.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@dataclass
class Fog:
    name: str
    port: int
    dir: Path
    metrics_port: int = field(default_factory=lambda: free_port())  # two fogs share this host: one port each
    service: Service | None = None
    agents: dict[str, Service] = field(default_factory=dict)

    @property
    def state(self) -> Path:
        return self.dir / "state"


class Deployment:
    """Core, an MQTT broker, fogs and agents under ``root``; ``close`` stops everything."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.services: list[Service] = []
        self.fogs: dict[str, Fog] = {}
        self.devices: list[str] = []
        self.task = get_task("digits")
        self.train, self.test = self.task.load_reference_data(seed=0)
        (root / "core").mkdir(parents=True)
        cli("certs", "init", "--out", "core/pki", "--server-name", "127.0.0.1", cwd=root)
        self.core_ca = (root / "core/pki/ca.pem").read_bytes()
        self.reader_token = self.token("dashboard", "reader")

    # ---------------------------------------------------------------------------------------- core

    def token(self, sub: str, role: str) -> str:
        return cli("token", "create", "--key", "core/pki/token-signing.key", "--sub", sub, "--role", role,
                   "--ttl", "2h", cwd=self.root).strip()

    def start_core(self) -> None:
        """Core with TLS, its metrics endpoint on a free port, and every version of the model scored on the
        digits test split (the regression guard warns)."""
        self.core_port, self.metrics_port = free_port(), free_port()
        write_core_config(self.root / "core", port=self.core_port, metrics_port=self.metrics_port,
                          validation=self.task.to_table(self.test), guard="warn", margin=0.05)
        self.core = self._start("core", [sys.executable, "-m", "hyprstream.cli", "core", "run", "--config",
                                         "core/core.toml"], self.root / "core/core.log")
        self.core.wait_for("serving on grpc+tls://127.0.0.1:")
        self.core_location = f"grpc+tls://127.0.0.1:{self.core_port}"

    def register_model(self) -> None:
        initial = to_table(model_weights(self.task.build_model(seed=0)), layer=self.task.layer_of)
        settings = ModelSettings(consistency=ConsistencyPolicy(mode=ConsistencyMode.EVENTUAL))
        with CoreClient(self.core_location, self.token("operator", "admin"), tls_root_certs=self.core_ca) as admin:
            admin.register_model(MODEL, initial, settings)

    def reader(self) -> CoreClient:
        return CoreClient(self.core_location, self.reader_token, tls_root_certs=self.core_ca, timeout_s=30)

    def versions(self) -> list[dict]:
        with self.reader() as core:
            return core.list_versions(MODEL)

    def accuracy(self, version: int | None = None) -> float:
        """Test accuracy of a version at core (default: the current one), fetched with a reader token."""
        with self.reader() as core:
            snapshot = core.get_weights(MODEL, version)
        model = self.task.build_model(seed=0)
        load_weights(model, to_arrays(snapshot.table))
        return evaluate(self.task, model, self.test)[1]

    def audit_entries(self) -> list[audit.AuditEntry]:
        return list(audit.iter_entries(self.root / "core/audit/audit.jsonl"))

    def audit_verify(self) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hyprstream.cli", "audit", "verify",
                               "core/audit/audit.jsonl", "--key", "core/pki/audit-signing.pub"],
                              cwd=self.root, env=ENV, capture_output=True, text=True, timeout=120)

    # -------------------------------------------------------------------------------------- broker

    def start_broker(self, devices: list[str]) -> None:
        broker = self.root / "broker"
        broker.mkdir()
        cli("certs", "init", "--out", "broker/pki", "--server-name", "127.0.0.1", cwd=self.root)
        self.mqtt_passwords = {name: secrets.token_urlsafe(16) for name in [*devices, "monitor"]}
        self.mqtt_port = free_port()
        write_broker_config(broker, self.mqtt_passwords, self.mqtt_port)
        self.broker = self._start("mosquitto", [MOSQUITTO, "-c", str(broker / "mosquitto.conf")],
                                  broker / "mosquitto.log")
        self.broker.wait_for(" running", 30)

    def mqtt_connect(self, user: str | None, password: str | None, on_message=None):
        """A paho client over TLS with the broker's CA; returns (client, connect result code)."""
        import paho.mqtt.client as mqtt

        result: list[int] = []
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"e2e-{secrets.token_hex(4)}")
        client.tls_set(ca_certs=str(self.root / "broker/pki/ca.pem"), cert_reqs=ssl.CERT_REQUIRED)
        if user is not None:
            client.username_pw_set(user, password)
        client.on_connect = lambda c, u, flags, rc, props=None: result.append(rc.value)
        if on_message is not None:
            client.on_message = on_message
        client.connect("127.0.0.1", self.mqtt_port)
        client.loop_start()
        wait_until(lambda: bool(result), 20, 0.1)
        return client, (result[0] if result else None)

    # ----------------------------------------------------------------------------------------- fogs

    def start_fog(self, name: str, *, core_location: str | None = None, min_agents: int = 3, min_replies: int = 2,
                  timeout_s: float = 300.0, local_steps: int = 15, extra: str = "") -> Fog:
        fog = Fog(name, free_port(), self.root / name)
        fog.state.mkdir(parents=True)
        cli("certs", "init", "--out", f"{name}/pki", "--server-name", "127.0.0.1", cwd=self.root)
        shutil.copy(self.root / "core/pki/ca.pem", fog.dir / "core-ca.pem")
        token = fog.dir / "fog.token"
        token.write_text(self.token(name, "fog") + "\n")
        token.chmod(0o600)
        (fog.dir / "fog.toml").write_text(f"""kind = "fog"
name = "{name}"
state_dir = "{fog.state}"
[core]
location = "{core_location or self.core_location}"
tls_root_cert = "{fog.dir / 'core-ca.pem'}"
token_file = "{token}"
model = "{MODEL}"
[superlink]
host = "127.0.0.1"
port = {fog.port}
ssl_certfile = "{fog.dir / 'pki/server.pem'}"
ssl_keyfile = "{fog.dir / 'pki/server.key'}"
ssl_ca_certfile = "{fog.dir / 'pki/ca.pem'}"
supernode_auth = true
database = "{fog.state / 'superlink.db'}"
[rounds]
task = "digits"
layers = ["fc1", "fc2", "head"]
schedule = "fixed"
local_steps = {local_steps}
batch_size = 32
lr = 0.01
min_agents = {min_agents}
min_replies = {min_replies}
timeout_s = {timeout_s}
max_rounds = 0
pause_s = 1.0
[metrics]
port = {fog.metrics_port}
{extra}""")
        fog.service = self._start(name, [sys.executable, "-m", "hyprstream.cli", "fog", "run", "--config",
                                         str(fog.dir / "fog.toml")], fog.dir / "fog.log")
        fog.service.wait_for("SuperLink on")
        self.fogs[name] = fog
        return fog

    # -------------------------------------------------------------------------------------- devices

    def add_device(self, fog: Fog, device: str, shard: int, shards: int) -> None:
        """Keys, data and profile of ``device``, which will join ``fog`` (see :meth:`register`)."""
        d = self.root / device
        (d / "inbox").mkdir(parents=True)
        subprocess.run([SSH_KEYGEN, "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", device, "-f",
                        str(d / "node.key")], check=True)
        shutil.copy(d / "node.key.pub", fog.dir / f"{device}.pub")
        shutil.copy(fog.dir / "pki/ca.pem", d / "fog-ca.pem")
        shutil.copy(self.root / "broker/pki/ca.pem", d / "mqtt-ca.pem")
        (d / "store.key").write_text(secrets.token_hex(32) + "\n")
        (d / "store.key").chmod(0o600)
        (d / "profile.toml").write_text(DEVICE_PROFILE)
        x, y = self.train.x[shard::shards][:200], self.train.y[shard::shards][:200]
        lines = [json.dumps({"features": [float(v) for v in row], "label": int(label)}) for row, label in zip(x, y)]
        (d / "inbox/.digits.jsonl").write_text("\n".join(lines) + "\n")
        (d / "inbox/.digits.jsonl").rename(d / "inbox/digits.jsonl")
        self.devices.append(device)

    def register(self, fog: Fog, devices: list[str]) -> None:
        """``flwr supernode register`` of the devices' public keys with the running ``fog``'s SuperLink
        (through the connection ``fog`` that ``hyprstream fog run`` writes into its Flower home)."""
        env = {**ENV, "FLWR_HOME": str(fog.state / "flwr-home")}
        procs = [subprocess.Popen([os.path.join(BIN, "flwr"), "supernode", "register", str(fog.dir / f"{d}.pub"),
                                   "fog"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for d in devices]
        for proc in procs:
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0 and "registered successfully" in out, out

    def start_agent(self, fog: Fog, device: str) -> Service:
        d = self.root / device
        cmd = [sys.executable, "-m", "hyprstream.cli", "agent", "run", "--config", str(d / "profile.toml"),
               "--store", str(d / "store"), "--store-key", str(d / "store.key"), "--fleet", "e2e",
               "--device-id", device, "--task", "digits", "--watch", str(d / "inbox"),
               "--fog", f"127.0.0.1:{fog.port}", "--fog-ca", str(d / "fog-ca.pem"), "--fog-auth-key",
               str(d / "node.key"), "--mqtt", f"127.0.0.1:{self.mqtt_port}", "--mqtt-ca", str(d / "mqtt-ca.pem"),
               "--mqtt-user", device, "--listen", str(free_port())]  # several agents on one host: a port each
        env = {**ENV, "HYPRSTREAM_MQTT_PASSWORD": self.mqtt_passwords[device], "HYPRSTREAM_TORCH_THREADS": "1"}
        agent = self._start(device, cmd, d / "agent.log", env=env)
        fog.agents[device] = agent
        return agent

    def models_received(self, device: str) -> list[int]:
        """Versions of the global model that ``device``'s ClientApp has received in train requests."""
        found = (self.root / device / "store.state/models/digits").glob("v*.arrow")
        return sorted(int(p.stem[1:]) for p in found)

    # ---------------------------------------------------------------------------------------- misc

    def _start(self, name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Service:
        service = Service(name, cmd, log, cwd=self.root, env=env)
        self.services.append(service)
        return service

    def logs(self, chars: int = 1500) -> str:
        out = []
        for log in sorted(self.root.rglob("*.log")):
            text = log.read_text(errors="replace")
            if text:
                out.append(f"--- {log.relative_to(self.root)} ---\n{text[-chars:]}")
        return "\n".join(out)

    def close(self) -> None:
        """Stop agents, then fogs, then core, then the broker."""
        order = {"agent": 0, "fog": 1, "core": 2, "mosquitto": 3}

        def rank(s: Service) -> int:
            if s.name in self.devices:
                return order["agent"]
            return order["fog"] if s.name in self.fogs else order.get(s.name, 1)

        for service in sorted(self.services, key=rank):
            service.stop()

