"""The dashboard's state (:class:`Dashboard`) and its HTTP server (:class:`DashboardServer`)."""

from __future__ import annotations

import json
import logging
import re
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from hyprstream.core import signing, tokens
from hyprstream.core.audit import ChainCheck, parse_entry
from hyprstream.core.auth import Role
from hyprstream.coreapi.client import CoreClient
from hyprstream.coreapi.records import federated_score
from hyprstream.errors import AccessDenied, AuthError, ConfigError, HyprstreamError
from hyprstream.fog.fleet import FleetView
from hyprstream.observe import ServerThread

log = logging.getLogger("hyprstream.dashboard")

VERSIONS_SHOWN = 500  # the newest versions of each model the page plots
AUDIT_TAIL = 25
AUDIT_PAGE = 5000  # audit lines read per call
MAX_TOKEN_CHARS = 4096
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/index.html": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"), "/app.css": ("app.css", "text/css; charset=utf-8")}
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                                      "base-uri 'none'; form-action 'self'",
           "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-store"}
_BEARER = re.compile(r"Bearer ([\x21-\x7e]{1,%d})" % MAX_TOKEN_CHARS)


class _AuditFollower:
    """The audit log as far as it was read, verified incrementally, and its newest entries."""

    def __init__(self, key: signing.Ed25519PublicKey | None) -> None:
        self.check = ChainCheck(key)
        self.next_seq = 1
        self.tail: deque[dict[str, Any]] = deque(maxlen=AUDIT_TAIL)
        self.lock = threading.Lock()

    def refresh(self, client: CoreClient) -> dict[str, Any]:
        with self.lock:
            head = json.dumps(client.audit_head()).encode()
            self.check.expect_head(head)  # its entry's hash is kept while the entries are checked
            while True:
                lines = client.read_audit(self.next_seq, AUDIT_PAGE)
                self.check.feed(lines)
                for raw in lines:
                    try:
                        e = parse_entry(raw)
                    except ValueError:
                        continue  # the chain check reports it
                    self.tail.append({"seq": e.seq, "time": e.time, "actor": e.actor, "action": e.action,
                                      "subject": e.subject, "outcome": e.outcome})
                self.next_seq += len(lines)
                if len(lines) < AUDIT_PAGE:
                    break
            verdict = self.check.against(head)
            return {"verified": verdict.ok, "reason": verdict.message(), "last_seq": verdict.last_seq,
                    "head_seq": verdict.head_seq, "key": verdict.key_fingerprint, "key_source": verdict.key_source,
                    "tail": list(reversed(self.tail))}


class Dashboard:
    """What the page shows, read with the viewer's token: core's models and lineage, the fleets' devices,
    the audit log."""

    def __init__(self, core: str, *, fleets: Sequence[FleetView] = (),
                 audit_key: signing.Ed25519PublicKey | None = None, client_kwargs: Mapping[str, Any] | None = None,
                 timeout_s: float = 20.0, clock: Callable[[], float] = time.time) -> None:
        self.core = core
        self.fleets = list(fleets)
        self.client_kwargs = dict(client_kwargs or {})
        self.timeout_s = timeout_s
        self.clock = clock
        self._audit = _AuditFollower(audit_key)

    def state(self, token: str) -> dict[str, Any]:
        """Everything the viewer's role may see. AuthError when core does not accept the token at all."""
        with CoreClient(self.core, token, timeout_s=self.timeout_s, **self.client_kwargs) as client:
            out: dict[str, Any] = {"core": self.core, "generated": self.clock()}
            role = tokens.unverified_role(token)  # not asking what the role may not keeps refusals out of the log
            try:
                if role == Role.AUDITOR.value:
                    raise AccessDenied(f"role {role!r} may not read models")
                out["models"] = [self._model(client, m) for m in client.list_models()]
                out["fleets"] = [self._fleet(f) for f in self.fleets]
            except AccessDenied as exc:
                out["models"] = out["fleets"] = {"denied": str(exc)}
            try:
                if role in (Role.READER.value, Role.FOG.value):
                    raise AccessDenied(f"role {role!r} may not read the audit log")
                out["audit"] = self._audit.refresh(client)
            except AccessDenied as exc:
                out["audit"] = {"denied": str(exc)}
            if all(isinstance(out[k], dict) and "denied" in out[k] for k in ("models", "audit")):
                raise AuthError("this token's role may read neither models nor the audit log")
            return out

    @staticmethod
    def _model(client: CoreClient, model: str) -> dict[str, Any]:
        head = client.head(model)
        versions = client.list_versions(model)
        layers = []
        for layer in sorted(head["clocks"]):
            changed = [v for v in versions if layer in v["layers"]]
            last = changed[-1] if changed else versions[0]
            layers.append({"layer": layer, "clock": head["clocks"][layer], "last_changed": last["version"],
                           "behind": head["version"] - last["version"],
                           "staleness": (last.get("staleness") or {}).get(layer)})
        rows = [{"version": v["version"], "created": v["created"], "fog": v["fog"], "participants": v["participants"],
                 "accuracy": v.get("accuracy"), "loss": v.get("loss"), "bytes": v.get("update_bytes"),
                 "federated": (federated_score(v.get("federated")) or {}).get("accuracy"),
                 "epsilon": (v.get("privacy") or {}).get("epsilon"), "update_norm": v["update_norm"],
                 "layers": v["layers"]} for v in versions[-VERSIONS_SHOWN:]]
        scored = [v["accuracy"] for v in versions if v.get("accuracy") is not None]
        return {"model": model, "version": head["version"], "max_update_norm": head.get("max_update_norm"),
                "best_accuracy": max(scored) if scored else None, "layers": layers, "versions": rows}

    def _fleet(self, fleet: FleetView) -> dict[str, Any]:
        now = fleet.clock()
        devices = []
        for device_id, d in sorted(fleet.devices().items()):
            t = d.telemetry
            row: dict[str, Any] = {"device_id": device_id, "online": d.online,
                                   "state": d.state.value if d.state is not None else None,
                                   "last_seen": d.received, "age_s": d.age(now)}
            if t is not None:
                r = t.resources
                row.update(device_class=t.device_class, strategy=t.strategy.current.value,
                           strategy_reason=t.strategy.reason, accept_training=t.strategy.accept_training,
                           battery_percent=r.battery_percent, on_ac_power=r.on_ac_power,
                           cpu_percent=r.cpu_percent, model_version=t.model.version,
                           budget_spent=t.privacy.budget_spent, epsilon_budget=t.privacy.epsilon_budget,
                           privacy_delta=t.privacy.delta)
            devices.append(row)
        return {"fleet": fleet.fleet, "connected": fleet.subscribed, "refusal": fleet.refusal,
                "malformed": fleet.malformed, "devices": devices}


