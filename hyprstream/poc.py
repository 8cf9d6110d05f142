"""``hyprstream deploy poc``: a whole federation on this host, for trying Hyprstream out (like ``nvflare poc``).

One command makes a deployment CA and certificates, signed tokens, a core (TLS, metrics, every version of
the model scored on held-out rows), a mosquitto broker (TLS, passwords), N fogs (SuperLink TLS, SuperNode
authentication, metrics) and M agents per fog (each its own encrypted store, node key, device profile and
shard of the digits data), all on 127.0.0.1, under one directory. It registers the ``digits-model``,
prints where each piece listens and how to watch it, and writes ``poc.json``: every process with its PID
and start time. ``deploy poc --stop`` stops them in order (agents first, so that devices say
``offline/shutdown`` rather than leaving their Last Will; then fogs, core, the broker), each by its PID
(SIGTERM, then SIGKILL after a bounded wait; a PID whose start time differs is another process and is
left alone), and then whatever children they left.

Needs ``mosquitto`` and ``mosquitto_passwd`` (Debian's ``mosquitto``) and ``ssh-keygen`` (OpenSSH). Not for
production: every secret lives in that directory (docs/deploy.md deploys on separate hosts).
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from hyprstream.errors import ConfigError, HyprstreamError
from hyprstream.runtime import executable

MODEL = "digits-model"
STATE = "poc.json"
ORDER = ("dashboard", "agent", "fog", "core", "broker")  # the order --stop stops them in
# a device that trains whenever asked: the agents share this host's cores with core and the fogs, so a real
# device's thresholds (firmware-configs/) would keep most of them out of rounds
PROFILE = """\
kind = "device"
name = "Proof-of-concept device on this host"
device_class = "poc"
[resources]
cpu_cores = 2
cpu_max_mhz = 3000
memory_mb = 4096
storage_mb = 10000
tdp_watts = 30.0
[policy]
full_max_cpu_percent = 90.0
hybrid_max_cpu_percent = 100.0
max_memory_percent = 100.0
max_soc_temp_c = 125.0
min_dwell_s = 0.0
initial_strategy = "full"
[training]
privacy_epsilon = 8.0
privacy_delta = 1e-5
max_local_steps = 100
batch_size_full = 32
batch_size_hybrid = 32
max_layer_groups_hybrid = 3
holdout_share = 0.2
[store]
max_mb = 1000
[telemetry]
interval_s = 5.0
reconnect_backoff_min_s = 0.2
[simulation]
compute_speed_factor = 1.0
uplink_mbps = 100.0
downlink_mbps = 100.0
"""


@dataclass
class Process:
    name: str
    kind: str  # agent, fog, core, broker
    pid: int
    started: float  # psutil's create_time: a PID reused by another process has another
    log: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        raise ConfigError(f"{name} is not installed (Debian: apt-get install "
                          f"{'openssh-client' if name == 'ssh-keygen' else 'mosquitto'})", source="deploy poc")
    return path


def write_core_config(core: Path, *, port: int, metrics_port: int, validation, guard: str = "warn",
                      margin: float = 0.02) -> Path:
    """``core/core.toml`` for a loopback core with TLS (``core/pki`` from ``certs init``), its metrics endpoint,
    and :data:`MODEL` scored on ``validation`` (a table of digits rows, written to ``core/validation.arrow``)."""
    import pyarrow as pa

    with pa.OSFile(str(core / "validation.arrow"), "wb") as f, pa.ipc.new_file(f, validation.schema) as writer:
        writer.write_table(validation)
    path = core / "core.toml"
    path.write_text(f"""kind = "core"
[server]
listen = "127.0.0.1:{port}"
[storage]
uri = "models"
[audit]
path = "audit/audit.jsonl"
signing_key = "pki/audit-signing.key"
[auth]
token_key = "pki/token-signing.key"
[tls]
cert = "pki/server.pem"
key = "pki/server.key"
[metrics]
listen = "127.0.0.1:{metrics_port}"
[evaluation.{MODEL}]
task = "digits"
validation = "validation.arrow"
guard = "{guard}"
margin = {margin}
""")
    return path


def write_broker_config(broker: Path, passwords: dict[str, str], port: int) -> Path:
    """The password file (``mosquitto_passwd``) and ``mosquitto.conf`` of a loopback broker with TLS
    (``broker/pki`` from ``certs init``) that refuses anonymous clients."""
    passwd = broker / "passwd"
    passwd.touch(mode=0o600)
    for user, password in passwords.items():
        subprocess.run([_tool("mosquitto_passwd"), "-b", str(passwd), user, password], check=True, capture_output=True)
    conf = broker / "mosquitto.conf"
    conf.write_text(f"""user {getpass.getuser()}
