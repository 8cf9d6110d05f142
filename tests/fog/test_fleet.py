"""The fog's fleet view: real agent publishers and a real mosquitto broker on loopback."""

from __future__ import annotations

import getpass
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import MOSQUITTO, Broker
from fleet_helpers import FLEET, status, telemetry

from hyprstream.agent.profile import TelemetrySettings
from hyprstream.agent.publisher import BrokerConfig, MqttPublisher
from hyprstream.telemetry.records import DeviceState, telemetry_topic, to_wire
from hyprstream.errors import ConfigError, TransportError
from hyprstream.fog.fleet import MAX_PAYLOAD_BYTES, FleetView

FAST = TelemetrySettings(interval_s=1.0, qos=1, reconnect_backoff_min_s=0.1, reconnect_backoff_max_s=0.5)


def wait_until(predicate, timeout_s: float = 20.0) -> bool:
    """Poll ``predicate`` until it holds (bounded; the broker delivers asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


KILLED_AGENT = textwrap.dedent("""
    import sys, time
    from hyprstream.agent.profile import TelemetrySettings
    from hyprstream.agent.publisher import BrokerConfig, MqttPublisher
    sys.path.insert(0, sys.argv[2])
    from fleet_helpers import telemetry
    pub = MqttPublisher(BrokerConfig("127.0.0.1", int(sys.argv[1])), fleet="plant-7", device_id="cam-02",
                        session="s9", settings=TelemetrySettings(interval_s=1.0))
    pub.start()
    assert pub.wait_connected(20)
    pub.publish(telemetry("cam-02", 1, session="s9", cpu=80.0))
    print("published", flush=True)
    time.sleep(600)