class DashboardServer:
    """Serves the page and ``GET /api/state`` (``Authorization: Bearer <core token>``) on ``host:port``;
    HTTPS with ``tls`` = (certificate file, key file)."""

    def __init__(self, dashboard: Dashboard, host: str = "127.0.0.1", port: int = 0, *,
                 tls: tuple[str, str] | None = None) -> None:
        if tls is None and host not in ("127.0.0.1", "localhost", "::1"):
            raise ConfigError(f"the dashboard listens on {host} only over HTTPS (--tls-cert, --tls-key): the "
                                  f"viewers' tokens would travel in clear text", source="dashboard")
        self.dashboard = dashboard
        files = resources.files("hyprstream.dashboard") / "static"
        self._static = {path: ((files / name).read_bytes(), kind) for path, (name, kind) in STATIC.items()}
        handler = self._handler()
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc}", source="dashboard") from None
        self.httpd.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                context.load_cert_chain(*tls)
            except (OSError, ssl.SSLError) as exc:
                self.httpd.server_close()
                raise ConfigError(f"cannot load the HTTPS certificate and key: {exc}", source="dashboard") from None
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.address = f"{host}:{self.httpd.server_address[1]}"
        self._serving = ServerThread(self.httpd, "hyprstream-dashboard")

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}/"

    def start(self) -> DashboardServer:
        self._serving.start()
        return self

    def stop(self) -> None:
        self._serving.stop()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "hyprstream-dashboard"
            sys_version = ""

            def log_message(self, fmt: str, *args) -> None:  # request lines at DEBUG, never a header
                log.debug("%s %s", self.client_address[0], fmt % args)

            def _send(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                for name, value in HEADERS.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, value: Any) -> None:
                self._send(status, json.dumps(value, allow_nan=False).encode(), "application/json")

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path in server._static:
                    self._send(200, *server._static[path])
                elif path == "/healthz":
                    self._send(200, b"ok\n", "text/plain; charset=utf-8")
                elif path == "/api/state":
                    self._state()
                else:
                    self._send(404, b"not found\n", "text/plain; charset=utf-8")

            def _state(self) -> None:
                match = _BEARER.fullmatch(self.headers.get("Authorization", ""))
                if match is None:
                    self._json(401, {"error": "send 'Authorization: Bearer <token>' with a core token (role reader, "
                                              "auditor or admin)"})
                    return
                try:
                    self._json(200, server.dashboard.state(match.group(1)))
                except AuthError as exc:
                    self._json(401, {"error": str(exc)})
                except HyprstreamError as exc:
                    log.warning("state for the page failed: %s", exc)
                    self._json(502, {"error": f"core: {exc}"})
                except Exception:  # noqa: BLE001 - the page gets an answer, the log the traceback
                    log.exception("state for the page failed")
                    self._json(500, {"error": "the dashboard failed to read the state (its log has the details)"})

        return Handler


__all__ = ["Dashboard", "DashboardServer"]
