"""The fog's configuration (``kind = "fog"`` TOML), parsed once at start-up."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from hyprstream.codec import Encoding
from hyprstream.telemetry.broker import BrokerConfig
from hyprstream.telemetry.records import check_topic_part
from hyprstream.config import (Checked, load, pem_certificate, pem_private_key, read_file, read_token, read_toml,
                               setting)
from hyprstream.errors import ConfigError, ValidationError
from hyprstream.fog.aggregate import Aggregation, Rule, needs_rows, resolve_rule
from hyprstream.fog.selection import SelectionRules, SelectionWeights
from hyprstream.privacy.config import PrivacyConfig


class LayerSchedule(enum.Enum):
    FIXED = "fixed"  # train ``layers`` every round (all layer groups when empty)
    ROUND_ROBIN = "round_robin"  # one entry of ``layers`` per round, in turn


class RoundMode(enum.Enum):
    SYNC = "sync"  # rounds: every chosen agent trains the same version, the fog waits for all
    BUFFERED = "buffered"  # FedBuff: agents train continuously, every buffer_k updates make a push


@dataclass(frozen=True)
class CoreLink(Checked):
    location: str = setting(doc="core's Flight address, grpc://HOST:PORT or grpc+tls://HOST:PORT")
    token_file: str = setting(doc="file holding this fog's bearer token (role fog)", file=read_token)
    model: str = setting(doc="model name at core")
    tls_root_cert: str = setting("", doc="CA certificate to verify core (grpc+tls)", file=pem_certificate)
    tls_client_cert: str = setting("", doc="client certificate for core's mutual TLS (core's tls.client_ca), with "
                                           "tls_client_key", file=pem_certificate)
    tls_client_key: str = setting("", doc="the client certificate's private key (unencrypted PEM)",
                                  file=pem_private_key)

    def check(self):
        if bool(self.tls_client_cert) != bool(self.tls_client_key):
            yield "tls_client_cert", "a client certificate needs tls_client_cert and tls_client_key together"
        elif self.tls_client_cert and not self.location.startswith("grpc+tls://"):
            yield "tls_client_cert", "a client certificate needs TLS: location = \"grpc+tls://HOST:PORT\""
        elif self.tls_client_cert:
            try:
                cert, key = pem_certificate(self.tls_client_cert)[0], pem_private_key(self.tls_client_key)
            except (ConfigError, IndexError):
                return  # a file that cannot be loaded: named by check_files
            spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
                yield "tls_client_key", f"{self.tls_client_key} is not the key of {self.tls_client_cert}"

    def flight_options(self) -> dict[str, bytes]:
        """TLS keyword arguments of the fog's Flight client to core (``CoreClient``): core's CA
        (``tls_root_certs``) and, for mutual TLS, the client certificate and key (``cert_chain``,
        ``private_key``)."""
        options = {}
        if self.tls_root_cert:
            options["tls_root_certs"] = read_file(self.tls_root_cert)
        if self.tls_client_cert:
            options.update(cert_chain=read_file(self.tls_client_cert), private_key=read_file(self.tls_client_key))
        return options


@dataclass(frozen=True)
class SuperLinkSettings(Checked):
    host: str = setting("127.0.0.1")
    port: int = setting(9092, ge=1, le=65535)
    ssl_certfile: str = setting("", file=pem_certificate)
    ssl_keyfile: str = setting("", file=pem_private_key)
    ssl_ca_certfile: str = setting("", file=pem_certificate)
    supernode_auth: bool = setting(False, doc="accept only registered SuperNode keys")
    database: str = setting("", doc="SuperLink state file (default: in memory)")

    @property
    def tls(self) -> bool:
        return bool(self.ssl_certfile)

    def check(self):
        files = (self.ssl_certfile, self.ssl_keyfile, self.ssl_ca_certfile)
        if any(files) and not all(files):
            yield "ssl_certfile", "TLS needs ssl_certfile, ssl_keyfile and ssl_ca_certfile together"
        if self.supernode_auth and not self.tls:
            yield "supernode_auth", "SuperNode authentication needs TLS (ssl_certfile, ssl_keyfile, ssl_ca_certfile)"


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
    evaluate: bool = setting(False, doc="after each committed push, score that version on the agents' held-out "
                             "data (agents with training.holdout_share > 0) and report it to core")
    max_update_norm: float | None = setting(None, gt=0.0)
    aggregation: str = setting("mean", doc="mean (FedAvg), trimmed_mean or median (robust, coordinate-wise), or "
                               "an installed rule: an entry point of group hyprstream.aggregators or "
                               "package.module:attribute (robust and installed rules: not with secure "
                               "aggregation)")
    trim_fraction: float = setting(0.1, ge=0.0, lt=0.5, doc="trimmed_mean: share dropped at each end")
    update_encoding: Encoding = setting(Encoding.FP32, doc="how agents send their deltas: fp32, or int8 (per "
                                        "tensor, stochastic rounding: about 4x less uplink; with secure "
                                        "aggregation: a 16-bit field, half the 32-bit field's uplink)")
    mode: RoundMode = setting(RoundMode.SYNC, doc="sync rounds or buffered asynchronous aggregation (FedBuff)")
    buffer_k: int = setting(3, ge=1, doc="buffered: updates per push")
    max_staleness: int = setting(4, ge=0, doc="buffered: refuse updates trained this many versions ago or more")
    concurrency: int = setting(0, ge=0, doc="buffered: agents training at once (at most all); 0: every agent")

    @cached_property
    def rule(self) -> Rule:
        """The aggregation rule ``aggregation`` names, loaded (ValidationError when it does not load)."""
        return resolve_rule(self.aggregation)

    def check(self):
        try:
            _ = self.rule  # loads an installed rule now, so that a broken one is reported with the config
        except ValidationError as exc:
            yield "aggregation", str(exc)
        if self.min_replies > self.min_agents:
            yield "min_replies", "is larger than min_agents"
        if self.schedule is LayerSchedule.ROUND_ROBIN and not self.layers:
            yield "layers", "round_robin needs the list of layer groups to rotate through"
        if self.mode is RoundMode.BUFFERED and self.schedule is LayerSchedule.ROUND_ROBIN:
            yield "schedule", "buffered mode trains the same layers every push: use schedule = 'fixed'"


@dataclass(frozen=True)
class MetricsSettings:
    """Prometheus ``/metrics``, ``/healthz`` and ``/readyz``: on by default at 127.0.0.1:9466; off when ``port``
    is 0 (a second fog on one host sets a port of its own)."""

    host: str = setting("127.0.0.1")
    port: int = setting(9466, ge=0, le=65535, doc="9466 by default; 0 turns the endpoint off")
    token_file: str = setting("", doc="bearer token scrapers must send (recommended off loopback)", file=read_token)
    stale_after_s: float = setting(600.0, gt=0.0, doc="/healthz fails when no round finished for this long")


@dataclass(frozen=True)
class FleetSettings(Checked):
    """The fleet view (MQTT telemetry) and telemetry-driven selection; off when ``mqtt_host`` is empty."""

    fleet: str = setting("", doc="the agents' fleet name (topics hyprstream/v1/<fleet>/...)")
    mqtt_host: str = setting("", doc="MQTT broker; empty: no fleet view, every agent is asked each round")
    mqtt_port: int = setting(0, ge=0, le=65535, doc="0: 1883, or 8883 with mqtt_ca_file")
    mqtt_ca_file: str = setting("", doc="CA certificate of the broker (turns TLS on)", file=pem_certificate)
    mqtt_cert_file: str = setting("", doc="client certificate (mutual TLS), with mqtt_key_file", file=pem_certificate)
    mqtt_key_file: str = setting("", file=pem_private_key)
    username: str = setting("")
    password_file: str = setting("", doc="file holding the MQTT password (with username)", file=read_token)
    clients_per_round: int = setting(0, ge=0, doc="agents chosen per round; 0: every eligible agent")
    stale_after_s: float = setting(300.0, gt=0.0, doc="telemetry older than this counts as none")
    min_battery_percent: float = setting(20.0, ge=0.0, le=100.0, doc="on battery below this: not chosen")
    fairness_window: int = setting(10, ge=1, doc="rounds over which participation is counted")
    warmup_s: float = setting(30.0, ge=0.0, doc="before the first round, wait up to this long for every agent's "
                                                "telemetry")
    weights: SelectionWeights = field(default_factory=SelectionWeights)

    @property
    def enabled(self) -> bool:
        return bool(self.mqtt_host)

    def check(self):
        if self.enabled:
            try:
                check_topic_part("fleet", self.fleet)
            except ValidationError as exc:
                yield "fleet", str(exc)
        if bool(self.mqtt_cert_file) != bool(self.mqtt_key_file):
            yield "mqtt_cert_file", "a client certificate needs mqtt_cert_file and mqtt_key_file together"
        if self.mqtt_cert_file and not self.mqtt_ca_file:
            yield "mqtt_ca_file", "a client certificate needs TLS: set mqtt_ca_file"
        if bool(self.username) != bool(self.password_file):
            yield "password_file", "username and password_file go together"

    def broker(self) -> BrokerConfig:
        """The broker to connect to (reads the password file)."""
        password = read_token(self.password_file) if self.password_file else None
        port = self.mqtt_port or (8883 if self.mqtt_ca_file else 1883)
        return BrokerConfig(self.mqtt_host, port, ca_file=Path(self.mqtt_ca_file) if self.mqtt_ca_file else None,
                            cert_file=Path(self.mqtt_cert_file) if self.mqtt_cert_file else None,
                            key_file=Path(self.mqtt_key_file) if self.mqtt_key_file else None,
                            username=self.username or None, password=password)

    def rules(self) -> SelectionRules:
        return SelectionRules(self.weights, self.stale_after_s, self.min_battery_percent)


@dataclass(frozen=True)
class OffloadSettings(Checked):
    """Inference offload (``POST /v1/infer``) for agents in the minimal strategy; off when ``port`` is 0."""

    host: str = setting("127.0.0.1")
    port: int = setting(0, ge=0, le=65535)
    token_file: str = setting("", doc="bearer tokens agents must send, one per line", file=read_token)
    tls_certfile: str = setting("", doc="HTTPS certificate (with tls_keyfile)", file=pem_certificate)
    tls_keyfile: str = setting("", file=pem_private_key)
    refresh_s: float = setting(5.0, ge=0.0, doc="how often to ask core whether the model has a new version")
    max_rows: int = setting(256, ge=1, le=100_000, doc="rows per request")
    max_body_bytes: int = setting(1 << 20, ge=1024, le=1 << 30, doc="request body size")

    @property
    def enabled(self) -> bool:
        return self.port != 0

    def check(self):
        if self.enabled and not self.token_file:
            yield "token_file", "the offload endpoint needs a token file (agents authenticate with a bearer token)"
        if bool(self.tls_certfile) != bool(self.tls_keyfile):
            yield "tls_certfile", "TLS needs tls_certfile and tls_keyfile together"


@dataclass(frozen=True)
class FogConfig(Checked):
    name: str = setting(doc="the fog's identity at core (its token's subject)")
    core: CoreLink = setting()
    superlink: SuperLinkSettings = field(default_factory=SuperLinkSettings)
    rounds: RoundSettings = field(default_factory=RoundSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # [privacy.secagg], [privacy.client_dp]
    fleet: FleetSettings = field(default_factory=FleetSettings)
    offload: OffloadSettings = field(default_factory=OffloadSettings)
    state_dir: str = setting("", doc="where the fog keeps its Flower home and logs (default: a temp dir)")

    @property
    def _robust(self) -> bool:
        """Whether the aggregation rule needs each update in the clear (a robust or installed rule)."""
        try:
            return needs_rows(self.rounds.rule)
        except ValidationError:  # reported by the rounds' own check
            return self.rounds.aggregation != Aggregation.MEAN.value

    def cells(self):
        """The feature combinations (:mod:`hyprstream.fog.composition`) this configuration asks for: for
        agents in the ``full`` strategy (a device's strategy is its own, at run time); one cell per DP
        mechanism configured."""
        from hyprstream.fog.composition import Aggregate, Cell, Participants, dp_values

        secure, robust = self.privacy.secagg is not None, self._robust
        aggregation = Aggregate.SECAGG if secure else Aggregate.ROBUST if robust else Aggregate.MEAN
        chosen = self.fleet.enabled and self.fleet.clients_per_round > 0
        participants = Participants.SELECTED if chosen else Participants.ALL
        return tuple(Cell(self.rounds.mode, aggregation, dp, participants, encoding=self.rounds.update_encoding)
                     for dp in dp_values(self.privacy, devices=False))

    def check(self):
        from hyprstream.fog.composition import ROBUST_WITH_SECAGG, Where, refusals

        if self._robust and self.privacy.secagg is not None:  # two values of one axis: no cell holds both
            yield "rounds.aggregation", ROBUST_WITH_SECAGG
        else:
            yield from refusals(self.cells(), Where.FOG)
        if self.privacy.dpsgd is not None:
            yield "privacy.dpsgd", ("sample-level DP-SGD runs on the devices: put [privacy.dpsgd] in each device's "
                                    "profile (docs/agent.md); a fog has nothing to apply it to")
        if self.rounds.evaluate and (self.privacy.secagg is not None or self.privacy.client_dp is not None):
            yield "rounds.evaluate", ("federated evaluation shows the fog each agent's scores and core their plain "
                                      "mean, which secure aggregation and client-level DP exist to hide: score "
                                      "versions at core instead ([evaluation.<model>] in core.toml)")
        secagg, chosen = self.privacy.secagg, self.fleet.clients_per_round
        if secagg is not None and self.fleet.enabled and 0 < chosen < secagg.min_clients:
            yield "fleet.clients_per_round", f"is below privacy.secagg.min_clients ({secagg.min_clients})"


def load_fog_config(path: str | Path) -> FogConfig:
    data = read_toml(path)
    if data.get("kind") != "fog":
        raise ConfigError(f"expected kind = \"fog\", got {data.get('kind')!r}", source=str(path), key="kind")
    return load(FogConfig, path, ignore=("kind",))