""")


@pytest.mark.mqtt
@pytest.mark.integration
def test_view_tracks_telemetry_retained_status_and_last_will(broker, caplog):
    import paho.mqtt.client as mqtt

    pub = MqttPublisher(BrokerConfig(broker.host, broker.port), fleet=FLEET, device_id="cam-01", session="s1",
                        settings=FAST)
    pub.start()
    assert pub.wait_connected(10)
    agent = subprocess.Popen([sys.executable, "-c", KILLED_AGENT, str(broker.port), os.path.dirname(__file__)],
                             stdout=subprocess.PIPE, text=True)
    view = FleetView(FLEET, BrokerConfig(broker.host, broker.port))
    raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw")
    try:
        assert agent.stdout.readline().strip() == "published"
        view.start()  # after the agents: their retained online status reaches it all the same
        assert view.wait_subscribed(10)
        assert wait_until(lambda: (d := view.get("cam-01")) is not None and d.state is DeviceState.ONLINE)
        for seq in (1, 2):
            pub.publish(telemetry("cam-01", seq, cpu=10.0 * seq))
        assert wait_until(lambda: (d := view.get("cam-01")).telemetry is not None and d.telemetry.seq == 2)
        cam1 = view.get("cam-01")
        assert cam1.online and cam1.telemetry == telemetry("cam-01", 2, cpu=20.0) and cam1.age(time.time()) < 60

        # cam-02's agent dies without a clean disconnect: the broker publishes its Last Will
        assert wait_until(lambda: (d := view.get("cam-02")) is not None and d.state is DeviceState.ONLINE)
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(10)
        assert wait_until(lambda: view.get("cam-02").state is DeviceState.OFFLINE)
        assert not view.get("cam-02").online

        # malformed payloads are counted and dropped, and their content is never logged
        secret = "raw-sensor-value-8c1f"
        raw.connect(broker.host, broker.port)
        raw.loop_start()
        bad = [
            (telemetry_topic(FLEET, "cam-03"), b"not json " + secret.encode()),
            (telemetry_topic(FLEET, "cam-03"), json.dumps({"schema": "hyprstream.telemetry/1", "x": secret}).encode()),
            (telemetry_topic(FLEET, "cam-03"), to_wire(telemetry("cam-04"))),  # device ID differs from the topic
            (f"hyprstream/v1/{FLEET}/cam-03/status", to_wire(telemetry("cam-03"))),  # telemetry on a status topic
            (telemetry_topic(FLEET, "cam-03"), b" " * (MAX_PAYLOAD_BYTES + 1)),
        ]
        with caplog.at_level(logging.WARNING, logger="hyprstream"):
            for topic, payload in bad:
                raw.publish(topic, payload, qos=1).wait_for_publish(10)
            pub.publish(telemetry("cam-01", 3))  # after them on the same broker: wait for it, then count
            assert wait_until(lambda: view.get("cam-01").telemetry.seq == 3 and view.malformed == len(bad))
        assert view.malformed == len(bad)
        assert "cam-03" not in view.devices() and "cam-04" not in view.devices()
        assert secret not in caplog.text and "dropped a malformed message" in caplog.text
    finally:
        raw.loop_stop()
        raw.disconnect()
        view.close()
        pub.close()
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
        agent.stdout.close()


@pytest.mark.mqtt
@pytest.mark.integration
def test_view_logs_in_with_user_and_password(tmp_path):
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed")
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "fog-a", "s3cret-pw"], check=True,
                   capture_output=True)

    class AuthBroker(Broker):
        def start(self, timeout_s: float = 10.0) -> None:
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
                            f"persistence false\nuser {getpass.getuser()}\n")  # as root: a user who reads tmp_path
            self.log = (self.workdir / "mosquitto.log").open("ab")
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=self.log, stderr=subprocess.STDOUT)
            log = (self.workdir / "mosquitto.log").read_text
            assert wait_until(lambda: _listening(self.port), timeout_s), log()[-2000:]

    b = AuthBroker(tmp_path)
    b.start()
    try:
        wrong = FleetView(FLEET, BrokerConfig(b.host, b.port, username="fog-a", password="wrong"), client_id="w")
        with wrong, pytest.raises(TransportError, match="refused"):
            wrong.wait_subscribed(20)
        with FleetView(FLEET, BrokerConfig(b.host, b.port, username="fog-a", password="s3cret-pw")) as view:
            assert view.wait_subscribed(20)
    finally:
        b.stop()


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.mark.unit
def test_sessions_states_and_order_without_a_broker():
    now = [100.0]
    view = FleetView(FLEET, clock=lambda: now[0])
    topic_t, topic_s = telemetry_topic(FLEET, "cam-01"), f"hyprstream/v1/{FLEET}/cam-01/status"
    assert view.ingest(topic_t, to_wire(telemetry("cam-01", 2, session="a")))
    assert view.get("cam-01").online and view.get("cam-01").state is None  # telemetry but no status yet
    now[0] = 130.0
    assert view.ingest(topic_t, to_wire(telemetry("cam-01", 1, session="a")))  # late redelivery: kept older out
    assert view.get("cam-01").telemetry.seq == 2 and view.get("cam-01").age(130.0) == 30.0
    assert view.ingest(topic_s, to_wire(status("cam-01", DeviceState.OFFLINE, session="a")))
    assert not view.get("cam-01").online
    # the agent restarts (new session); the old connection's Last Will arriving later changes nothing
    assert view.ingest(topic_s, to_wire(status("cam-01", DeviceState.ONLINE, session="b")))
    assert view.get("cam-01").telemetry is None  # telemetry of the old session is gone
    assert view.ingest(topic_s, to_wire(status("cam-01", DeviceState.OFFLINE, session="a")))
    assert view.get("cam-01").online and view.get("cam-01").session == "b"
    assert view.ingest(topic_t, to_wire(telemetry("cam-01", 1, session="b")))
    assert view.get("cam-01").telemetry.session == "b"
    # other fleets and unknown topics are dropped and counted
    assert not view.ingest(telemetry_topic("other", "cam-01"), to_wire(telemetry("cam-01", fleet="other")))
    assert not view.ingest(f"hyprstream/v1/{FLEET}/cam-01/debug", b"{}")
    assert view.malformed == 2 and view.accepted == 6
    with pytest.raises(ConfigError, match="no MQTT broker"):
        view.start()


@pytest.mark.mqtt
@pytest.mark.integration
def run_fleet_fog(broker, site, devices: dict, config: str, count: int, on_round=None):
    """``run_fog`` over the loopback grid of the real agent ClientApp (one agent per entry of ``devices``,
    device id -> strategy), each device publishing telemetry through its real publisher every 0.1 s;
    ``config`` is the fog TOML's other tables, ``count`` its ``fleet.clients_per_round``."""
    import threading

    from hyprstream.agent.client_app import app as agent_app
    from hyprstream.fog.config import load_fog_config
    from hyprstream.fog.loopback import LoopbackGrid
    from hyprstream.fog.server_app import run_fog

    pubs = [MqttPublisher(BrokerConfig(broker.host, broker.port), fleet=FLEET, device_id=d, session="s1",
                          settings=FAST) for d in devices]
    stop = threading.Event()

    def agents() -> None:  # telemetry every 0.1 s, as agents do every interval_s
        seq = 0
        while not stop.wait(0.1):
            seq += 1
            for pub, (device, strategy) in zip(pubs, devices.items(), strict=True):
                pub.publish(telemetry(device, seq, strategy=strategy, ac=True))

    (site.tmp / "fog.token").write_text("fog\n")
    path = site.tmp / "fog.toml"
    path.write_text(f"""
kind = "fog"
name = "fog-a"
[core]
location = "{site.location}"
token_file = "{site.tmp / 'fog.token'}"
model = "m"
{config}
[fleet]
fleet = "{FLEET}"
mqtt_host = "{broker.host}"
mqtt_port = {broker.port}
clients_per_round = {count}
""")
    cfg = load_fog_config(path)
    grid = LoopbackGrid(agent_app, list(range(1, len(devices) + 1)),
                        node_config=lambda n: {"store-dir": str(site.stores[n])})
    for pub in pubs:
        pub.start()
    thread = threading.Thread(target=agents, daemon=True)
    thread.start()
    try:
        for pub in pubs:
            assert pub.wait_connected(10)
        # the first round waits (fleet.warmup_s) until the view holds every agent's telemetry
        return run_fog(grid, cfg, on_round=on_round, state_dir=site.tmp / "fog-state")
    finally:
        stop.set()
        thread.join(10)
        for pub in pubs:
            pub.close()


