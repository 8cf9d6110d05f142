"""The agent daemon: a real `agent run` process against mosquitto (telemetry, SIGKILL -> offline,
SIGTERM -> clean shutdown), ingestion end to end, and the daemon loop in-process on a recorded trace."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import Subscriber
from conftest import free_port

from hyprstream.agent.daemon import Agent, AgentConfig, FogLink, IngestConfig
from hyprstream.agent.monitor import TraceMonitor, load_trace
from hyprstream.agent.profile import Strategy, load_profile
from hyprstream.agent.publisher import MemoryPublisher
from hyprstream.telemetry.records import TELEMETRY_JSON_SCHEMA, Status, Telemetry, from_wire
from hyprstream.errors import ConfigError
from hyprstream.store import Store

ROOT = Path(__file__).resolve().parents[2]
TRACES = Path(__file__).parent / "traces"


def fast_profile(tmp_path: Path, base: str = "rpi4", interval: float = 1.0) -> Path:
    """``base`` with telemetry every ``interval`` s (and quick reconnects)."""
    text = (ROOT / "firmware-configs" / f"{base}.toml").read_text()
    lines = []
    for line in text.splitlines():
        key = line.split("=")[0].strip()
        if key == "interval_s":
            line = f"interval_s = {interval}"
        elif key == "reconnect_backoff_min_s":
            line = "reconnect_backoff_min_s = 0.2"
        lines.append(line)
    path = tmp_path / f"{base}-fast.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def agent_cli() -> list[str]:
    return [sys.executable, "-m", "hyprstream.cli", "agent"]


def start_agent(tmp_path: Path, broker, *extra: str, device_id: str = "pi-01") -> subprocess.Popen:
    key = tmp_path / "store.key"
    key.write_bytes(os.urandom(32))
    cmd = [*agent_cli(), "run", "--config", str(fast_profile(tmp_path)), "--mqtt", f"{broker.host}:{broker.port}",
           "--fleet", "plant-7", "--device-id", device_id, "--store", str(tmp_path / "store"),
           "--store-key", str(key), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=(tmp_path / "agent.log").open("wb"), stderr=subprocess.STDOUT, env=env)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def decoded(sub: Subscriber):
    return [(topic, from_wire(payload), retain) for topic, payload, retain in sub.messages]


@pytest.mark.mqtt
@pytest.mark.integration
@pytest.mark.slow
def test_real_agent_telemetry_then_sigkill_leaves_offline(tmp_path, broker):
    jsonschema = pytest.importorskip("jsonschema")
    sub = Subscriber(broker.host, broker.port, "hyprstream/v1/plant-7/pi-01/#")
    proc = start_agent(tmp_path, broker)  # no --listen: the endpoint is on by default, on loopback
    try:
        assert sub.wait_for(lambda m: sum(t.endswith("/telemetry") for t, _, _ in m) >= 3, 60), \
            (tmp_path / "agent.log").read_text()
        from hyprstream.agent.cli import DEFAULT_PORT

        req = urllib.request.Request(f"http://127.0.0.1:{DEFAULT_PORT}/metrics",
                                     headers=_auth(tmp_path / "store.state"))
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200 and b"hyprstream_agent_" in resp.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert sub.wait_for(lambda m: json.loads(m[-1][1]).get("state") == "offline", 20)
    finally:
        stop(proc)
        sub.close()
    msgs = decoded(sub)
    assert isinstance(msgs[0][1], Status) and msgs[0][1].state.value == "online"
    telemetry = [rec for _, rec, _ in msgs if isinstance(rec, Telemetry)]
    for (_, payload, _) in sub.messages:
        data = json.loads(payload)
        if data["schema"] == "hyprstream.telemetry/2":
            jsonschema.validate(data, TELEMETRY_JSON_SCHEMA)
    assert [t.seq for t in telemetry] == list(range(1, len(telemetry) + 1))
    first = telemetry[0]
    assert (first.fleet, first.device_id, first.device_class) == ("plant-7", "pi-01", "raspberry-pi-4")
    assert first.privacy.epsilon_budget == 8.0 and first.model.version is None and first.model.task == "digits"
    assert first.strategy.current in set(Strategy)
    assert all(t.session == msgs[0][1].session for t in telemetry)
    last = msgs[-1][1]
    assert isinstance(last, Status) and last.state.value == "offline"
    assert last.reason == "connection lost (last will)" and last.time is None
    assert proc.returncode == -signal.SIGKILL


def _auth(state: Path | None) -> dict:
    """The bearer header of the agent's record endpoint (its token lies in the agent's state dir)."""
    token_file = state / "ingest.token" if state is not None else None
    return {"Authorization": f"Bearer {token_file.read_text().strip()}"} if token_file and token_file.exists() else {}


def post(port: int, state: Path | None, body, path="/v1/records", ctype="application/json"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": ctype, **_auth(state)})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def wait_until(predicate, timeout_s: float, step_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return False


@pytest.mark.mqtt
@pytest.mark.integration
@pytest.mark.slow
def test_real_agent_ingests_and_shuts_down_cleanly_on_sigterm(tmp_path, broker):
    from hyprstream.learning.task import get_task

    port = free_port()
    inbox = tmp_path / "inbox"
    sub = Subscriber(broker.host, broker.port, "hyprstream/v1/plant-7/pi-02/status")
    proc = start_agent(tmp_path, broker, "--listen", str(port), "--watch", str(inbox),
                       "--subscribe", "sensors/+/digits", device_id="pi-02")
    try:
        state = tmp_path / "store.state"
        assert wait_until(lambda: _health(port, state) is not None, 60), (tmp_path / "agent.log").read_text()
        assert _health(port, state)["device_id"] == "pi-02"
        assert oct((state / "ingest.token").stat().st_mode & 0o777) == "0o600"
        assert post(port, None, [{"features": [0.5] * 64}])[0] == 401  # no token: refused, nothing stored
        task = get_task("digits")
        _, test = task.load_reference_data(0)
        rec = [{"features": [float(v) for v in row], "label": int(y)} for row, y in zip(test.x[:5], test.y[:5])]
        # HTTP: JSON list; no model yet, so stored without predictions
        assert post(port, state, rec[:2]) == (200, {"accepted": 2, "model_version": None, "predictions": [], "scores": []})
        # HTTP: JSON lines, one without a label
        lines = "\n".join(json.dumps(r if i else {"features": r["features"]}) for i, r in enumerate(rec[2:4]))
        assert post(port, state, lines.encode(), ctype="application/x-ndjson")[1]["accepted"] == 2
        code, body = post(port, state, {"features": [0.5] * 63})
        assert code == 400 and "list of 64 numbers" in body["error"]
        # a dropped file
        (inbox / ".r.jsonl").write_text(json.dumps(rec[4]) + "\n")
        (inbox / ".r.jsonl").rename(inbox / "r.jsonl")
        (inbox / "bad.json").write_text("{not json")
        assert wait_until(lambda: (inbox / "done" / "r.jsonl").exists() and (inbox / "failed" / "bad.json").exists(), 20)
        assert "bad JSON" in (inbox / "failed" / "bad.json.error").read_text()
        # MQTT
        import paho.mqtt.publish as publish

        publish.single("sensors/cam-3/digits", json.dumps(rec[:3]), qos=1, hostname=broker.host, port=broker.port)
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert sub.wait_for(lambda m: m and json.loads(m[-1][1])["state"] == "offline", 10)
        assert json.loads(sub.messages[-1][1])["reason"] == "shutdown"
    finally:
        stop(proc)
        sub.close()
    log = (tmp_path / "agent.log").read_text()
    assert "received SIGTERM" in log and "agent stopped" in log
    with Store.open(tmp_path / "store", readonly=True, key=(tmp_path / "store.key").read_bytes()) as store:
        rows = store.read("samples")
    assert rows.num_rows == 8
    assert rows.column("label").to_pylist()[:5] == [int(test.y[0]), int(test.y[1]), -1, int(test.y[3]), int(test.y[4])]
    stored = task.features(rows)
    np.testing.assert_array_equal(stored[:5], test.x[:5])


def _health(port: int, state: Path):
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/health", headers=_auth(state))
        with urllib.request.urlopen(req, timeout=2) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------- in-process


class HoldLast(TraceMonitor):
    """Replays a trace, then keeps answering with its last sample."""

    def sample(self):
        if self._next >= len(self.samples):
            return self.samples[-1]
        return super().sample()


def config(tmp_path, profile="rpi4", **over) -> AgentConfig:
    path = fast_profile(tmp_path, profile, interval=0.5)
    fields = dict(profile_path=path, profile=load_profile(path), fleet="plant-7", device_id="pi-03",
                  store_dir=tmp_path / "store", state_dir=tmp_path / "state", store_key=os.urandom(32))
    return AgentConfig(**{**fields, **over})


@pytest.mark.integration
@pytest.mark.slow
def test_daemon_loop_follows_the_trace_and_serves_a_new_model(tmp_path):
    """The daemon on a recorded trace: telemetry follows the policy; a model a train request saved
    is exported (child process) and then serves the HTTP endpoint's predictions."""
    from hyprstream.agent.handoff import read_policy, save_model
    from hyprstream.learning.task import get_task
    from hyprstream.learning.trainer import model_weights, train_layers

    port = free_port()
    cfg = config(tmp_path, ingest=IngestConfig(listen_port=port))
    trace = load_trace(TRACES / "cpu_saturated.csv")
    pub = MemoryPublisher("plant-7", "pi-03", "s")
    agent = Agent(cfg, monitor=HoldLast(trace), publisher=pub)
    stop_event = threading.Event()
    runner = threading.Thread(target=agent.run, args=(stop_event,))
    runner.start()
    try:
        assert wait_until(lambda: _health(port, cfg.state_dir) is not None, 30)
        task = get_task("digits")
        train, test = task.load_reference_data(0)
        model = task.build_model(seed=0)
        train_layers(task, model, task.layer_groups(model), train, steps=300, batch_size=32, lr=1e-2, seed=0)
        save_model(cfg.state_dir, "digits", 5, model_weights(model), key=cfg.store_key)
        assert wait_until(lambda: _health(port, cfg.state_dir)["model_version"] == 5, 240)
        records = [{"features": [float(v) for v in row]} for row in test.x[:40]]
        code, body = post(port, cfg.state_dir, records)
        assert code == 200 and body["model_version"] == 5 and len(body["predictions"]) == 40
        ref = model(__import__("torch").as_tensor(test.x[:40])).argmax(1).numpy()
        # rpi4 runs int8 (profile) or fp32: either way the classes match the torch model almost always
        assert np.mean(np.asarray(body["predictions"]) == ref) >= 0.95
        # /metrics and /healthz beside the record API, behind the same token
        from prometheus_client.parser import text_string_to_metric_families

        metrics_url = f"http://127.0.0.1:{port}/metrics"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(metrics_url, timeout=5)
        assert refused.value.code == 401
        with urllib.request.urlopen(urllib.request.Request(metrics_url, headers=_auth(cfg.state_dir)), timeout=5) as r:
            got = {(s.name, tuple(s.labels.items())): s.value
                   for f in text_string_to_metric_families(r.read().decode()) for s in f.samples}
        assert got[("hyprstream_agent_model_version", ())] == 5
        assert got[("hyprstream_agent_records_ingested_total", ())] == 40
        assert got[("hyprstream_agent_inference_requests_total", ())] >= 1
        assert sum(v for (name, _), v in got.items() if name == "hyprstream_agent_strategy") == 1
        assert 0 <= got[("hyprstream_agent_cpu_ratio", ())] <= 1
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/healthz",
                                                           headers=_auth(cfg.state_dir)), timeout=5) as r:
            assert (r.status, r.read()) == (200, b"ok\n")
        state = read_policy(cfg.state_dir)
        assert state is not None and state.fresh() and Path(state.profile) == cfg.profile_path.resolve()
        assert wait_until(lambda: from_wire(pub.messages[-1][1]).inference.requests >= 1, 20)
    finally:
        stop_event.set()
        runner.join(60)
    assert not runner.is_alive()
    telemetry = [from_wire(p) for t, p, _, _ in pub.messages if t.endswith("/telemetry")]
    assert telemetry and telemetry[-1].model.version == 5 and telemetry[-1].inference.requests >= 1
    # the strategy in telemetry is the policy's on the replayed trace
    assert telemetry[0].strategy.current is Strategy.FULL
    with Store.open(cfg.store_dir, readonly=True, key=cfg.store_key) as store:
        preds = store.read("predictions")
    assert preds.num_rows == 40 and set(preds.column("model_version").to_pylist()) == {5}


