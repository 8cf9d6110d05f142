"""Messages between fog and agents: typed records and their one conversion to Flower records.

A fog sends ``train.layerwise`` messages; the content is a Flower ``RecordDict``:

=================  ============  ===================================================================
key                record        contents
=================  ============  ===================================================================
``weights``        ArrayRecord   the global model at ``model_version`` (every parameter, by name)
``config``         ConfigRecord  ``schema``, ``model``, ``model_version``, ``task``, ``layers``,
                                 ``local_steps``, ``batch_size``, ``lr``, ``seed``, and
                                 ``update_encoding`` when it is not ``fp32`` (``int8``)
=================  ============  ===================================================================

The agent answers with:

=================  ============  ===================================================================
``delta``          ArrayRecord   new minus old value of each parameter in the trained layers (float32;
                                 with ``encoding`` ``int8``: int8 values, see :mod:`hyprstream.codec`)
``scales``         ArrayRecord   only with ``int8``: each parameter's float32 scale (a 1-element array)
``metrics``        MetricRecord  ``num_examples``, ``train_loss``, ``steps``, and with sample-level DP
                                 ``epsilon`` / ``delta``: the device's total spend after this round
``config``         ConfigRecord  ``schema``, ``status`` (``ok``/``declined``), ``reason``,
                                 ``model_version``, ``layers``, and ``encoding`` when not ``fp32``
=================  ============  ===================================================================

An agent that predates ``update_encoding`` ignores it and answers in fp32, which the fog accepts:
the reply says which encoding it carries. The fog decodes in :meth:`TrainReply.from_content`, so
aggregation sees float32 deltas either way; :meth:`TrainReply.payload_bytes` counts the encoded bytes.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from hyprstream.codec import Encoding, decode_int8, encode_int8, encoded_nbytes, parse_encoding
from hyprstream.errors import ValidationError

TRAIN_MESSAGE_TYPE = "train.layerwise"
DEVICE_QUERY_TYPE = "query.device"
DEVICE_INFO_SCHEMA = "hyprstream.device-info/2"
TRAIN_REQUEST_SCHEMA = "hyprstream.train/1"
TRAIN_REPLY_SCHEMA = "hyprstream.train-reply/1"
EVALUATE_MESSAGE_TYPE = "evaluate.heldout"
EVALUATE_REQUEST_SCHEMA = "hyprstream.evaluate/1"
EVALUATE_REPLY_SCHEMA = "hyprstream.evaluate-reply/1"
INFER_SCHEMA = "hyprstream.infer/1"  # the answers of a fog's inference offload endpoint (hyprstream.fog.offload)


def train_seed(seed: int, round_no: int = 0, index: int = 0) -> int:
    """The one seed formula: the ``seed`` of the train request a fog seeded ``seed`` sends its agent number
    ``index`` in round ``round_no`` (the simulator and the flat baseline give a device the same seed the
    deployed fog would). Distinct for distinct (round, index) while ``index < 1009``."""
    return seed * 1_000_003 + round_no * 1009 + index


class ReplyStatus(enum.Enum):
    OK = "ok"
    DECLINED = "declined"


@dataclass(frozen=True)
class TrainRequest:
    model: str
    model_version: int
    task: str
    layers: tuple[str, ...]
    local_steps: int
    batch_size: int
    lr: float
    seed: int
    weights: Mapping[str, np.ndarray] = field(repr=False)
    update_encoding: Encoding = Encoding.FP32  # how the agent should encode its delta

    def __post_init__(self) -> None:
        object.__setattr__(self, "update_encoding", parse_encoding(
            self.update_encoding.value if isinstance(self.update_encoding, Encoding) else self.update_encoding))

    def to_content(self) -> RecordDict:
        config = {
            "schema": TRAIN_REQUEST_SCHEMA, "model": self.model, "model_version": self.model_version,
            "task": self.task, "layers": list(self.layers), "local_steps": self.local_steps,
            "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed,
        }
        if self.update_encoding is not Encoding.FP32:  # absent means fp32 (older fogs send none)
            config["update_encoding"] = self.update_encoding.value
        return RecordDict({"weights": arrays_to_record(self.weights), "config": ConfigRecord(config)})

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainRequest:
        cfg = _config(content, TRAIN_REQUEST_SCHEMA)
        req = cls(
            model=_get(cfg, "model", str), model_version=_get(cfg, "model_version", int),
            task=_get(cfg, "task", str), layers=tuple(_get(cfg, "layers", list)),
            local_steps=_get(cfg, "local_steps", int), batch_size=_get(cfg, "batch_size", int),
            lr=float(_get(cfg, "lr", float)), seed=_get(cfg, "seed", int),
            weights=record_to_arrays(_record(content, "weights", ArrayRecord)),
            update_encoding=_encoding(cfg, "update_encoding"),
        )
        if not req.layers or not all(isinstance(x, str) for x in req.layers):
            raise ValidationError("train request: 'layers' must be a non-empty list of layer names")
        if req.local_steps < 1 or req.batch_size < 1 or not (0 < req.lr < 10 and math.isfinite(req.lr)):
            raise ValidationError("train request: local_steps and batch_size must be >= 1 and 0 < lr < 10")
        return req

    def payload_bytes(self) -> int:
        return sum(int(np.asarray(a).nbytes) for a in self.weights.values())


@dataclass(frozen=True)
class TrainReply:
    status: ReplyStatus
    model_version: int
    layers: tuple[str, ...]
    delta: Mapping[str, np.ndarray] = field(repr=False, default_factory=dict)
    num_examples: int = 0
    train_loss: float = 0.0
    steps: int = 0
    reason: str = ""
    epsilon: float | None = None  # sample-level DP: the device's total epsilon after this round
    delta_dp: float | None = None  # ... at this delta
    encoding: Encoding = Encoding.FP32  # how ``delta`` travels (it is held here decoded, as float arrays)
    encoding_seed: int = 0  # seeds int8's stochastic rounding (the request's seed: reproducible)

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoding", parse_encoding(
            self.encoding.value if isinstance(self.encoding, Encoding) else self.encoding))

    def to_content(self) -> RecordDict:
        metrics = {"num_examples": self.num_examples, "train_loss": self.train_loss, "steps": self.steps}
        if self.epsilon is not None:
            metrics.update(epsilon=float(self.epsilon), delta=float(self.delta_dp or 0.0))
        config = {"schema": TRAIN_REPLY_SCHEMA, "status": self.status.value, "reason": self.reason,
                  "model_version": self.model_version, "layers": list(self.layers)}
        content = {"delta": arrays_to_record(self.delta)}
        if self.encoding is Encoding.INT8:
            config["encoding"] = self.encoding.value
            rng = np.random.default_rng([self.encoding_seed, 0x18])
            encoded = {name: encode_int8(np.asarray(d), rng) for name, d in self.delta.items()}
            scales = {name: np.full(1, s, np.float32) for name, (_, s) in encoded.items()}
            content = {"delta": arrays_to_record({name: q for name, (q, _) in encoded.items()}),
                       "scales": arrays_to_record(scales)}
        return RecordDict({**content, "metrics": MetricRecord(metrics), "config": ConfigRecord(config)})

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainReply:
        cfg = _config(content, TRAIN_REPLY_SCHEMA)
        metrics = _record(content, "metrics", MetricRecord)
        status = _get(cfg, "status", str)
        if status not in {s.value for s in ReplyStatus}:
            raise ValidationError(f"train reply: unknown status {status!r}")
        num_examples = metrics.get("num_examples", 0)
        if not isinstance(num_examples, int) or num_examples < 0:
            raise ValidationError("train reply: num_examples must be an integer >= 0")
        loss = float(metrics.get("train_loss", 0.0))
        epsilon = metrics.get("epsilon")
        if epsilon is not None and not (isinstance(epsilon, (int, float)) and 0 <= epsilon < math.inf):
            raise ValidationError("train reply: epsilon must be a finite number >= 0")
        dp_delta = metrics.get("delta")
        encoding = _encoding(cfg, "encoding")
        delta = record_to_arrays(_record(content, "delta", ArrayRecord))
        if encoding is Encoding.INT8:
            scales = record_to_arrays(_record(content, "scales", ArrayRecord))
            if set(scales) != set(delta) or any(np.shape(s) != (1,) for s in scales.values()):
                raise ValidationError("train reply: int8 'scales' must hold one scalar per delta parameter")
            delta = {name: decode_int8(q, float(scales[name][0])) for name, q in delta.items()}
        return cls(
            status=ReplyStatus(status), model_version=_get(cfg, "model_version", int),
            layers=tuple(_get(cfg, "layers", list)), delta=delta,
            num_examples=num_examples, train_loss=loss, steps=int(metrics.get("steps", 0)),
            reason=str(cfg.get("reason", "")),
            epsilon=float(epsilon) if epsilon is not None else None,
            delta_dp=float(dp_delta) if epsilon is not None and dp_delta is not None else None,
            encoding=encoding,
        )

    def payload_bytes(self) -> int:
        """Bytes of the delta as it travels: float arrays as they are, int8 values plus their scales."""
        if self.encoding is Encoding.FP32:
            return sum(int(np.asarray(a).nbytes) for a in self.delta.values())
        return sum(encoded_nbytes(np.shape(a), self.encoding) for a in self.delta.values())


@dataclass(frozen=True)
class EvaluateRequest:
    """Evaluate ``weights`` (a global version) on the device's held-out split."""

    model: str
    model_version: int
    task: str
    weights: Mapping[str, np.ndarray] = field(repr=False)

    def to_content(self) -> RecordDict:
        return RecordDict({"weights": arrays_to_record(self.weights), "config": ConfigRecord({
            "schema": EVALUATE_REQUEST_SCHEMA, "model": self.model, "model_version": self.model_version,
            "task": self.task})})

    @classmethod
    def from_content(cls, content: RecordDict) -> EvaluateRequest:
        cfg = _config(content, EVALUATE_REQUEST_SCHEMA)
        return cls(_get(cfg, "model", str), _get(cfg, "model_version", int), _get(cfg, "task", str),
                   record_to_arrays(_record(content, "weights", ArrayRecord)))


