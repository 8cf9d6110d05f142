"""The fog's live view of its fleet, from the agents' MQTT telemetry and status messages.

:class:`FleetView` subscribes (paho-mqtt; TLS and user name/password optional) to
``hyprstream/v1/<fleet>/+/telemetry`` and ``hyprstream/v1/<fleet>/+/status`` (see
:mod:`hyprstream.telemetry.records` for the topics and the ``hyprstream.telemetry/2`` and
``hyprstream.status/1`` payloads) and keeps, per device, the latest telemetry record, when it arrived,
and the device's online/offline state (an agent's Last Will sets its retained status to ``offline``
when its connection is lost). :meth:`FleetView.devices` returns an immutable snapshot.

Payloads are parsed by :func:`hyprstream.telemetry.records.from_wire` only. A payload that is off-schema,
or whose fleet or device ID differ from its topic, is counted (:attr:`FleetView.malformed`) and
dropped; its content is never logged (its reason only at DEBUG level).

Sessions: every agent start has a new session ID. A status of a session older than the device's
current one (the Last Will of a connection the same agent has replaced, say) does not change the
device's state.

:meth:`FleetView.ingest` takes ``(topic, payload)`` directly: the simulator feeds it from
:class:`~hyprstream.agent.publisher.MemoryPublisher` without a broker. The paho callbacks run on
paho's thread and take the view's lock only to update its dictionaries; no user code runs under it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from hyprstream._extras import require
from hyprstream.telemetry.broker import BrokerConfig
from hyprstream.telemetry.records import (
    TOPIC_ROOT,
    DeviceState,
    Status,
    Telemetry,
    check_topic_part,
    from_wire,
)
from hyprstream.errors import ConfigError, TransportError, ValidationError

log = logging.getLogger("hyprstream.fog.fleet")

MAX_PAYLOAD_BYTES = 64 * 1024  # a telemetry payload is ~1 KiB; larger ones are refused unparsed


@dataclass(frozen=True)
class DeviceView:
    """What the fog knows of one device."""

    device_id: str
    state: DeviceState | None = None  # from the retained status; None: no status seen
    session: str | None = None  # the device's current session (agent start)
    telemetry: Telemetry | None = None  # the latest telemetry record of the current session
    received: float | None = None  # when that record arrived (the view's clock)
    status_time: float | None = None  # when the current state was learnt (the view's clock)
    sessions: frozenset[str] = field(default_factory=frozenset, repr=False)  # every session seen

    @property
    def online(self) -> bool:
        """Online by its status; without a status, online once telemetry has arrived."""
        if self.state is not None:
            return self.state is DeviceState.ONLINE
        return self.telemetry is not None

    def age(self, now: float) -> float | None:
        """Seconds since the latest telemetry arrived (None: none arrived)."""
        return None if self.received is None else max(0.0, now - self.received)


class FleetView:
    """Latest telemetry and state per device of one fleet (see the module docstring)."""

    def __init__(self, fleet: str, broker: BrokerConfig | None = None, *, clock: Callable[[], float] = time.time,
                 client_id: str | None = None) -> None:
        self.fleet = check_topic_part("fleet", fleet)
        self.broker = broker
        self.clock = clock
        self.telemetry_filter = f"{TOPIC_ROOT}/{fleet}/+/telemetry"
        self.status_filter = f"{TOPIC_ROOT}/{fleet}/+/status"
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceView] = {}
        self._malformed = 0
        self._accepted = 0
        self._subscribed = threading.Event()
        self._refused = threading.Event()
        self.refusal = ""  # why the broker last refused the connection or subscription
        self._client = None
        self._client_id = client_id or f"hyprstream-fog-fleet-{fleet}"

    # ------------------------------------------------------------------ reading

    def devices(self) -> dict[str, DeviceView]:
        """A snapshot of every device seen, by device ID."""
        with self._lock:
            return dict(self._devices)

    def get(self, device_id: str) -> DeviceView | None:
        with self._lock:
            return self._devices.get(device_id)

    @property
    def malformed(self) -> int:
        """Payloads dropped because they were off-schema or did not match their topic."""
        with self._lock:
            return self._malformed

    @property
    def subscribed(self) -> bool:
        """Whether the view is connected and subscribed to its fleet's topics."""
        return self._subscribed.is_set()

    @property
    def accepted(self) -> int:
        with self._lock:
            return self._accepted

    # ------------------------------------------------------------------ input

    def ingest(self, topic: str, payload: bytes) -> bool:
        """Apply one message; False when it was dropped (malformed, or not this fleet's topic)."""
        parts = topic.split("/")
        root = TOPIC_ROOT.split("/")
        if len(parts) != len(root) + 3 or parts[:len(root)] != root or parts[len(root)] != self.fleet:
            return self._drop(topic, "not a topic of this fleet")
        device_id, kind = parts[-2], parts[-1]
        if kind not in ("telemetry", "status"):
            return self._drop(topic, f"unknown topic kind {kind!r}")
        if len(payload) > MAX_PAYLOAD_BYTES:
            return self._drop(topic, f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
        try:
            record = from_wire(payload)
        except ValidationError as exc:
            return self._drop(topic, str(exc))
        expected = Telemetry if kind == "telemetry" else Status
        if not isinstance(record, expected):
            return self._drop(topic, f"a {type(record).__name__} payload on a {kind} topic")
        if (record.fleet, record.device_id) != (self.fleet, device_id):
            return self._drop(topic, "fleet or device ID differ from the topic")
        now = self.clock()
        with self._lock:
            view = self._devices.get(device_id) or DeviceView(device_id)
            self._devices[device_id] = _apply(view, record, now)
            self._accepted += 1
        return True

    def _drop(self, topic: str, reason: str) -> bool:
        with self._lock:
            self._malformed += 1
            count = self._malformed
        log.warning("fleet %s: dropped a malformed message on %s (%d so far)", self.fleet, topic, count)
        log.debug("fleet %s: dropped message on %s: %s", self.fleet, topic, reason)
        return False

    # ------------------------------------------------------------------ MQTT

    def start(self) -> FleetView:
        """Connect to the broker in the background and subscribe (paho retries with backoff)."""
        if self.broker is None:
            raise ConfigError("the fleet view has no MQTT broker configured", key="fleet.mqtt_host")
        mqtt = require("paho.mqtt.client", extra="mqtt", feature="the fog's fleet view")
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self._client_id, protocol=mqtt.MQTTv311,
                             clean_session=True)
        b = self.broker
        if b.username is not None:
            client.username_pw_set(b.username, b.password)
        if b.ca_file is not None:
            try:
                client.tls_set(ca_certs=str(b.ca_file), certfile=str(b.cert_file) if b.cert_file else None,
                               keyfile=str(b.key_file) if b.key_file else None)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot load the TLS files: {exc}", key="fleet.mqtt_ca_file") from None
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        self._client = client
        try:
            client.connect_async(b.host, b.port, keepalive=b.keepalive_s)
        except (OSError, ValueError) as exc:
            raise TransportError(f"MQTT broker {b.host}:{b.port}: {exc}") from None
        client.loop_start()
        log.info("fleet view of %s from mqtt%s://%s:%d", self.fleet, "s" if b.ca_file else "", b.host, b.port)
        return self

    def wait_subscribed(self, timeout_s: float) -> bool:
        """Whether the subscriptions were confirmed within ``timeout_s``; raises TransportError as soon
        as the broker refuses the connection (bad credentials, say) or the subscription."""
        deadline = time.monotonic() + timeout_s
        while not self._subscribed.is_set():
            if self._refused.is_set():
                raise TransportError(f"MQTT broker refused the fleet view: {self.refusal}")
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._subscribed.wait(min(left, 0.05))
        return True

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def __enter__(self) -> FleetView:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.refusal = f"connection refused: {reason_code}"
            self._refused.set()
            log.warning("fleet %s: MQTT broker refused the connection: %s", self.fleet, reason_code)
            return
        self._refused.clear()
        client.subscribe([(self.telemetry_filter, 1), (self.status_filter, 1)])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if any(rc.is_failure for rc in reason_codes):
            self.refusal = f"subscription refused: {reason_codes}"
            self._refused.set()
            log.warning("fleet %s: the broker refused the subscription: %s", self.fleet, reason_codes)
            return
        self._subscribed.set()

    def _on_message(self, client, userdata, msg) -> None:
        self.ingest(msg.topic, bytes(msg.payload))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._subscribed.clear()
        if self._client is not None:
            log.warning("fleet %s: MQTT connection lost (%s); reconnecting", self.fleet, reason_code)


def _apply(view: DeviceView, record: Telemetry | Status, now: float) -> DeviceView:
    """``view`` after ``record`` arrived at ``now`` (pure)."""
    known = view.sessions
    if record.session != view.session and record.session in known:
        return view  # a message of a session this device has left behind
    sessions = known | {record.session}
    new_session = record.session != view.session
    if isinstance(record, Status):
        telemetry = None if new_session else view.telemetry
        received = None if new_session else view.received
        return replace(view, state=record.state, session=record.session, telemetry=telemetry, received=received,
                       status_time=now, sessions=sessions)
    if not new_session and view.telemetry is not None and record.seq <= view.telemetry.seq:
        return replace(view, sessions=sessions)  # an older record delivered late (QoS 1 redelivery)
    state = view.state
    if new_session and state is DeviceState.OFFLINE:
        state = DeviceState.ONLINE  # telemetry of a new session: the agent is back
    return replace(view, state=state, session=record.session, telemetry=record, received=now,
                   status_time=view.status_time if state is view.state else now, sessions=sessions)


__all__ = ["MAX_PAYLOAD_BYTES", "DeviceView", "FleetView"]
