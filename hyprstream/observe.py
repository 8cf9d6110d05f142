"""Prometheus metrics and health checks over HTTP, for any tier: ``GET /metrics``, ``/healthz``, ``/readyz``.

:class:`MetricsEndpoint` serves one ``prometheus_client`` registry in the Prometheus text format (what
``prometheus_client.generate_latest`` writes: full-precision values, ``_total`` counters, ``# HELP`` and
``# TYPE`` lines) and answers ``/healthz`` (is the service alive and able to do its work) and
``/readyz`` (may it take requests; the health check where none is given) with 200 or 503 and a short
reason. With a token, every request must carry ``Authorization: Bearer <token>`` (compared in constant
time); without one, bind it to loopback. Nothing else is served and nothing is logged per request.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from hyprstream.errors import ConfigError, TransportError

log = logging.getLogger("hyprstream.observe")

Check = Callable[[], tuple[bool, str]]
"""A health or readiness check: ``(ok, reason)``; the reason is the response body."""


def send(handler: BaseHTTPRequestHandler, code: int, body: bytes, ctype: str) -> None:
    """One complete HTTP answer on ``handler``."""
    handler.send_response(code)
    handler.send_header("Content-Type", ctype)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def answer(handler: BaseHTTPRequestHandler, path: str, registry: CollectorRegistry | None,
           checks: Mapping[str, Check]) -> bool:
    """Answer ``GET /metrics`` (``registry``) or a check in ``checks`` (``/healthz``, ``/readyz``) on ``handler``;
    False, having sent nothing, for any other path. A check that raises is an unhealthy answer, not a crash."""
    if path == "/metrics" and registry is not None:
        send(handler, 200, generate_latest(registry), CONTENT_TYPE_LATEST)
        return True
    if path not in checks:
        return False
    try:
        ok, reason = checks[path]()
    except Exception as exc:  # noqa: BLE001 - whatever the check hit, the scraper gets a 503 and its kind
        ok, reason = False, f"check failed: {type(exc).__name__}"
    send(handler, 200 if ok else 503, f"{reason}\n".encode(), "text/plain; charset=utf-8")
    return True


def split_listen(listen: str, *, key: str = "listen") -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) as ``(host, port)``; ConfigError naming ``key`` otherwise."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"expected host:port, got {listen!r}", key=key)
    return host, int(port)


class ServerThread:
    """An ``http.server`` server served in a daemon thread: :meth:`start`, and :meth:`stop` that shuts it down,
    closes its socket and joins the thread."""

    def __init__(self, server, name: str) -> None:
        self.server = server
        self.name = name
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.serve_forever, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(timeout_s)
            self._thread = None
        self.server.server_close()


class MetricsEndpoint:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` (port 0: any free one) in a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, *, health: Check,
                 ready: Check | None = None, token: str | None = None,
                 bind_error: Callable[[str, int, OSError], Exception] | None = None) -> None:
        self.registry = registry
        checks = {"/healthz": health, "/readyz": ready or health}
        expected = f"Bearer {token}".encode() if token is not None else None

        class Handler(BaseHTTPRequestHandler):
            server_version = "hyprstream"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if expected is not None and not hmac.compare_digest(
                        self.headers.get("Authorization", "").encode(), expected):
                    return send(self, 401, b"missing or invalid bearer token\n", "text/plain; charset=utf-8")
                if not answer(self, self.path.split("?", 1)[0], registry, checks):
                    send(self, 404, b"not found: /metrics, /healthz, /readyz\n", "text/plain; charset=utf-8")

            def log_message(self, fmt, *args) -> None:  # requests are not logged (a scraper calls every few s)
                return

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:  # the caller may name the setting to change (bind_error)
            if bind_error is not None:
                raise bind_error(host, port, exc) from None
            raise TransportError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        self._server.daemon_threads = True
        self._serving = ServerThread(self._server, "hyprstream-metrics")

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self) -> MetricsEndpoint:
        self._serving.start()
        return self

    def stop(self) -> None:
        self._serving.stop(timeout_s=5)


__all__ = ["Check", "MetricsEndpoint", "answer", "send", "split_listen"]