@dataclass(frozen=True)
class EvaluateReply:
    """The mean loss and accuracy of a version on the device's held-out split, and that split's size as a
    :func:`data_bucket` (never the count); or ``declined`` with the reason."""

    status: ReplyStatus
    model_version: int
    loss: float = 0.0
    accuracy: float = 0.0
    data_bucket: int = 0
    reason: str = ""

    def to_content(self) -> RecordDict:
        return RecordDict({"config": ConfigRecord({
            "schema": EVALUATE_REPLY_SCHEMA, "status": self.status.value, "model_version": self.model_version,
            "loss": float(self.loss), "accuracy": float(self.accuracy), "data_bucket": self.data_bucket,
            "reason": self.reason})})

    @classmethod
    def from_content(cls, content: RecordDict) -> EvaluateReply:
        cfg = _config(content, EVALUATE_REPLY_SCHEMA)
        status = _get(cfg, "status", str)
        if status not in {s.value for s in ReplyStatus}:
            raise ValidationError(f"evaluate reply: unknown status {status!r}")
        loss, accuracy = float(_get(cfg, "loss", float)), float(_get(cfg, "accuracy", float))
        bucket = _get(cfg, "data_bucket", int)
        if status == ReplyStatus.OK.value and not (math.isfinite(loss) and loss >= 0 and 0 <= accuracy <= 1
                                                   and 1 <= bucket <= 64):
            raise ValidationError("evaluate reply: loss must be finite and >= 0, accuracy in [0, 1] and the "
                                  "data bucket in 1..64")
        return cls(ReplyStatus(status), _get(cfg, "model_version", int), loss, accuracy, bucket,
                   str(cfg.get("reason", "")))