@pytest.mark.unit
def test_fog_link_command_lines(tmp_path):
    ca, key = tmp_path / "ca.pem", tmp_path / "node.key"
    ca.write_text("x")
    key.write_text("x")
    node = {"store-dir": "/data/store", "state-dir": "/data/state"}
    secret = tmp_path / "superexec.secret"
    tls = FogLink("fog.local:9092", ca_file=ca, auth_key=key).command("flower-supernode", node, 9094, secret)
    assert tls == ["flower-supernode", "--superlink", "fog.local:9092", "--root-certificates", str(ca),
                   "--auth-supernode-private-key", str(key),
                   "--node-config", 'store-dir="/data/store" state-dir="/data/state"',
                   "--host", "127.0.0.1", "--port", "9094", "--isolation", "process",
                   "--superexec-auth-secret-file", str(secret)]
    plain = FogLink("127.0.0.1:9092", insecure=True).command("fs", node, 1, secret)
    assert plain[3] == "--insecure" and "--root-certificates" not in plain
    for bad in (dict(address="fog"), dict(address="fog:x", insecure=True), dict(address="fog:1"),
                dict(address="fog:1", insecure=True, ca_file=ca), dict(address="fog:1", ca_file=tmp_path / "none")):
        with pytest.raises(ConfigError):
            FogLink(**bad)


