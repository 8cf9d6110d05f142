"""The fog's configuration (``kind = "fog"`` TOML), parsed once at start-up."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from hyprstream.config import Checked, load, read_toml, setting
from hyprstream.errors import ConfigError
from hyprstream.privacy.config import PrivacyConfig


class LayerSchedule(enum.Enum):
    FIXED = "fixed"  # train ``layers`` every round (all layer groups when empty)
    ROUND_ROBIN = "round_robin"  # one entry of ``layers`` per round, in turn


@dataclass(frozen=True)
class CoreLink:
    location: str = setting(doc="core's Flight address, grpc://HOST:PORT or grpc+tls://HOST:PORT")
    token_file: str = setting(doc="file holding this fog's bearer token (role fog)")
    model: str = setting(doc="model name at core")
    tls_root_cert: str = setting("", doc="CA certificate to verify core (grpc+tls)")


@dataclass(frozen=True)
class SuperLinkSettings(Checked):
    host: str = setting("127.0.0.1")
    port: int = setting(9092, ge=1, le=65535)
    ssl_certfile: str = setting("")
    ssl_keyfile: str = setting("")
    ssl_ca_certfile: str = setting("")
    supernode_auth: bool = setting(False, doc="accept only registered SuperNode keys")
    database: str = setting("", doc="SuperLink state file (default: in memory)")

    @property
    def tls(self) -> bool:
        return bool(self.ssl_certfile)

    def check(self):
        files = (self.ssl_certfile, self.ssl_keyfile, self.ssl_ca_certfile)
        if any(files) and not all(files):
            yield "ssl_certfile", "TLS needs ssl_certfile, ssl_keyfile and ssl_ca_certfile together"


@dataclass(frozen=True)
class RoundSettings(Checked):
    task: str = setting("digits")
    layers: tuple[str, ...] = setting(())
    schedule: LayerSchedule = setting(LayerSchedule.FIXED)
    local_steps: int = setting(20, ge=1)
    batch_size: int = setting(32, ge=1)
    lr: float = setting(0.005, gt=0.0, lt=10.0)
    min_agents: int = setting(1, ge=1, doc="wait for this many connected agents before a round")
    min_replies: int = setting(1, ge=1)
    timeout_s: float = setting(120.0, gt=0.0, doc="a round's deadline: late agents are dropped")
    max_rounds: int = setting(0, ge=0, doc="stop after this many rounds; 0: run until stopped")
    pause_s: float = setting(0.0, ge=0.0, doc="wait between rounds")
    max_update_norm: float | None = setting(None, gt=0.0)

    def check(self):
        if self.min_replies > self.min_agents:
            yield "min_replies", "is larger than min_agents"
        if self.schedule is LayerSchedule.ROUND_ROBIN and not self.layers:
            yield "layers", "round_robin needs the list of layer groups to rotate through"


@dataclass(frozen=True)
class MetricsSettings:
    """Prometheus ``/metrics`` and ``/healthz``; off when ``port`` is 0."""

    host: str = setting("127.0.0.1")
    port: int = setting(0, ge=0, le=65535)
    token_file: str = setting("", doc="bearer token scrapers must send (recommended off loopback)")
    stale_after_s: float = setting(600.0, gt=0.0, doc="/healthz fails when no round finished for this long")


@dataclass(frozen=True)
class FogConfig:
    name: str = setting(doc="the fog's identity at core (its token's subject)")
    core: CoreLink = setting()
    superlink: SuperLinkSettings = field(default_factory=SuperLinkSettings)
    rounds: RoundSettings = field(default_factory=RoundSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # [privacy.secagg], [privacy.client_dp]
    state_dir: str = setting("", doc="where the fog keeps its Flower home and logs (default: a temp dir)")


def load_fog_config(path: str | Path) -> FogConfig:
    data = read_toml(path)
    if data.get("kind") != "fog":
        raise ConfigError(f"expected kind = \"fog\", got {data.get('kind')!r}", source=str(path), key="kind")
    return load(FogConfig, path, ignore=("kind",))


def read_token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the token file: {exc.strerror or exc}", source=path) from None
    if not token:
        raise ConfigError("the token file is empty", source=path)
    return token
