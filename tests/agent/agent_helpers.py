"""Helpers shared by the agent tests: telemetry records and a plain paho subscriber."""

from __future__ import annotations

import threading
import time

from hyprstream.agent.monitor import GpuSample, ResourceSample
from hyprstream.agent.profile import ExecutionProvider, ModelVariant, Strategy
from hyprstream.telemetry.records import (
    InferenceStats,
    IngestStats,
    ModelState,
    PrivacyState,
    StrategyState,
    Telemetry,
)


def telemetry(seq: int = 1, *, fleet: str = "plant-7", device_id: str = "cam-01", gpu: bool = True) -> Telemetry:
    g = GpuSample("Orin (nvgpu)", 35.0, 1800.5, 5120.0, 48.0, None) if gpu else None
    return Telemetry(
        fleet=fleet, device_id=device_id, device_class="jetson-orin-nano", session="5f1c0e", seq=seq,
        time=1_760_000_000.0 + seq, uptime_s=12.5 * seq,
        resources=ResourceSample(1_760_000_000.0 + seq, 23.5, 51.0, 4100.0, 22.0, 48.5, None, None, g),
        strategy=StrategyState(Strategy.HYBRID, 1_759_999_990.0, "GPU 55.0% > 50%", True,
                               ExecutionProvider.CPU, ModelVariant.FP32),
        model=ModelState("digits", 7),
        privacy=PrivacyState(False, 8.0, 1e-5), inference=InferenceStats(100, 13, 0), ingest=IngestStats(101, 1),
    )


class Subscriber:
    """A plain paho client (no hyprstream code) that records what arrives on ``topic``."""

    def __init__(self, host: str, port: int, topic: str, *, qos: int = 1, client_id: str = "test-subscriber") -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=qos)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("subscription not confirmed within 10 s")

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def wait_for(self, predicate, timeout_s: float = 20.0) -> bool:
        """Wait until ``predicate(messages)`` is true (bounded)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