@pytest.mark.unit
def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="encrypt_at_rest"):
        config(tmp_path, store_key=None)
    with pytest.raises(ConfigError, match="device ID"):
        config(tmp_path, device_id="a/b")
    with pytest.raises(ConfigError, match="needs a broker"):
        config(tmp_path, ingest=IngestConfig(topics=("x",)))


@pytest.mark.integration
def test_cli_errors_are_one_line(tmp_path):
    base = [*agent_cli(), "run", "--store", str(tmp_path / "s")]
    cases = [
        (["--config", str(tmp_path / "none.toml")], 2, "config error"),
        (["--config", str(ROOT / "firmware-configs/rpi4.toml")], 2, "encrypt_at_rest"),
        (["--config", str(ROOT / "firmware-configs/rpi4.toml"), "--fog", "fog:9092"], 2, "--fog-ca"),
        (["--config", str(ROOT / "firmware-configs/rpi4.toml"), "--task", "weather"], 2, "unknown task"),
        (["--config", str(ROOT / "firmware-configs/rpi4.toml"), "--offload", "https://fog:9443/v1/infer"], 2,
         "--offload-token"),
        (["--config", str(ROOT / "firmware-configs/rpi4.toml"), "--offload", "ftp://fog/v1/infer",
          "--offload-token", str(ROOT / "README.md")], 2, "http:// or https://"),
    ]
    for args, code, text in cases:
        proc = subprocess.run([*base, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == code, proc.stderr
        assert text in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.unit
def test_the_daemons_modules_import_nothing_heavy():
    code = ("import sys, hyprstream.agent.cli, hyprstream.agent.daemon, hyprstream.agent.inference, "
            "hyprstream.agent.pipeline, hyprstream.agent.ingest, hyprstream.agent.publisher, hyprstream.learning.task; "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'onnx', 'flwr', 'transformers', 'paho', 'sklearn') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.integration
def test_trace_command_records_a_replayable_trace(tmp_path):
    out = tmp_path / "trace.csv"
    proc = subprocess.run([*agent_cli(), "trace", "--config", str(ROOT / "firmware-configs/rpi4.toml"),
                           "--out", str(out), "--samples", "3", "--interval", "0.2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and all(" -> " in line for line in lines)
    samples = load_trace(out)
    assert len(samples) == 3 and all(0 <= s.cpu_percent <= 100 for s in samples)


@pytest.mark.integration
def test_telemetry_says_when_the_devices_budget_is_spent(tmp_path):
    """The daemon reads the ledger the ClientApp charges: the budget is spent once it cannot pay even for
    the cheapest round (one step at batch size 1 over the device's 100 readings); no epsilon is sent."""
    from hyprstream.learning.task import Dataset, get_task
    from hyprstream.privacy.accountant import GaussianEvent, epsilon
    from hyprstream.privacy.dpsgd import MECHANISM
    from hyprstream.privacy.ledger import Budget, Charge, PrivacyLedger, Scope

    event = GaussianEvent(1.1, 0.08, 20)
    budget = epsilon([event] * 2, 1e-5) * (1 + 1e-9)  # two rounds fit, and then nothing more
    path = fast_profile(tmp_path, interval=0.5)
    path.write_text(path.read_text() + "\n[privacy.dpsgd]\nnoise_multiplier = 1.1\nmax_grad_norm = 1.0\n"
                    f"epsilon_budget = {budget!r}\n")
    cfg = AgentConfig(profile_path=path, profile=load_profile(path), fleet="plant-7", device_id="pi-03",
                      store_dir=tmp_path / "store", state_dir=tmp_path / "state", store_key=os.urandom(32))
    task = get_task("digits")
    train, _ = task.load_reference_data(0)
    with Store.open(cfg.store_dir, create=True, key=cfg.store_key) as store:
        store.create_table(task.table, task.schema)
        store.append(task.table, task.to_table(Dataset(train.x[:100], train.y[:100])))
    ledger_dir = cfg.profile.privacy.ledger_dir(cfg.store_dir.resolve())
    assert epsilon([event] * 2 + [GaussianEvent(1.1, 1 / 100, 1)], 1e-5) > budget > epsilon([event] * 2, 1e-5)

    def charge(version: int) -> None:  # what the ClientApp's DpSgdTrainer does before a round trains
        with Store.open(ledger_dir, create=True) as store:
            PrivacyLedger(store).charge(Scope.DEVICE, "pi-03", Charge(event, "digits", version, f"r{version}",
                                                                       MECHANISM), Budget(budget, 1e-5))

    charge(1)
    pub = MemoryPublisher("plant-7", "pi-03", "s")
    agent = Agent(cfg, monitor=HoldLast(load_trace(TRACES / "cpu_saturated.csv")), publisher=pub)
    stop_event = threading.Event()
    runner = threading.Thread(target=agent.run, args=(stop_event,))
    runner.start()

    def spent() -> bool | None:
        sent = [from_wire(p) for t, p, _, _ in pub.messages if t.endswith("/telemetry")]
        return sent[-1].privacy.budget_spent if sent else None

    try:
        assert wait_until(lambda: spent() is not None, 60)
        assert spent() is False
        charge(2)  # a round while the daemon runs: now not even one more step fits
        assert wait_until(lambda: spent() is True, 60), spent()
    finally:
        stop_event.set()
        runner.join(60)
    last = from_wire([p for t, p, _, _ in pub.messages if t.endswith("/telemetry")][-1])
    assert (last.privacy.epsilon_budget, last.privacy.delta) == (budget, 1e-5)  # delta from the profile's [training]


@pytest.mark.unit
def test_the_executor_serves_only_a_loopback_runtime_api_with_a_secret(tmp_path, capsys):
    from hyprstream.agent.executor import WarmExecutor, main

    secret = tmp_path / "secret"
    secret.write_bytes(b"")
    for argv, said in ((["--runtime-api-address", "10.0.0.5:9094", "--secret-file", str(secret)], "loopback"),
                       (["--runtime-api-address", "127.0.0.1:x", "--secret-file", str(secret)], "loopback"),
                       (["--runtime-api-address", "127.0.0.1:9094", "--secret-file", str(secret), "--poll-s", "0"],
                        "--poll-s"),
                       (["--runtime-api-address", "127.0.0.1:9094", "--secret-file", str(secret), "--poll-s", "2",
                         "--idle-poll-s", "1"], "--idle-poll-s")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and said in capsys.readouterr().err
    with pytest.raises(ValueError, match="must not be empty"):  # an empty secret file
        main(["--runtime-api-address", "127.0.0.1:9094", "--secret-file", str(secret)])
    with pytest.raises(ValueError, match="must not be empty"):
        WarmExecutor("127.0.0.1:9094", b"")
    with pytest.raises(ValueError, match="poll_s <= idle_poll_s"):
        WarmExecutor("127.0.0.1:9094", b"x" * 32, poll_s=2.0, idle_poll_s=1.0)


@pytest.mark.unit
def test_the_executor_polls_fast_while_tasks_come_and_backs_off_when_idle():
    from hyprstream.agent.executor import next_poll

    waits, interval = [], 0.2
    for got in (False, False, False, False, True, False):
        interval = next_poll(interval, got, 0.2, 1.0)
        waits.append(interval)
    assert waits == [0.4, 0.8, 1.0, 1.0, 0.2, 0.4]


@pytest.mark.unit
def test_the_record_endpoint_is_on_by_default_on_loopback(tmp_path):
    """``agent run`` without --listen or --socket serves the record API with /metrics and /healthz on
    127.0.0.1:9467; --socket takes its place, --no-listen turns it off, and asking for both is refused."""
    import argparse

    from hyprstream.agent import cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    key = tmp_path / "store.key"
    key.write_bytes(os.urandom(32))
    base = ["agent", "run", "--config", str(fast_profile(tmp_path)), "--store", str(tmp_path / "store"),
            "--store-key", str(key)]

    def listen(*extra: str):
        return cli.build_config(parser.parse_args([*base, *extra])).ingest

    assert listen().listen_port == cli.DEFAULT_PORT == 9467
    assert listen("--listen", "8123").listen_port == 8123
    on_socket = listen("--socket", str(tmp_path / "agent.sock"))
    assert on_socket.listen_port is None and on_socket.socket is not None
    assert listen("--no-listen").listen_port is None
    with pytest.raises(ConfigError, match="exclude each other"):
        listen("--listen", "8123", "--no-listen")