def data_bucket(rows: int) -> int:
    """A device's data size as the fog may learn it: 0 without data, else b for 2^(b-1) <= rows < 2^b
    (the size to within a factor of two, never the count)."""
    if rows < 0:
        raise ValidationError(f"a row count must be >= 0, got {rows}")
    return int(rows).bit_length()


@dataclass(frozen=True)
class DeviceInfo:
    """An agent's answer to ``query.device``: who it is, and its data size as a :func:`data_bucket`."""

    device_id: str
    data_bucket: int

    def to_content(self) -> RecordDict:
        return RecordDict({"config": ConfigRecord({"schema": DEVICE_INFO_SCHEMA, "device_id": self.device_id,
                                                   "data_bucket": self.data_bucket})})

    @classmethod
    def from_content(cls, content: RecordDict) -> DeviceInfo:
        cfg = _config(content, DEVICE_INFO_SCHEMA)
        info = cls(_get(cfg, "device_id", str), _get(cfg, "data_bucket", int))
        if not info.device_id or not 0 <= info.data_bucket <= 64:
            raise ValidationError("device info: empty device_id or a data bucket outside 0..64")
        return info


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def _config(content: RecordDict, schema: str) -> ConfigRecord:
    cfg = _record(content, "config", ConfigRecord)
    if cfg.get("schema") != schema:
        raise ValidationError(f"expected message schema {schema!r}, got {cfg.get('schema')!r}")
    return cfg


def _record(content: RecordDict, key: str, kind: type):
    if key not in content:
        raise ValidationError(f"message lacks the {key!r} record")
    rec = content[key]
    if not isinstance(rec, kind):
        raise ValidationError(f"message record {key!r} is a {type(rec).__name__}, expected {kind.__name__}")
    return rec


def _encoding(cfg: ConfigRecord, key: str) -> Encoding:
    """An optional encoding key (absent: fp32)."""
    value = cfg.get(key, Encoding.FP32.value)
    if not isinstance(value, str):
        raise ValidationError(f"message config {key!r} must be str")
    return parse_encoding(value)


def _get(cfg: ConfigRecord, key: str, kind: type):
    if key not in cfg:
        raise ValidationError(f"message config lacks {key!r}")
    value = cfg[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else isinstance(value, kind)
    if not ok or (kind is int and isinstance(value, bool)):
        raise ValidationError(f"message config {key!r} must be {kind.__name__}")
    return value
