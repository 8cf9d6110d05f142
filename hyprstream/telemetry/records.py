"""Telemetry and status records of an agent (with the resource samples and the strategy, model variant
and execution provider names they carry), and their one wire conversion (JSON over MQTT). The agent
writes them, the fog's fleet view and selection read them: they stand below both.

Topics (see ``docs/agent.md``)::

    hyprstream/v1/<fleet>/<device_id>/telemetry   Telemetry, QoS 1, every telemetry.interval_s
    hyprstream/v1/<fleet>/<device_id>/status      Status, retained; "offline" also as the Last Will

Every payload is one UTF-8 JSON object whose ``schema`` is ``hyprstream.telemetry/2`` or
``hyprstream.status/1``. :data:`TELEMETRY_JSON_SCHEMA` and :data:`STATUS_JSON_SCHEMA` describe them
as JSON Schema for consumers that do not use Python; :func:`to_wire` and :func:`from_wire` are the
only places that turn records into bytes and back (``from_wire`` refuses anything off-schema with a
:class:`~hyprstream.errors.ValidationError`).
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hyprstream.errors import ValidationError

__all__ = [
    "STATUS_JSON_SCHEMA",
    "STATUS_SCHEMA",
    "TELEMETRY_JSON_SCHEMA",
    "TELEMETRY_SCHEMA",
    "TOPIC_ROOT",
    "DeviceState",
    "ExecutionProvider",
    "GpuSample",
    "InferenceStats",
    "IngestStats",
    "ModelState",
    "ModelVariant",
    "PrivacyState",
    "ResourceSample",
    "Status",
    "Strategy",
    "StrategyState",
    "Telemetry",
    "check_topic_part",
    "from_wire",
    "status_topic",
    "telemetry_topic",
    "to_wire",
]


class Strategy(enum.Enum):
    """The adaptive compute strategy of an agent, from most to least demanding.

    ``FULL``: inference and local training of every layer group a round asks for.
    ``HYBRID``: inference and training of at most ``training.max_layer_groups_hybrid`` layer groups,
    with ``training.batch_size_hybrid``. ``MINIMAL``: inference only; the device declines training.
    """

    FULL = "full"
    HYBRID = "hybrid"
    MINIMAL = "minimal"


class ModelVariant(enum.Enum):
    """Numeric format of the inference model."""

    FP32 = "fp32"
    INT8 = "int8"


class ExecutionProvider(enum.Enum):
    """ONNX Runtime execution provider; ``AUTO`` uses CUDA when present and usable, else the CPU."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


@dataclass(frozen=True)
class GpuSample:
    """One NVIDIA GPU's state (NVML). Readings the GPU does not support are ``None``."""

    name: str
    util_percent: float
    memory_used_mb: float
    memory_total_mb: float
    temp_c: float | None = None
    power_w: float | None = None

    @property
    def memory_percent(self) -> float:
        return 100.0 * self.memory_used_mb / self.memory_total_mb if self.memory_total_mb else 0.0


@dataclass(frozen=True)
class ResourceSample:
    """The device's resources at one moment. ``None``: the device cannot tell (no sensor, no battery)."""

    time: float  # seconds since the epoch (or since the start of a trace)
    cpu_percent: float
    memory_percent: float
    memory_used_mb: float
    disk_percent: float
    soc_temp_c: float | None = None
    battery_percent: float | None = None
    on_ac_power: bool | None = None
    gpu: GpuSample | None = None

    def __post_init__(self) -> None:
        for name in ("cpu_percent", "memory_percent", "disk_percent"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 100):
                raise ValidationError(f"resource sample: {name} must be in [0, 100], got {value!r}")
        if self.battery_percent is not None and not 0 <= self.battery_percent <= 100:
            raise ValidationError(f"resource sample: battery_percent must be in [0, 100], got {self.battery_percent}")
        if self.gpu is not None and not 0 <= self.gpu.util_percent <= 100:
            raise ValidationError(f"resource sample: gpu util_percent must be in [0, 100], got {self.gpu.util_percent}")


TELEMETRY_SCHEMA = "hyprstream.telemetry/2"
"""Version 2 carries no data size: version 1's ``store`` (row count, bytes) and ``privacy.epsilon_spent``
(an epsilon is a function of the sampling rate, batch / rows) are gone; ``privacy.budget_spent`` says
only whether the device's budget is used up."""
STATUS_SCHEMA = "hyprstream.status/1"
TOPIC_ROOT = "hyprstream/v1"

