"""The MQTT publisher against a real mosquitto: retained status, QoS 1 telemetry, offline buffer, reconnect."""

from __future__ import annotations

import dataclasses
import json

import pytest
from agent_helpers import Subscriber, telemetry

from hyprstream.agent.profile import TelemetrySettings
from hyprstream.agent.publisher import BrokerConfig, MemoryPublisher, MqttPublisher, parse_broker
from hyprstream.telemetry.records import DeviceState, Status, Telemetry, from_wire
from hyprstream.errors import ConfigError, ValidationError

FAST = TelemetrySettings(interval_s=1.0, qos=1, offline_buffer_max_messages=3,
                         reconnect_backoff_min_s=0.1, reconnect_backoff_max_s=0.5)


def publisher(broker, settings=FAST, device_id="cam-01"):
    return MqttPublisher(BrokerConfig(broker.host, broker.port), fleet="plant-7", device_id=device_id,
                         session="5f1c0e", settings=settings)


def kinds(messages):
    out = []
    for topic, payload, retain in messages:
        rec = from_wire(payload)
        out.append(("status", rec.state.value, retain) if isinstance(rec, Status) else ("telemetry", rec.seq))
    return out


@pytest.mark.mqtt
@pytest.mark.integration
def test_online_then_telemetry_then_clean_offline(broker):
    sub = Subscriber(broker.host, broker.port, "hyprstream/v1/plant-7/#")
    pub = publisher(broker)
    try:
        pub.start()
        assert pub.wait_connected(10)
        for seq in (1, 2, 3):
            pub.publish(telemetry(seq))
        assert sub.wait_for(lambda m: len(m) >= 4)
        pub.close()
        assert sub.wait_for(lambda m: len(m) >= 5)
    finally:
        sub.close()
    assert kinds(sub.messages) == [("status", "online", False), ("telemetry", 1), ("telemetry", 2),
                                   ("telemetry", 3), ("status", "offline", False)]
    assert from_wire(sub.messages[1][1]) == telemetry(1)
    assert from_wire(sub.messages[-1][1]).reason == "shutdown"
    # a late subscriber gets the retained status
    late = Subscriber(broker.host, broker.port, "hyprstream/v1/plant-7/+/status", client_id="late")
    try:
        assert late.wait_for(lambda m: len(m) >= 1)
        assert kinds(late.messages) == [("status", "offline", True)]
    finally:
        late.close()
    stats = pub.stats()
    assert (stats.published, stats.dropped, stats.buffered, stats.connects) == (3, 0, 0, 1)


@pytest.mark.mqtt
@pytest.mark.integration
def test_offline_buffer_keeps_the_newest_and_reconnect_delivers_them(broker):
    broker.stop()
    pub = publisher(broker)
    pub.start()
    try:
        for seq in range(1, 6):  # broker down: buffered, the buffer holds 3
            pub.publish(telemetry(seq))
        stats = pub.stats()
        assert (stats.connected, stats.buffered, stats.dropped, stats.published) == (False, 3, 2, 0)
        broker.start()
        sub = Subscriber(broker.host, broker.port, "hyprstream/v1/plant-7/cam-01/telemetry")
        try:
            assert pub.wait_connected(20)
            assert sub.wait_for(lambda m: len(m) >= 3)
            assert kinds(sub.messages) == [("telemetry", 3), ("telemetry", 4), ("telemetry", 5)]
            # the broker goes away and comes back: the publisher reconnects by itself
            broker.stop()
            sub.close()
            broker.start()
            sub = Subscriber(broker.host, broker.port, "hyprstream/v1/plant-7/cam-01/#", client_id="again")
            assert sub.wait_for(lambda m: any(t.endswith("/status") for t, _, _ in m))
            pub.publish(telemetry(6))
            assert sub.wait_for(lambda m: any(t.endswith("/telemetry") for t, _, _ in m))
            assert ("telemetry", 6) in kinds(sub.messages)
            assert pub.stats().connects == 2
        finally:
            sub.close()
    finally:
        pub.close(timeout_s=2)


@pytest.mark.unit
def test_memory_publisher_and_foreign_records():
    pub = MemoryPublisher("plant-7", "cam-01", "5f1c0e")
    pub.start()
    pub.publish(telemetry(1))
    pub.close()
    topics = [(t, q, r) for t, _, q, r in pub.messages]
    assert topics == [("hyprstream/v1/plant-7/cam-01/status", 1, True),
                      ("hyprstream/v1/plant-7/cam-01/telemetry", 1, False),
                      ("hyprstream/v1/plant-7/cam-01/status", 1, True)]
    assert json.loads(pub.messages[-1][1])["state"] == DeviceState.OFFLINE.value
    other: Telemetry = dataclasses.replace(telemetry(1), device_id="cam-02")
    mqtt = MqttPublisher(BrokerConfig(), fleet="plant-7", device_id="cam-01", session="s", settings=FAST)
    with pytest.raises(ValidationError, match="cam-02"):
        mqtt.publish(other)


@pytest.mark.unit
@pytest.mark.parametrize("text, host, port", [
    ("broker.local", "broker.local", 1883), ("10.0.0.5:1884", "10.0.0.5", 1884), ("[::1]:2000", "::1", 2000),
])
def test_parse_broker(text, host, port):
    b = parse_broker(text)
    assert (b.host, b.port) == (host, port)
    with pytest.raises(ConfigError):
        parse_broker("host:notaport")
    with pytest.raises(ConfigError):
        parse_broker("host:70000")