def test_fog_rounds_choose_from_the_fleet_view_and_serve_offload(broker, site):
    """``run_fog`` with ``[fleet]`` and ``[offload]``: agents publish telemetry through their real
    publisher; the minimal one is never asked to train, the others take turns (one per round), and
    the offload endpoint answers with each round's new version while the fog runs."""
    from conftest import free_port

    from hyprstream.agent.offload import OffloadClient
    from hyprstream.agent.profile import Strategy

    devices = {"device-1": Strategy.FULL, "device-2": Strategy.MINIMAL, "device-3": Strategy.FULL}
    (site.tmp / "offload.tokens").write_text("agent-token\n")
    port = free_port()
    client = OffloadClient(f"http://127.0.0.1:{port}/v1/infer", "agent-token")
    row = site.task.example_input(1)[0].tolist()
    served = []

    def on_round(result) -> None:
        served.append(client.infer("digits", [row]).version)

    config = ('[rounds]\nlayers = ["head"]\nlocal_steps = 2\nmin_agents = 3\nmax_rounds = 4\n'
              f'[offload]\nport = {port}\ntoken_file = "{site.tmp / "offload.tokens"}"\nrefresh_s = 0.0\n')
    rounds = run_fleet_fog(broker, site, devices, config, 1, on_round)
    assert [r.version for r in rounds] == [1, 2, 3, 4]
    asked = [r.nodes for r in rounds]
    assert all(len(n) == 1 and 2 not in n for n in asked)
    assert sorted(n[0] for n in asked) == [1, 1, 3, 3]  # fairness: they take turns
    assert served == [1, 2, 3, 4]
    with pytest.raises(TransportError, match="unreachable"):  # the endpoint stops with the fog
        client.infer("digits", [row])


def test_a_buffered_fog_sends_jobs_only_to_the_agents_its_fleet_view_chooses(broker, site):
    """``mode = "buffered"`` with ``clients_per_round``: that many agents train at once, chosen by the fleet
    view's rules as they come free; the minimal one is never sent a job."""
    from hyprstream.agent.profile import Strategy

    devices = {"device-1": Strategy.FULL, "device-2": Strategy.MINIMAL, "device-3": Strategy.FULL}
    config = ('[rounds]\nlayers = ["head"]\nlocal_steps = 2\nmin_agents = 3\nmax_rounds = 3\n'
              'mode = "buffered"\nbuffer_k = 2\nmax_staleness = 4\n')
    rounds = run_fleet_fog(broker, site, devices, config, 2)
    assert [r.version for r in rounds] == [1, 2, 3]
    assert all(2 not in r.contributors and r.participants == 2 for r in rounds), [r.contributors for r in rounds]


def test_with_client_dp_the_fleet_weights_a_poisson_sample_instead_of_choosing(broker, site):
    """``clients_per_round > 0`` with ``[privacy.client_dp]``: no top-M choice; each eligible agent takes part
    with probability q times its own telemetry score (the minimal one never), every round is charged at q,
    and core gets the fixed denominator those rates give, never the count."""
    from hyprstream.agent.profile import Strategy
    from hyprstream.privacy.accountant import GaussianEvent, epsilon

    devices = {"device-1": Strategy.FULL, "device-2": Strategy.MINIMAL, "device-3": Strategy.FULL,
               "device-4": Strategy.FULL}
    config = ('[rounds]\nlayers = ["head"]\nlocal_steps = 2\nmin_agents = 4\nmax_rounds = 3\n'
              "[privacy.secagg]\nclip = 1.0\nstage_timeout_s = 20.0\nmin_clients = 2\n"
              "[privacy.client_dp]\nnoise_multiplier = 0.01\nclient_sampling_rate = 1.0\n")
    rounds = run_fleet_fog(broker, site, devices, config, 2)
    assert len(rounds) == 3 and all(2 not in r.nodes for r in rounds), [r.nodes for r in rounds]
    released = [r for r in rounds if r.version is not None]
    assert released, [r.reasons for r in rounds]
    manifest = json.loads((site.tmp / "core" / "m" / "manifest.json").read_text())  # core's lineage
    pushes = [v for v in manifest["versions"] if v["version"] > 0]
    assert len(pushes) == len(released)
    for push in pushes:
        privacy = push["privacy"]
        assert push["participants"] == 0 and privacy["sample_rate"] == 1.0
        assert 0 < privacy["expected_participants"] < 4.0  # q times the 4 agents' scores (each below 1)
    charged = epsilon([GaussianEvent(0.01, 1.0, 1)] * len(released), 1e-5)
    assert pushes[-1]["privacy"]["epsilon"] == pytest.approx(charged)