_TOPIC_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_topic_part(kind: str, value: str) -> str:
    """``value`` if it is a valid fleet name or device ID (letters, digits, ``._-``; no MQTT wildcards)."""
    if not isinstance(value, str) or not _TOPIC_PART.fullmatch(value):
        raise ValidationError(
            f"{kind} must be 1-128 letters, digits, '.', '_' or '-' (starting with a letter or digit), got {value!r}"
        )
    return value


def telemetry_topic(fleet: str, device_id: str) -> str:
    return f"{TOPIC_ROOT}/{check_topic_part('fleet', fleet)}/{check_topic_part('device ID', device_id)}/telemetry"


def status_topic(fleet: str, device_id: str) -> str:
    return f"{TOPIC_ROOT}/{check_topic_part('fleet', fleet)}/{check_topic_part('device ID', device_id)}/status"


class DeviceState(enum.Enum):
    ONLINE = "online"
    OFFLINE = "offline"


@dataclass(frozen=True)
class StrategyState:
    """The policy's current decision, as the fog sees it."""

    current: Strategy
    since: float | None  # when it came into force (None: the initial strategy, no switch yet)
    reason: str
    accept_training: bool
    execution_provider: ExecutionProvider  # CPU or CUDA
    model_variant: ModelVariant


@dataclass(frozen=True)
class ModelState:
    task: str
    version: int | None  # None: no global model received yet


@dataclass(frozen=True)
class PrivacyState:
    """The device's sample-level budget as the fog sees it: whether it is used up, never the epsilon spent
    (a function of the device's data size)."""

    budget_spent: bool
    epsilon_budget: float
    delta: float


@dataclass(frozen=True)
class InferenceStats:
    """Since the agent started."""

    requests: int = 0
    batches: int = 0
    errors: int = 0


@dataclass(frozen=True)
class IngestStats:
    """Since the agent started."""

    records: int = 0
    rejected: int = 0


@dataclass(frozen=True)
class Telemetry:
    """One periodic telemetry message (``hyprstream.telemetry/2``)."""

    fleet: str
    device_id: str
    device_class: str
    session: str  # random per agent start: a new session means the agent restarted
    seq: int  # 1, 2, ... within a session
    time: float  # seconds since the epoch
    uptime_s: float
    resources: ResourceSample
    strategy: StrategyState
    model: ModelState
    privacy: PrivacyState
    inference: InferenceStats = InferenceStats()
    ingest: IngestStats = IngestStats()

    def __post_init__(self) -> None:
        check_topic_part("fleet", self.fleet)
        check_topic_part("device ID", self.device_id)
        if self.seq < 1:
            raise ValidationError(f"telemetry seq must be >= 1, got {self.seq}")


@dataclass(frozen=True)
class Status:
    """The retained status of a device (``hyprstream.status/1``).

    ``time`` is ``None`` in the Last Will, whose payload is fixed when the agent connects; the broker
    publishes it when the connection is lost without a clean disconnect.
    """

    fleet: str
    device_id: str
    state: DeviceState
    session: str
    time: float | None
    reason: str = ""

    def __post_init__(self) -> None:
        check_topic_part("fleet", self.fleet)
        check_topic_part("device ID", self.device_id)


# ---------------------------------------------------------------------------------------------- wire


def to_wire(record: Telemetry | Status) -> bytes:
    """The JSON payload of ``record`` (compact, UTF-8)."""
    return json.dumps(_to_dict(record), separators=(",", ":"), allow_nan=False).encode()