per_listener_settings false
allow_anonymous false
password_file {passwd}
persistence false
listener {port} 127.0.0.1
cafile {broker / 'pki/ca.pem'}
certfile {broker / 'pki/server.pem'}
keyfile {broker / 'pki/server.key'}
""")
    return conf


class Poc:
    """The federation under ``root``; :meth:`up` starts it, :func:`stop` (from ``poc.json``) stops it."""

    def __init__(self, root: Path, *, fogs: int, agents: int, local_steps: int = 15) -> None:
        if fogs < 1 or agents < 1:
            raise ConfigError("--fogs and --agents must be >= 1", source="deploy poc")
        self.root, self.fogs, self.agents, self.local_steps = root, fogs, agents, local_steps
        self.env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "PYTHONUNBUFFERED": "1", "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                                                         os.environ.get("PATH", "")])}
        self.processes: list[Process] = []
        self.endpoints: dict[str, object] = {}

    # ..................................................................................... helpers

    def _cli(self, *args: str) -> str:
        run = subprocess.run([sys.executable, "-m", "hyprstream.cli", *args], cwd=self.root, env=self.env,
                             capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            raise HyprstreamError(f"hyprstream {' '.join(args[:2])} failed: {run.stderr.strip()[-500:]}")
        return run.stdout

    def _start(self, name: str, kind: str, cmd: list[str], log: Path, *, env: dict | None = None,
               ready: str | None = None, timeout_s: float = 180.0) -> Process:
        with log.open("ab") as out:  # a session of its own: the process outlives this command
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=self.root, env=env or self.env,
                                    start_new_session=True)
        p = Process(name, kind, proc.pid, psutil.Process(proc.pid).create_time(), str(log))
        self.processes.append(p)
        self._save()
        if ready is not None:
            deadline = time.monotonic() + timeout_s
            while ready not in log.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise HyprstreamError(f"{name} did not start ({'exited' if proc.poll() is not None else 'timeout'}"
                                          f"); its log {log}:\n{log.read_text(errors='replace')[-1500:]}")
                time.sleep(0.2)
        return p

    def _save(self) -> None:
        state = {"processes": [asdict(p) for p in self.processes], "endpoints": self.endpoints}
        (self.root / STATE).write_text(json.dumps(state, indent=1) + "\n")

    def _token(self, sub: str, role: str, path: Path) -> Path:
        path.write_text(self._cli("token", "create", "--key", "core/pki/token-signing.key", "--sub", sub, "--role",
                                  role, "--ttl", "30d"))
        path.chmod(0o600)
        return path

    # .......................................................................................... up

    def up(self) -> dict[str, object]:
        for tool in ("mosquitto", "mosquitto_passwd", "ssh-keygen"):
            _tool(tool)
        if (self.root / STATE).exists():
            raise ConfigError(f"{self.root} holds a federation already: `hyprstream deploy poc --stop --dir "
                              f"{self.root}` first", source="deploy poc")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "core").mkdir(exist_ok=True)
        self._save()  # from here on, --stop finds whatever was started
        self._core()
        devices = [f"device-{f + 1}-{a + 1}" for f in range(self.fogs) for a in range(self.agents)]
        self._broker(devices)
        for f in range(self.fogs):
            self._fog(f"fog-{f + 1}", devices[f * self.agents:(f + 1) * self.agents], shard0=f * self.agents)
        self._dashboard()
        self._save()
        return self.endpoints

    def _dashboard(self) -> None:
        port = _free_port()
        cmd = [sys.executable, "-m", "hyprstream.cli", "dashboard", "--core", self.location, "--ca",
               str(self.root / "core/pki/ca.pem"), "--audit-key", str(self.root / "core/pki/audit-signing.pub"),
               "--mqtt", f"127.0.0.1:{self.mqtt_port}", "--mqtt-ca", str(self.root / "broker/pki/ca.pem"),
               "--mqtt-user", "monitor", "--fleet", "poc", "--listen", f"127.0.0.1:{port}"]
        self._start("dashboard", "dashboard", cmd, self.root / "dashboard.log",
                    env={**self.env, "HYPRSTREAM_MQTT_PASSWORD": self.passwords["monitor"]}, ready="serving on",
                    timeout_s=60)
        self.endpoints.update(dashboard=f"http://127.0.0.1:{port}/",
                              auditor_token=str(self._token("auditor", "auditor", self.root / "auditor.token")))

    def _core(self) -> None:
        from hyprstream.learning.task import get_task

        self._cli("certs", "init", "--out", "core/pki", "--server-name", "127.0.0.1")
        task = get_task("digits")
        self.train, test = task.load_reference_data(seed=0)
        port, metrics = _free_port(), _free_port()
        write_core_config(self.root / "core", port=port, metrics_port=metrics, validation=task.to_table(test))
        self._start("core", "core", [sys.executable, "-m", "hyprstream.cli", "core", "run", "--config",
                                     "core/core.toml"], self.root / "core/core.log", ready="serving on")
        self.location = f"grpc+tls://127.0.0.1:{port}"
        self.endpoints.update(core=self.location, core_metrics=f"http://127.0.0.1:{metrics}/metrics",
                              ca=str(self.root / "core/pki/ca.pem"),
                              reader_token=str(self._token("operator", "reader", self.root / "reader.token")))
        from hyprstream.coreapi.client import CoreClient
        from hyprstream.learning.trainer import model_weights
        from hyprstream.store import to_table

        admin = self._cli("token", "create", "--key", "core/pki/token-signing.key", "--sub", "poc-admin", "--role",
                          "admin", "--ttl", "1h").strip()
        with CoreClient(self.location, admin, tls_root_certs=(self.root / "core/pki/ca.pem").read_bytes()) as c:
            c.register_model(MODEL, to_table(model_weights(task.build_model(seed=0)), layer=task.layer_of))
        self.task = task

    def _broker(self, devices: list[str]) -> None:
        broker = self.root / "broker"
        broker.mkdir(exist_ok=True)
        self._cli("certs", "init", "--out", "broker/pki", "--server-name", "127.0.0.1")
        self.passwords = {name: secrets.token_urlsafe(16) for name in [*devices, "monitor"]}
        (broker / "monitor.password").write_text(self.passwords["monitor"] + "\n")
        (broker / "monitor.password").chmod(0o600)
        self.mqtt_port = _free_port()
        write_broker_config(broker, self.passwords, self.mqtt_port)
        self._start("mosquitto", "broker", [_tool("mosquitto"), "-c", str(broker / "mosquitto.conf")],
                    broker / "mosquitto.log", ready=" running", timeout_s=30)
        self.endpoints["mqtt"] = f"mqtts://127.0.0.1:{self.mqtt_port} (user monitor, password in " \
                                 f"{broker / 'monitor.password'})"

    def _fog(self, name: str, devices: list[str], shard0: int) -> None:
        d = self.root / name
        (d / "state").mkdir(parents=True, exist_ok=True)
        self._cli("certs", "init", "--out", f"{name}/pki", "--server-name", "127.0.0.1")
        token = self._token(name, "fog", d / "fog.token")
        port, metrics = _free_port(), _free_port()
        (d / "fog.toml").write_text(f"""kind = "fog"
