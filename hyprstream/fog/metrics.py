"""The fog's Prometheus metrics and health check, served over HTTP on a configured address.

``GET /metrics`` (the Prometheus text format, written by ``prometheus_client``: full-precision values,
``_total`` counters), ``GET /healthz`` and ``/readyz`` (``ok`` while the fog loop has made progress
within ``stale_after_s``). Requests must carry ``Authorization: Bearer <token>`` when a token is
configured; the endpoint binds to loopback unless told otherwise.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from hyprstream.fog.aggregator import FogRound
from hyprstream.fog.gateway import listen_error
from hyprstream.observe import MetricsEndpoint

_HELP = {
    "hyprstream_fog_rounds_total": ("counter", "Fog rounds finished."),
    "hyprstream_fog_pushes_total": ("counter", "Rounds whose delta core committed."),
    "hyprstream_fog_participants_total": ("counter", "Agent updates aggregated."),
    "hyprstream_fog_declined_total": ("counter", "Train requests agents declined."),
    "hyprstream_fog_refused_total": ("counter", "Agent updates the fog refused (shape, NaN/Inf, norm, version)."),
    "hyprstream_fog_failed_total": ("counter", "Train requests that failed or timed out."),
    "hyprstream_fog_bytes_up_total": ("counter", "Payload bytes received from agents."),
    "hyprstream_fog_bytes_down_total": ("counter", "Payload bytes sent to agents."),
    "hyprstream_fog_outbox_pushes": ("gauge", "Pushes waiting for core (partition)."),
    "hyprstream_fog_last_round_seconds": ("gauge", "Wall seconds of the last round."),
    "hyprstream_fog_master_version": ("gauge", "Master version the fog last pushed or pulled."),
    "hyprstream_fog_push_staleness": ("gauge", "Staleness core measured for the fog's last committed push "
                                               "(versions committed on its layers since its base)."),
    "hyprstream_fog_last_progress_timestamp_seconds": ("gauge", "Unix time of the last finished round."),
}
# with federated evaluation only (``rounds.evaluate``)
_EVALUATION_HELP = {
    "hyprstream_fog_evaluated_version": ("gauge", "The last version scored on the agents' held-out data."),
    "hyprstream_fog_evaluation_accuracy_ratio": ("gauge", "Its accuracy, averaged over the agents that answered."),
    "hyprstream_fog_evaluation_loss": ("gauge", "Its loss, averaged over the agents that answered."),
    "hyprstream_fog_evaluation_devices": ("gauge", "Agents whose held-out data scored it."),
}
# with client-level DP only (``[privacy.client_dp]``): absent from /metrics otherwise
_PRIVACY_HELP = {
    "hyprstream_fog_privacy_epsilon": ("gauge", "Client-level epsilon the model has spent at this fog (at delta)."),
    "hyprstream_fog_privacy_epsilon_budget": ("gauge", "Client-level epsilon budget of the model at this fog."),
    "hyprstream_fog_privacy_delta": ("gauge", "The delta of the client-level (epsilon, delta) guarantee."),
}


class FogMetrics:
    """Thread-safe counters and gauges, updated after each round."""

    def __init__(self, fog: str) -> None:
        self.fog = fog
        self._lock = threading.Lock()
        self._values: dict[str, float] = {name: 0.0 for name in _HELP}
        self._values["hyprstream_fog_last_progress_timestamp_seconds"] = time.time()
        self._privacy: dict[str, float] = {}
        self._evaluation: dict[str, float] = {}

    def record_evaluation(self, version: int, loss: float, accuracy: float, devices: int) -> None:
        with self._lock:
            self._evaluation = {"hyprstream_fog_evaluated_version": version,
                                "hyprstream_fog_evaluation_accuracy_ratio": accuracy,
                                "hyprstream_fog_evaluation_loss": loss, "hyprstream_fog_evaluation_devices": devices}

    def record_privacy(self, epsilon: float, budget: float, delta: float) -> None:
        """The model's client-level spend after the last round (``budget`` may be infinite)."""
        with self._lock:
            self._privacy = {"hyprstream_fog_privacy_epsilon": epsilon,
                             "hyprstream_fog_privacy_epsilon_budget": budget, "hyprstream_fog_privacy_delta": delta}

    def privacy(self) -> dict[str, float] | None:
        """``{"epsilon", "epsilon_budget", "delta"}`` once recorded (client-level DP only), else None."""
        with self._lock:
            if not self._privacy:
                return None
            return {name.removeprefix("hyprstream_fog_privacy_"): value for name, value in self._privacy.items()}

    def record(self, r: FogRound, outbox: int, staleness: int | None = None) -> None:
        with self._lock:
            v = self._values
            if staleness is not None:
                v["hyprstream_fog_push_staleness"] = staleness
            v["hyprstream_fog_rounds_total"] += 1
            v["hyprstream_fog_pushes_total"] += r.version is not None
            v["hyprstream_fog_participants_total"] += r.participants
            v["hyprstream_fog_declined_total"] += r.declined
            v["hyprstream_fog_refused_total"] += r.refused
            v["hyprstream_fog_failed_total"] += r.failed
            v["hyprstream_fog_bytes_up_total"] += r.bytes_up
            v["hyprstream_fog_bytes_down_total"] += r.bytes_down
            v["hyprstream_fog_outbox_pushes"] = outbox
            v["hyprstream_fog_last_round_seconds"] = r.seconds
            v["hyprstream_fog_master_version"] = r.version if r.version is not None else r.base_version
            v["hyprstream_fog_last_progress_timestamp_seconds"] = time.time()

    def snapshot(self) -> Mapping[str, float]:
        with self._lock:
            return {**self._values, **self._privacy, **self._evaluation}

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """The values as metric families (``prometheus_client``'s Collector protocol), labelled with the fog."""
        for name, value in self.snapshot().items():
            kind, text = _HELP.get(name) or _PRIVACY_HELP.get(name) or _EVALUATION_HELP[name]
            if kind == "counter":  # prometheus_client writes the _total suffix itself
                family = CounterMetricFamily(name.removesuffix("_total"), text, labels=["fog"])
            else:
                family = GaugeMetricFamily(name, text, labels=["fog"])
            family.add_metric([self.fog], value)
            yield family

    def render(self) -> str:
        """The Prometheus text exposition of these metrics (what ``/metrics`` answers)."""
        registry = CollectorRegistry()
        registry.register(self)
        return generate_latest(registry).decode()

    def healthy(self, stale_after_s: float) -> bool:
        return time.time() - self.snapshot()["hyprstream_fog_last_progress_timestamp_seconds"] <= stale_after_s


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` of a fog on ``host:port`` in a daemon thread
    (:class:`~hyprstream.observe.MetricsEndpoint`)."""

    def __init__(self, metrics: FogMetrics, host: str, port: int, *, token: str | None = None,
                 stale_after_s: float = 600.0) -> None:
        self.stale_after_s = stale_after_s
        registry = CollectorRegistry()
        registry.register(metrics)

        def health() -> tuple[bool, str]:
            if metrics.healthy(self.stale_after_s):
                return True, "ok"
            return False, f"stalled: no round finished in the last {self.stale_after_s:g} s"

        self._endpoint = MetricsEndpoint(registry, host, port, health=health, token=token,
                                         bind_error=lambda h, p, exc: listen_error(h, p, exc, source=None,
                                                                                   key="metrics.port"))

    @property
    def port(self) -> int:
        return int(self._endpoint.address.rpartition(":")[2])

    def start(self) -> MetricsServer:
        self._endpoint.start()
        return self

    def stop(self) -> None:
        self._endpoint.stop()
