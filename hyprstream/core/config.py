"""``core.toml``: the configuration of ``hyprstream core run`` (top level ``kind = "core"``).

Relative paths are resolved against the directory of the file. TLS is on unless the file says
``tls.enabled = false`` (meant for loopback tests only). Example: ``deploy/core.example.toml``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from hyprstream.config import Checked, parse, pem_certificate, pem_private_key, read_token, read_toml, setting
from hyprstream.core import signing
from hyprstream.core.evaluation import EvaluationSection
from hyprstream.coreapi.records import NAME
from hyprstream.core.ratelimit import RateLimitPolicy
from hyprstream.errors import ConfigError

CORE_KIND = "core"


@dataclass(frozen=True)
class ServerSection(Checked):
    listen: str = setting("127.0.0.1:8815", doc="host:port to serve Flight on (port 0: any free port)")

    def check(self):
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            yield "listen", f"expected host:port, got {self.listen!r}"


@dataclass(frozen=True)
class StorageSection:
    uri: str = setting("models", doc="local directory, or a pyarrow.fs URI such as s3://bucket/prefix")
    sync: bool = setting(True, doc="fsync local writes (turn off only for throwaway test data)")


@dataclass(frozen=True)
class AuditSection:
    signing_key: str = setting(doc="Ed25519 private key (PEM, mode 0600) that signs the audit log",
                               file=signing.load_private_key)
    path: str = setting("audit/audit.jsonl", doc="the JSON Lines audit log (local file); <path>.head is its checkpoint")


@dataclass(frozen=True)
class TlsSection(Checked):
    enabled: bool = setting(True, doc="serve grpc+tls; false only for loopback tests")
    cert: str | None = setting(None, doc="server certificate chain (PEM)", file=pem_certificate)
    key: str | None = setting(None, doc="server private key (PEM)", file=pem_private_key)
    client_ca: str | None = setting(None, doc="CA certificate (PEM): when set, clients need a certificate it signed",
                                    file=pem_certificate)

    def check(self):
        if self.enabled and (self.cert is None or self.key is None):
            yield "cert" if self.cert is None else "key", (
                "required while tls.enabled is true (make them with 'hyprstream certs init', or set "
                "tls.enabled = false for a loopback test)")
        if not self.enabled and self.client_ca is not None:
            yield "client_ca", "mutual TLS needs tls.enabled = true"


@dataclass(frozen=True)
class MetricsSection(Checked):
    """Prometheus ``/metrics``, ``/healthz`` and ``/readyz`` over HTTP (:mod:`hyprstream.core.metrics`)."""

    listen: str = setting("127.0.0.1:9465", doc="host:port of the metrics endpoint (port 0: any free port; "
                                                "empty: no endpoint)")
    token_file: str | None = setting(None, doc="a file holding a bearer token every request must carry "
                                               "(needed to listen beyond loopback)", file=read_token)

    def check(self):
        if not self.listen:
            return
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            yield "listen", f"expected host:port or \"\" (off), got {self.listen!r}"
        elif self.token_file is None and host.strip("[]") not in ("127.0.0.1", "localhost", "::1"):
            yield "token_file", f"metrics on {self.listen} beyond loopback need a token_file"


@dataclass(frozen=True)
class AuthSection(Checked):
    token_key: str | None = setting(None, doc="Ed25519 private key: verifies tokens and signs issue_token answers",
                                    file=signing.load_private_key)
    token_public_keys: tuple[str, ...] = setting((), doc="more Ed25519 public keys whose tokens are accepted",
                                                 file=signing.load_public_key)

    def check(self):
        if self.token_key is None and not self.token_public_keys:
            yield "token_key", "set auth.token_key (or auth.token_public_keys): without it no one can log in"


@dataclass(frozen=True)
class CoreConfig(Checked):
    audit: AuditSection
    auth: AuthSection = field(default_factory=AuthSection)
    server: ServerSection = field(default_factory=ServerSection)
    storage: StorageSection = field(default_factory=StorageSection)
    tls: TlsSection = field(default_factory=TlsSection)
    rate_limit: RateLimitPolicy = field(default_factory=RateLimitPolicy)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    # [evaluation.<model>]: score every version of that model on validation rows, with a regression guard
    evaluation: Mapping[str, EvaluationSection] = setting(MappingProxyType({}))
    log_level: str = setting("info", doc="debug, info, warning or error")

    def check(self):
        # sections left out take their defaults without being parsed: check their rules here too
        for name in ("server", "tls", "auth", "metrics"):
            for key, reason in getattr(self, name).check():
                yield f"{name}.{key}", reason
        for model in self.evaluation:
            if not NAME.match(model):
                yield f"evaluation.{model}", "is not a model name"
        if self.log_level not in ("debug", "info", "warning", "error"):
            yield "log_level", "must be one of 'debug', 'info', 'warning', 'error'"

    def resolved(self, base: Path) -> CoreConfig:
        """The same config with relative paths taken relative to ``base``."""

        def p(value: str | None) -> str | None:
            if value is None or "://" in value:
                return value
            path = Path(value).expanduser()
            return str(path if path.is_absolute() else base / path)

        return dataclasses.replace(
            self,
            audit=dataclasses.replace(self.audit, signing_key=p(self.audit.signing_key), path=p(self.audit.path)),
            auth=dataclasses.replace(self.auth, token_key=p(self.auth.token_key),
                                     token_public_keys=tuple(p(k) for k in self.auth.token_public_keys)),
            storage=dataclasses.replace(self.storage, uri=p(self.storage.uri)),
            tls=dataclasses.replace(self.tls, cert=p(self.tls.cert), key=p(self.tls.key),
                                    client_ca=p(self.tls.client_ca)),
            metrics=dataclasses.replace(self.metrics, token_file=p(self.metrics.token_file)),
            evaluation=MappingProxyType({model: dataclasses.replace(e, validation=p(e.validation))
                                         for model, e in self.evaluation.items()}),
        )


def load_core_config(path: str | Path) -> CoreConfig:
    """Read and validate ``core.toml``; ConfigError names the file, the key path and the reason."""
    source = str(path)
    data = read_toml(path)
    if data.get("kind") != CORE_KIND:
        raise ConfigError(f'must be "{CORE_KIND}" for a core config, got {data.get("kind")!r}', source=source,
                          key="kind")
    config = parse(CoreConfig, {k: v for k, v in data.items() if k != "kind"}, source=source)
    return config.resolved(Path(path).resolve().parent)