def _to_dict(record: Telemetry | Status) -> dict[str, Any]:
    if isinstance(record, Status):
        return {"schema": STATUS_SCHEMA, "fleet": record.fleet, "device_id": record.device_id,
                "state": record.state.value, "session": record.session, "time": record.time,
                "reason": record.reason}
    r, s = record.resources, record.strategy
    gpu = None
    if r.gpu is not None:
        gpu = {"name": r.gpu.name, "util_percent": r.gpu.util_percent, "memory_used_mb": r.gpu.memory_used_mb,
               "memory_total_mb": r.gpu.memory_total_mb, "temp_c": r.gpu.temp_c, "power_w": r.gpu.power_w}
    return {
        "schema": TELEMETRY_SCHEMA, "fleet": record.fleet, "device_id": record.device_id,
        "device_class": record.device_class, "session": record.session, "seq": record.seq,
        "time": record.time, "uptime_s": record.uptime_s,
        "resources": {"time": r.time, "cpu_percent": r.cpu_percent, "memory_percent": r.memory_percent,
                      "memory_used_mb": r.memory_used_mb, "disk_percent": r.disk_percent,
                      "soc_temp_c": r.soc_temp_c, "battery_percent": r.battery_percent,
                      "on_ac_power": r.on_ac_power, "gpu": gpu},
        "strategy": {"current": s.current.value, "since": s.since, "reason": s.reason,
                     "accept_training": s.accept_training, "execution_provider": s.execution_provider.value,
                     "model_variant": s.model_variant.value},
        "model": {"task": record.model.task, "version": record.model.version},
        "privacy": {"budget_spent": record.privacy.budget_spent, "epsilon_budget": record.privacy.epsilon_budget,
                    "delta": record.privacy.delta},
        "inference": {"requests": record.inference.requests, "batches": record.inference.batches,
                      "errors": record.inference.errors},
        "ingest": {"records": record.ingest.records, "rejected": record.ingest.rejected},
    }


