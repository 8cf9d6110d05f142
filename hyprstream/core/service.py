"""``hyprstream core run``: core's Flight server built from a :class:`CoreConfig`, with its keys,
audit log, storage and TLS, started and stopped with audit entries."""

from __future__ import annotations

import hashlib
import logging
import signal
import sys
import threading
from pathlib import Path

import pyarrow as pa

from hyprstream import __version__
from hyprstream.config import read_token, to_dict
from hyprstream.core import signing
from hyprstream.core.audit import AuditLog
from hyprstream.core.auth import Authenticator
from hyprstream.core.config import CoreConfig
from hyprstream.core.evaluation import Evaluator
from hyprstream.core.metrics import CoreMetrics
from hyprstream.core.repository import ModelRepository
from hyprstream.core.server import CoreFlightServer
from hyprstream.core.storage import open_storage
from hyprstream.errors import ConfigError, HyprstreamError, TransportError
from hyprstream.observe import MetricsEndpoint, split_listen

log = logging.getLogger("hyprstream.core")


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror or exc}", source=path) from None


def _cert_fingerprint(pem: bytes) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate: {exc}") from None
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()[:16]


class CoreService:
    """Everything ``core run`` starts, in order: audit log, keys, storage (with recovery), Flight server."""

    def __init__(self, config: CoreConfig) -> None:
        self.config = config
        audit_key = signing.load_private_key(config.audit.signing_key)
        self.audit = AuditLog(config.audit.path, audit_key)
        try:
            self._start(config, audit_key)
        except BaseException:
            self.audit.close()
            raise

    def _start(self, config: CoreConfig, audit_key) -> None:
        key_load = []
        key_load.append(("audit", signing.fingerprint(audit_key), config.audit.signing_key))
        token_key = signing.load_private_key(config.auth.token_key) if config.auth.token_key else None
        public_keys = [token_key.public_key()] if token_key else []
        if token_key:
            key_load.append(("tokens", signing.fingerprint(token_key), config.auth.token_key))
        for path in config.auth.token_public_keys:
            k = signing.load_public_key(path)
            public_keys.append(k)
            key_load.append(("tokens (verify only)", signing.fingerprint(k), path))
        tls_kwargs = {}
        scheme = "grpc"
        if config.tls.enabled:
            cert, key = _read(config.tls.cert, "tls.cert"), _read(config.tls.key, "tls.key")
            tls_kwargs["tls_certificates"] = [(cert, key)]
            key_load.append(("tls server certificate", _cert_fingerprint(cert), config.tls.cert))
            if config.tls.client_ca:
                ca = _read(config.tls.client_ca, "tls.client_ca")
                tls_kwargs.update(verify_client=True, root_certificates=ca)
                key_load.append(("tls client CA", _cert_fingerprint(ca), config.tls.client_ca))
            scheme = "grpc+tls"
        for purpose, fp, path in key_load:
            self.audit.append("core", "key.load", f"key/{fp}", details={"purpose": purpose, "path": path})
        storage = open_storage(config.storage.uri, sync=config.storage.sync)
        evaluators = {model: Evaluator(model, section) for model, section in config.evaluation.items()}
        self.repository = ModelRepository(storage, audit=self.audit, evaluators=evaluators)
        try:
            self.server = CoreFlightServer(self.repository, Authenticator(None, public_keys),
                                           f"{scheme}://{config.server.listen}", rate_limit=config.rate_limit,
                                           token_key=token_key, **tls_kwargs)
        except pa.ArrowException as exc:
            raise TransportError(f"cannot serve on {scheme}://{config.server.listen} (address in use, or the "
                                 f"TLS certificate and key do not load): {exc}") from None
        host = config.server.listen.rpartition(":")[0]
        self.location = f"{scheme}://{host}:{self.server.port}"
        self.metrics = self.endpoint = None
        if config.metrics.listen:
            self.metrics = CoreMetrics(self.repository, self.audit)
            self.server.sql_sources.metrics = self.metrics.registry.collect
            token = read_token(config.metrics.token_file) if config.metrics.token_file else None
            try:
                self.endpoint = MetricsEndpoint(self.metrics.registry, *split_listen(config.metrics.listen),
                                                health=self._health, token=token).start()
            except BaseException:
                self.server.stop()
                raise
        self.audit.append("core", "core.start", "core", details={
            "version": __version__, "location": self.location, "tls": config.tls.enabled,
            "mutual_tls": bool(config.tls.client_ca), "storage": storage.description,
            "models": self.repository.models(), "recovered": self.repository.recovered,
            "rate_limit": to_dict(config.rate_limit),
            "metrics": f"http://{self.endpoint.address}" if self.endpoint else None,
        })

    def _health(self) -> tuple[bool, str]:
        if not self.audit.writable:
            return False, "the audit log cannot be written: core refuses every call"
        return True, f"ok: serving on {self.location}"

    def stop(self, reason: str = "stopped") -> None:
        if self.endpoint is not None:
            self.endpoint.stop()
        self.server.stop()
        try:
            self.audit.append("core", "core.stop", "core", details={"reason": reason})
        finally:
            self.audit.close()


def run(config: CoreConfig, *, config_path: str | None = None) -> int:
    """Serve until SIGTERM or SIGINT; prints ``hyprstream core: serving on <location>`` once ready."""
    if not config.tls.enabled and not config.server.listen.startswith(("127.", "localhost:", "[::1]:")):
        log.warning("TLS is off and core listens on %s: tokens travel in clear text", config.server.listen)
    service = CoreService(config)
    if config_path:
        digest = hashlib.sha256(Path(config_path).read_bytes()).hexdigest()
        service.audit.append("core", "config.load", "core", details={"path": config_path, "sha256": digest})
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum, _frame) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(f"hyprstream core: serving on {service.location}", flush=True)
        if service.endpoint is not None:
            print(f"hyprstream core: metrics on http://{service.endpoint.address}/metrics", flush=True)
        for line in service.repository.recovered:
            print(f"hyprstream core: recovered: {line}", file=sys.stderr, flush=True)
        while not stop.wait(0.5):  # short waits keep the main thread free to run signal handlers
            continue
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        try:
            service.stop(f"signal {received[0]}" if received else "stopped")
        except HyprstreamError as exc:
            log.error("while stopping: %s", exc)
    return 0