name = "{name}"
state_dir = "{d / 'state'}"
[core]
location = "{self.location}"
tls_root_cert = "{self.root / 'core/pki/ca.pem'}"
token_file = "{token}"
model = "{MODEL}"
[superlink]
host = "127.0.0.1"
port = {port}
ssl_certfile = "{d / 'pki/server.pem'}"
ssl_keyfile = "{d / 'pki/server.key'}"
ssl_ca_certfile = "{d / 'pki/ca.pem'}"
supernode_auth = true
database = "{d / 'state/superlink.db'}"
[rounds]
task = "digits"
layers = ["fc1", "fc2", "head"]
local_steps = {self.local_steps}
batch_size = 32
lr = 0.01
min_agents = {len(devices)}
min_replies = {min(2, len(devices))}
timeout_s = 300.0
max_rounds = 0
pause_s = 1.0
evaluate = true
[metrics]
port = {metrics}
""")
        self._start(name, "fog", [sys.executable, "-m", "hyprstream.cli", "fog", "run", "--config", str(d / "fog.toml")],
                    d / "fog.log", ready="SuperLink on")
        fog_env = {**self.env, "FLWR_HOME": str(d / "state/flwr-home")}
        agents = {}
        for j, device in enumerate(devices):
            agents[device] = self._device(device, d, port, shard0 + j, fog_env)
        self.endpoints[name] = {"superlink": f"127.0.0.1:{port}", "metrics": f"http://127.0.0.1:{metrics}/metrics",
                                "log": str(d / "state/fog.log"), "agents": agents}

    def _device(self, device: str, fog_dir: Path, fog_port: int, shard: int, fog_env: dict) -> dict:
        d = self.root / device
        (d / "inbox").mkdir(parents=True, exist_ok=True)
        subprocess.run([_tool("ssh-keygen"), "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", device, "-f",
                        str(d / "node.key")], check=True)
        run = subprocess.run([executable("flwr"), "supernode", "register", str(d / "node.key.pub"), "fog"],
                             env=fog_env, capture_output=True, text=True, timeout=300)
        if run.returncode != 0 or "registered successfully" not in run.stdout + run.stderr:
            raise HyprstreamError(f"registering {device} with its fog failed: {(run.stdout + run.stderr)[-500:]}")
        (d / "store.key").write_text(secrets.token_hex(32) + "\n")
        (d / "store.key").chmod(0o600)
        (d / "profile.toml").write_text(PROFILE)
        shards = self.fogs * self.agents
        x, y = self.train.x[shard::shards][:300], self.train.y[shard::shards][:300]
        lines = [json.dumps({"features": [float(v) for v in row], "label": int(label)})
                 for row, label in zip(x, y, strict=True)]
        (d / "inbox/.digits.jsonl").write_text("\n".join(lines) + "\n")
        (d / "inbox/.digits.jsonl").rename(d / "inbox/digits.jsonl")
        listen = _free_port()
        cmd = [sys.executable, "-m", "hyprstream.cli", "agent", "run", "--config", str(d / "profile.toml"),
               "--store", str(d / "store"), "--store-key", str(d / "store.key"), "--fleet", "poc",
               "--device-id", device, "--task", "digits", "--watch", str(d / "inbox"), "--listen", str(listen),
               "--fog", f"127.0.0.1:{fog_port}", "--fog-ca", str(fog_dir / "pki/ca.pem"), "--fog-auth-key",
               str(d / "node.key"), "--mqtt", f"127.0.0.1:{self.mqtt_port}", "--mqtt-ca",
               str(self.root / "broker/pki/ca.pem"), "--mqtt-user", device]
        env = {**self.env, "HYPRSTREAM_MQTT_PASSWORD": self.passwords[device], "HYPRSTREAM_TORCH_THREADS": "1"}
        self._start(device, "agent", cmd, d / "agent.log", env=env, ready="running (profile")
        return {"api": f"http://127.0.0.1:{listen}", "token": str(d / "store.state/ingest.token"),
                "log": str(d / "agent.log")}


def _alive(p: dict) -> psutil.Process | None:
    """The process ``p`` names, if it still runs (the same PID and start time); None otherwise."""
    try:
        proc = psutil.Process(p["pid"])
        return proc if abs(proc.create_time() - p["started"]) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE else None
    except psutil.Error:
        return None


def stop(root: Path, *, timeout_s: float = 60.0) -> list[str]:
    """Stop what ``poc.json`` under ``root`` lists, in :data:`ORDER`; the names of those stopped."""
    path = root / STATE
    if not path.exists():
        raise ConfigError(f"no federation here ({path} not found)", source="deploy poc --stop")
    state = json.loads(path.read_text())
    stopped = []
    for kind in ORDER:
        group = [(p, proc) for p in state["processes"] if p["kind"] == kind and (proc := _alive(p)) is not None]
        kids = [k for _, proc in group for k in _children(proc)]
        for _, proc in group:
            proc.send_signal(signal.SIGTERM)
        _, late = psutil.wait_procs([proc for _, proc in group], timeout=timeout_s)
        for proc in late:
            proc.kill()
        psutil.wait_procs(late, timeout=10)
        _, left = psutil.wait_procs(kids, timeout=10)
        for kid in left:  # what a stopped process left behind (e.g. a SuperNode's ClientApp)
            try:
                kid.kill()
            except psutil.Error:
                pass
        stopped += [p["name"] for p, _ in group]
    path.unlink()
    return stopped


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def summary(root: Path, endpoints: dict) -> str:
    """What ``deploy poc`` prints: where each piece listens and how to watch it."""
    core = (f"--core {endpoints['core']} --ca {endpoints['ca']} --token-file {endpoints['reader_token']}")
    lines = [f"hyprstream poc: a federation under {root}", "",
             f"  core        {endpoints['core']}   (metrics {endpoints['core_metrics']})",
             f"  broker      {endpoints['mqtt']}"]
    for name, fog in endpoints.items():
        if isinstance(fog, dict):
            lines.append(f"  {name:<11} SuperLink {fog['superlink']}   (metrics {fog['metrics']}, log {fog['log']})")
            for device, agent in fog["agents"].items():
                lines.append(f"    {device:<13} record API {agent['api']}/v1/records, /metrics (token {agent['token']})")
    lines += ["", "Watch it train:",
              f"  open {endpoints['dashboard']}#token=$(cat {endpoints['reader_token']})   (devices, versions, "
              f"clocks; the audit log with #token=$(cat {endpoints['auditor_token']}))",
              f"  hyprstream core versions {MODEL} {core}",
              f"  curl -s {endpoints['core_metrics']} | grep hyprstream_core_model",
              f"  hyprstream core pull {MODEL} {core} --out model.arrow",
              "", f"Stop it: hyprstream deploy poc --stop --dir {root}"]
    return "\n".join(lines)


__all__ = ["MODEL", "PROFILE", "Poc", "stop", "summary", "write_broker_config", "write_core_config"]
