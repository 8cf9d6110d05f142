"""The fog's Prometheus metrics and health check, served over HTTP on a configured address.

``GET /metrics`` (Prometheus text format 0.0.4) and ``GET /healthz`` (``ok`` while the fog loop has
made progress within ``stale_after_s``). Requests must carry ``Authorization: Bearer <token>`` when a
token is configured; the endpoint binds to loopback unless told otherwise.
"""

from __future__ import annotations

import hmac
import math
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from hyprstream.fog.aggregator import FogRound
from hyprstream.fog.gateway import listen_error

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
            return {**self._values, **self._privacy}

    def render(self) -> str:
        """Prometheus text exposition format."""
        lines = []
        label = self.fog.replace("\\", "\\\\").replace('"', '\\"')
        for name, value in self.snapshot().items():
            kind, text = _HELP.get(name) or _PRIVACY_HELP[name]
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f'{name}{{fog="{label}"}} {_number(value)}']
        return "\n".join(lines) + "\n"

    def healthy(self, stale_after_s: float) -> bool:
        return time.time() - self.snapshot()["hyprstream_fog_last_progress_timestamp_seconds"] <= stale_after_s


def _number(value: float) -> str:
    """A sample value in the exposition format (infinities as +Inf / -Inf)."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return f"{value:g}"


class MetricsServer:
    """``/metrics`` and ``/healthz`` on ``host:port`` in a daemon thread."""

    def __init__(self, metrics: FogMetrics, host: str, port: int, *, token: str | None = None,
                 stale_after_s: float = 600.0) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if outer.token is not None:
                    got = self.headers.get("Authorization", "")
                    if not hmac.compare_digest(got.encode(), f"Bearer {outer.token}".encode()):
                        return self._send(401, "missing or invalid bearer token\n")
                if self.path == "/metrics":
                    return self._send(200, metrics.render(), "text/plain; version=0.0.4")
                if self.path == "/healthz":
                    ok = metrics.healthy(outer.stale_after_s)
                    return self._send(200 if ok else 503, "ok\n" if ok else "stalled\n")
                self._send(404, "not found\n")

            def _send(self, code: int, body: str, ctype: str = "text/plain") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # requests are not logged (no secrets, no noise)
                return

        self.token = token
        self.stale_after_s = stale_after_s
        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise listen_error(host, port, exc, source=None, key="metrics.port") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="hyprstream-fog-metrics",
                                        daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
