"""Telemetry transport: :class:`MqttPublisher` (paho-mqtt) and :class:`MemoryPublisher` (in memory).

Both take :class:`~hyprstream.telemetry.records.Telemetry` records; the simulator and tests use the
in-memory one, devices the MQTT one. The MQTT publisher

* connects with a Last Will that sets the retained status to ``offline`` when the broker loses the
  connection without a clean disconnect (power cut, ``SIGKILL``, network gone);
* publishes a retained ``online`` status on every (re)connect, before anything else;
* publishes telemetry with the profile's QoS (1 by default) on ``hyprstream/v1/<fleet>/<id>/telemetry``;
* reconnects by itself with exponential backoff between ``reconnect_backoff_min_s`` and
  ``reconnect_backoff_max_s`` (paho's network thread);
* while disconnected keeps up to ``offline_buffer_max_messages`` records, dropping the oldest first,
  and sends them (oldest first) once connected again;
* on :meth:`MqttPublisher.close` publishes a retained ``offline`` status and disconnects cleanly.

Locks: the publisher's own lock guards only its buffer and counters; paho is never called while it
is held, so paho's callbacks (which run on paho's thread) cannot deadlock against a caller.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from hyprstream._extras import require
from hyprstream.agent.profile import TelemetrySettings
from hyprstream.telemetry.records import (
    DeviceState,
    Status,
    Telemetry,
    status_topic,
    telemetry_topic,
    to_wire,
)
from hyprstream.errors import ConfigError, TransportError, ValidationError
from hyprstream.telemetry.broker import BrokerConfig, parse_broker

__all__ = ["BrokerConfig", "MemoryPublisher", "MqttPublisher", "PublisherStats", "TelemetryPublisher", "parse_broker"]

log = logging.getLogger("hyprstream.telemetry.records")

_WILL_REASON = "connection lost (last will)"


@dataclass(frozen=True)
class PublisherStats:
    """Counters since the publisher started."""

    connected: bool
    published: int  # handed to the MQTT client while connected
    acknowledged: int  # confirmed by the broker (QoS 1/2) or written (QoS 0); status messages included
    buffered: int  # waiting in the offline buffer now
    dropped: int  # pushed out of the full offline buffer
    connects: int


class TelemetryPublisher(Protocol):
    """What the agent needs from a telemetry transport."""

    def start(self) -> None: ...

    def publish(self, record: Telemetry) -> None: ...

    def stats(self) -> PublisherStats: ...

    def close(self, timeout_s: float = 5.0) -> None: ...


class MemoryPublisher:
    """Keeps ``(topic, payload, qos, retain)`` messages in a list (simulator, tests)."""

    def __init__(self, fleet: str, device_id: str, session: str, settings: TelemetrySettings | None = None) -> None:
        self.fleet, self.device_id, self.session = fleet, device_id, session
        self.qos = (settings or TelemetrySettings()).qos
        self.messages: list[tuple[str, bytes, int, bool]] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        self._send(status_topic(self.fleet, self.device_id),
                   to_wire(Status(self.fleet, self.device_id, DeviceState.ONLINE, self.session, time.time())), 1, True)

    def publish(self, record: Telemetry) -> None:
        self._send(telemetry_topic(record.fleet, record.device_id), to_wire(record), self.qos, False)

    def _send(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        with self._lock:
            self.messages.append((topic, payload, qos, retain))

    def stats(self) -> PublisherStats:
        n = sum(1 for m in self.messages if m[0].endswith("/telemetry"))
        return PublisherStats(True, n, n, 0, 0, 1)

    def close(self, timeout_s: float = 5.0) -> None:
        self._send(status_topic(self.fleet, self.device_id),
                   to_wire(Status(self.fleet, self.device_id, DeviceState.OFFLINE, self.session, time.time(),
                                  "shutdown")), 1, True)


class MqttPublisher:
    """Telemetry over MQTT with paho-mqtt (see the module docstring for the guarantees)."""

    def __init__(self, broker: BrokerConfig, *, fleet: str, device_id: str, session: str,
                 settings: TelemetrySettings, clock: Callable[[], float] = time.time,
                 max_inflight: int = 200) -> None:
        mqtt = require("paho.mqtt.client", extra="mqtt", feature="MQTT telemetry")
        self._mqtt = mqtt
        self.broker = broker
        self.fleet, self.device_id, self.session = fleet, device_id, session
        self.settings = settings
        self._clock = clock
        self.telemetry_topic = telemetry_topic(fleet, device_id)
        self.status_topic = status_topic(fleet, device_id)
        self._lock = threading.Lock()
        self._buffer: collections.deque[bytes] = collections.deque()
        self._connected = threading.Event()
        self._closing = False
        self._published = self._acked = self._dropped = self._connects = 0
        self._last_error = ""

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"hyprstream-{fleet}-{device_id}",
                             protocol=mqtt.MQTTv311, clean_session=True)
        will = Status(fleet, device_id, DeviceState.OFFLINE, session, None, _WILL_REASON)
        client.will_set(self.status_topic, to_wire(will), qos=1, retain=True)
        client.reconnect_delay_set(min_delay=settings.reconnect_backoff_min_s,
                                   max_delay=settings.reconnect_backoff_max_s)
        client.max_inflight_messages_set(max_inflight)
        # paho keeps unacknowledged QoS>0 messages itself; bound that queue too
        client.max_queued_messages_set(max_inflight + max(1, settings.offline_buffer_max_messages))
        if broker.username is not None:
            client.username_pw_set(broker.username, broker.password)
        if broker.ca_file is not None:
            try:
                client.tls_set(ca_certs=str(broker.ca_file),
                               certfile=str(broker.cert_file) if broker.cert_file else None,
                               keyfile=str(broker.key_file) if broker.key_file else None)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise ConfigError(f"cannot load the TLS files: {exc}", source="--mqtt-ca") from None
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._client = client

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect in the background (paho's network thread retries with backoff until it works)."""
        try:
            self._client.connect_async(self.broker.host, self.broker.port, keepalive=self.broker.keepalive_s)
        except (OSError, ValueError) as exc:
            raise TransportError(f"MQTT broker {self.broker.host}:{self.broker.port}: {exc}") from None
        self._client.loop_start()
        log.info("telemetry to mqtt://%s:%d as %s/%s", self.broker.host, self.broker.port, self.fleet, self.device_id)

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def close(self, timeout_s: float = 5.0) -> None:
        """Publish the retained ``offline`` status (if connected), disconnect, stop the network thread."""
        self._closing = True
        if self._connected.is_set():
            status = Status(self.fleet, self.device_id, DeviceState.OFFLINE, self.session, self._clock(), "shutdown")
            info = self._client.publish(self.status_topic, to_wire(status), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout_s)
            except (RuntimeError, ValueError) as exc:
                log.warning("offline status not confirmed: %s", exc)
        self._client.disconnect()
        self._client.loop_stop()
        with self._lock:
            lost = len(self._buffer)
        if lost:
            log.warning("%d telemetry message(s) still buffered at shutdown were not sent", lost)

    # ------------------------------------------------------------------ publishing

    def publish(self, record: Telemetry) -> None:
        """Send ``record`` now, or buffer it while disconnected (oldest dropped when the buffer is full)."""
        if (record.fleet, record.device_id) != (self.fleet, self.device_id):
            raise ValidationError(f"record of {record.fleet}/{record.device_id} on the publisher of "
                                  f"{self.fleet}/{self.device_id}")
        self.publish_payload(to_wire(record))

    def publish_payload(self, payload: bytes) -> None:
        """Send an already-encoded telemetry payload (see :meth:`publish`)."""
        if not self._connected.is_set():
            self._buffer_payload(payload)
            if self._connected.is_set():  # connected meanwhile: its flush may have run before the append
                self._flush()
            return
        self._send(payload)

    def _send(self, payload: bytes) -> None:
        info = self._client.publish(self.telemetry_topic, payload, qos=self.settings.qos)
        rc = info.rc
        if rc == self._mqtt.MQTT_ERR_SUCCESS or (rc == self._mqtt.MQTT_ERR_NO_CONN and self.settings.qos > 0):
            # NO_CONN with QoS > 0: paho keeps the message and sends it after reconnecting
            with self._lock:
                self._published += 1
        elif rc == self._mqtt.MQTT_ERR_NO_CONN:
            self._buffer_payload(payload)
        else:  # MQTT_ERR_QUEUE_SIZE: paho's own bound is full
            with self._lock:
                self._dropped += 1

    def _buffer_payload(self, payload: bytes) -> None:
        limit = self.settings.offline_buffer_max_messages
        with self._lock:
            if limit == 0:
                self._dropped += 1
                return
            if len(self._buffer) >= limit:
                self._buffer.popleft()
                self._dropped += 1
            self._buffer.append(payload)

    def _flush(self) -> None:
        while self._connected.is_set():
            with self._lock:
                if not self._buffer:
                    return
                payload = self._buffer.popleft()
            self._send(payload)

    def stats(self) -> PublisherStats:
        with self._lock:
            return PublisherStats(self._connected.is_set(), self._published, self._acked, len(self._buffer),
                                  self._dropped, self._connects)

    # ------------------------------------------------------------------ paho callbacks (paho's thread)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT broker refused the connection: %s", reason_code)
            return
        online = Status(self.fleet, self.device_id, DeviceState.ONLINE, self.session, self._clock())
        client.publish(self.status_topic, to_wire(online), qos=1, retain=True)
        with self._lock:
            self._connects += 1
            buffered = len(self._buffer)
        self._connected.set()
        log.info("MQTT connected (%d buffered message(s) to send)", buffered)
        self._flush()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if not self._closing:
            log.warning("MQTT connection lost (%s); reconnecting with backoff", reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            self._acked += 1