def from_wire(payload: bytes | str) -> Telemetry | Status:
    """The record in ``payload``; ValidationError (saying what is wrong) for anything off-schema."""
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValidationError(f"telemetry payload is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValidationError("telemetry payload must be a JSON object")
    schema = data.get("schema")
    try:
        if schema == STATUS_SCHEMA:
            return _status(_Reader(data, ""))
        if schema == TELEMETRY_SCHEMA:
            return _telemetry(_Reader(data, ""))
    except ValueError as exc:  # enum values; ValidationError is a ValueError too
        raise ValidationError(str(exc)) from None
    raise ValidationError(f"unknown payload schema {schema!r} (expected {TELEMETRY_SCHEMA!r} or {STATUS_SCHEMA!r})")


class _Reader:
    """Typed access to one JSON object; every error names the key path. Unknown keys are refused."""

    def __init__(self, data: Mapping[str, Any], path: str) -> None:
        self.data, self.path, self.seen = data, path, {"schema"} if not path else set()

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        self.seen.add(key)
        if key not in self.data:
            raise ValidationError(f"telemetry payload lacks {self._key(key)!r}")
        value = self.data[key]
        if value is None and optional:
            return None
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if float in kinds and isinstance(value, (int, float)) and not isinstance(value, bool):
            ok = math.isfinite(value)
        if not ok:
            names = "/".join(k.__name__ for k in kinds) + (" or null" if optional else "")
            raise ValidationError(f"telemetry payload {self._key(key)!r} must be {names}, got {value!r}")
        return value

    def num(self, key: str, *, optional: bool = False) -> float | None:
        value = self.get(key, float, optional=optional)
        return None if value is None else float(value)

    def sub(self, key: str, *, optional: bool = False) -> _Reader | None:
        value = self.get(key, dict, optional=optional)
        return None if value is None else _Reader(value, self._key(key))

    def done(self) -> None:
        extra = sorted(set(self.data) - self.seen)
        if extra:
            raise ValidationError(f"telemetry payload has unknown key(s) {[self._key(k) for k in extra]}")


def _count(r: _Reader, key: str) -> int:
    value = r.get(key, int)
    if value < 0:
        raise ValidationError(f"telemetry payload {r._key(key)!r} must be >= 0, got {value}")
    return value


def _status(r: _Reader) -> Status:
    status = Status(fleet=r.get("fleet", str), device_id=r.get("device_id", str),
                    state=DeviceState(r.get("state", str)), session=r.get("session", str),
                    time=r.num("time", optional=True), reason=r.get("reason", str))
    r.done()
    return status


def _telemetry(r: _Reader) -> Telemetry:
    res = r.sub("resources")
    g = res.sub("gpu", optional=True)
    gpu = None
    if g is not None:
        gpu = GpuSample(name=g.get("name", str), util_percent=g.num("util_percent"),
                        memory_used_mb=g.num("memory_used_mb"), memory_total_mb=g.num("memory_total_mb"),
                        temp_c=g.num("temp_c", optional=True), power_w=g.num("power_w", optional=True))
        g.done()
    resources = ResourceSample(
        time=res.num("time"), cpu_percent=res.num("cpu_percent"), memory_percent=res.num("memory_percent"),
        memory_used_mb=res.num("memory_used_mb"), disk_percent=res.num("disk_percent"),
        soc_temp_c=res.num("soc_temp_c", optional=True), battery_percent=res.num("battery_percent", optional=True),
        on_ac_power=res.get("on_ac_power", bool, optional=True), gpu=gpu)
    res.done()
    s = r.sub("strategy")
    strategy = StrategyState(current=Strategy(s.get("current", str)), since=s.num("since", optional=True),
                             reason=s.get("reason", str), accept_training=s.get("accept_training", bool),
                             execution_provider=ExecutionProvider(s.get("execution_provider", str)),
                             model_variant=ModelVariant(s.get("model_variant", str)))
    s.done()
    m, p, i, n = (r.sub(k) for k in ("model", "privacy", "inference", "ingest"))
    version = m.get("version", int, optional=True)
    model = ModelState(m.get("task", str), version)
    privacy = PrivacyState(p.get("budget_spent", bool), p.num("epsilon_budget"), p.num("delta"))
    inference = InferenceStats(_count(i, "requests"), _count(i, "batches"), _count(i, "errors"))
    ingest = IngestStats(_count(n, "records"), _count(n, "rejected"))
    for sub in (m, p, i, n):
        sub.done()
    record = Telemetry(
        fleet=r.get("fleet", str), device_id=r.get("device_id", str), device_class=r.get("device_class", str),
        session=r.get("session", str), seq=r.get("seq", int), time=r.num("time"), uptime_s=r.num("uptime_s"),
        resources=resources, strategy=strategy, model=model, privacy=privacy, inference=inference,
        ingest=ingest)
    r.done()
    return record


# ---------------------------------------------------------------------------------------------- JSON Schema

_NUM = {"type": "number"}
_OPT_NUM = {"type": ["number", "null"]}
_COUNT = {"type": "integer", "minimum": 0}
_ID = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"}
_PERCENT = {"type": "number", "minimum": 0, "maximum": 100}


def _obj(props: dict[str, Any], *, nullable: bool = False) -> dict[str, Any]:
    return {"type": ["object", "null"] if nullable else "object", "additionalProperties": False,
            "required": list(props), "properties": props}


TELEMETRY_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://hyprstream.dev/schemas/hyprstream.telemetry-2.json",
    "title": TELEMETRY_SCHEMA,
    **_obj({
        "schema": {"const": TELEMETRY_SCHEMA}, "fleet": _ID, "device_id": _ID, "device_class": {"type": "string"},
        "session": {"type": "string"}, "seq": {"type": "integer", "minimum": 1}, "time": _NUM, "uptime_s": _NUM,
        "resources": _obj({
            "time": _NUM, "cpu_percent": _PERCENT, "memory_percent": _PERCENT, "memory_used_mb": _NUM,
            "disk_percent": _PERCENT, "soc_temp_c": _OPT_NUM,
            "battery_percent": {"type": ["number", "null"], "minimum": 0, "maximum": 100},
            "on_ac_power": {"type": ["boolean", "null"]},
            "gpu": _obj({"name": {"type": "string"}, "util_percent": _PERCENT, "memory_used_mb": _NUM,
                         "memory_total_mb": _NUM, "temp_c": _OPT_NUM, "power_w": _OPT_NUM}, nullable=True),
        }),
        "strategy": _obj({
            "current": {"enum": [s.value for s in Strategy]}, "since": _OPT_NUM, "reason": {"type": "string"},
            "accept_training": {"type": "boolean"},
            "execution_provider": {"enum": [ExecutionProvider.CPU.value, ExecutionProvider.CUDA.value]},
            "model_variant": {"enum": [v.value for v in ModelVariant]},
        }),
        "model": _obj({"task": {"type": "string"}, "version": {"type": ["integer", "null"]}}),
        "privacy": _obj({"budget_spent": {"type": "boolean"}, "epsilon_budget": _NUM, "delta": _NUM}),
        "inference": _obj({"requests": _COUNT, "batches": _COUNT, "errors": _COUNT}),
        "ingest": _obj({"records": _COUNT, "rejected": _COUNT}),
    }),
}
"""JSON Schema (draft 2020-12) of ``hyprstream.telemetry/2`` payloads."""

STATUS_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://hyprstream.dev/schemas/hyprstream.status-1.json",
    "title": STATUS_SCHEMA,
    **_obj({"schema": {"const": STATUS_SCHEMA}, "fleet": _ID, "device_id": _ID,
            "state": {"enum": [s.value for s in DeviceState]}, "session": {"type": "string"},
            "time": _OPT_NUM, "reason": {"type": "string"}}),
}
"""JSON Schema (draft 2020-12) of ``hyprstream.status/1`` payloads."""
