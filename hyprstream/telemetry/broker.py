"""Where the MQTT broker of a fleet's telemetry is and how to log in: the agents publish there, the fog's
fleet view subscribes there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hyprstream.errors import ConfigError

__all__ = ["BrokerConfig", "parse_broker"]


@dataclass(frozen=True)
class BrokerConfig:
    """Where the MQTT broker is and how to log in. ``ca_file`` turns TLS on."""

    host: str = "127.0.0.1"
    port: int = 1883
    ca_file: Path | None = None
    cert_file: Path | None = None  # client certificate (mutual TLS), with key_file
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 30

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"MQTT port must be in 1..65535, got {self.port}", source="--mqtt")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("a client certificate needs both the certificate and the key file", source="--mqtt-cert")
        if self.keepalive_s < 5:
            raise ConfigError(f"MQTT keepalive must be >= 5 s, got {self.keepalive_s}")


def parse_broker(text: str, **options) -> BrokerConfig:
    """``HOST[:PORT]`` (default port 1883, or 8883 with ``ca_file``) into a :class:`BrokerConfig`."""
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host, port = text.strip(), ""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ConfigError(f"expected HOST[:PORT], got {text!r}", source="--mqtt")
    try:
        number = int(port) if port else (8883 if options.get("ca_file") else 1883)
    except ValueError:
        raise ConfigError(f"port must be a number, got {port!r}", source="--mqtt") from None
    return BrokerConfig(host=host, port=number, **options)
