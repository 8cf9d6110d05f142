"""Core's Flight commands: typed records and their one wire form (UTF-8 JSON).

Every command is a JSON object with ``"schema": "hyprstream.core/1"`` and ``"command"``. They travel
as a Flight ticket (``do_get``), a descriptor command (``do_put``) or an action body (``do_action``);
``docs/api.md`` shows each with a plain ``pyarrow.flight`` client.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from hyprstream.coreapi.records import check_name, quote
from hyprstream.vector_clock import VectorClock, clocks_from_json, clocks_to_json
from hyprstream.errors import ValidationError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")

SCHEMA = "hyprstream.core/1"
MAX_COMMAND_BYTES = 1 << 20
MAX_DEPTH = 32  # nesting of JSON arrays and objects in a command
MAX_NUMBER_CHARS = 32  # characters of one JSON number (int64 needs 20; a float's repr at most 24)
_NESTING = re.compile(rb'[\[\]{}]|"(?:[^"\\]|\\.)*+"?', re.S)  # a bracket, or a string (linear: never backtracks)

# Keys in the Arrow schema metadata of a weights stream.
META_MODEL = "hyprstream.model"
META_VERSION = "hyprstream.version"
META_CLOCKS = "hyprstream.clocks"


@dataclass(frozen=True)
class GetWeights:
    """do_get: a model version (latest when ``version`` is None), all layers or ``layers``."""

    model: str
    version: int | None = None
    layers: tuple[str, ...] | None = None
    command: str = field(default="get_weights", init=False)


@dataclass(frozen=True)
class RegisterModel:
    """do_put: create a model at version 0 from the layer table that follows."""

    model: str
    consistency: Mapping[str, Any] = field(default_factory=dict)
    max_update_norm: float | None = None
    command: str = field(default="register_model", init=False)


@dataclass(frozen=True)
class PushDelta:
    """do_put: merge the layer-wise delta that follows, computed from ``base_clocks``.

    It is a push's one typed record, from the fog's outbox (which stores it beside the delta) through
    :meth:`CoreClient.push <hyprstream.coreapi.client.CoreClient.push>` and the server to the repository,
    which writes :func:`claims` of it into the version's lineage entry and its audit entry."""

    model: str
    fog: str
    seq: int
    base_clocks: Mapping[str, VectorClock]
    participants: int
    privacy: Mapping[str, float] | None = None  # privacy spent by the round, e.g. {"epsilon": .., "delta": ..}
    transcript_sha256: str | None = None  # hash of the secure-aggregation transcript, hex
    command: str = field(default="push_delta", init=False)


@dataclass(frozen=True)
class Head:
    """do_action ``head``: current version of a model, its layers and clocks."""

    model: str
    command: str = field(default="head", init=False)


@dataclass(frozen=True)
class ListVersions:
    """do_action ``list_versions``: lineage of a model."""

    model: str
    command: str = field(default="list_versions", init=False)


@dataclass(frozen=True)
class ListModels:
    """do_action ``list_models``."""

    command: str = field(default="list_models", init=False)


@dataclass(frozen=True)
class ReadAudit:
    """do_get: audit log lines from ``since_seq`` on (at most ``limit``), one row per entry."""

    since_seq: int = 1
    limit: int | None = None
    command: str = field(default="read_audit", init=False)


@dataclass(frozen=True)
class AuditHead:
    """do_action ``audit_head``: the signed head checkpoint of the audit log."""

    command: str = field(default="audit_head", init=False)


@dataclass(frozen=True)
class IssueToken:
    """do_action ``issue_token``: a signed token for ``sub`` with ``role``, valid ``ttl_s`` seconds."""

    sub: str
    role: str
    ttl_s: int
    command: str = field(default="issue_token", init=False)


@dataclass(frozen=True)
class RevokeToken:
    """do_action ``revoke_token``: refuse the signed token ``jti`` from now on, for ``reason``."""

    jti: str
    reason: str = ""
    command: str = field(default="revoke_token", init=False)


@dataclass(frozen=True)
class ReportEvaluation:
    """do_action ``report_evaluation``: a fog's federated evaluation of ``version`` on its agents' held-out
    splits: the mean over the ``devices`` that answered of their mean loss and accuracy."""

    model: str
    version: int
    fog: str
    loss: float
    accuracy: float
    devices: int
    command: str = field(default="report_evaluation", init=False)


Command = (GetWeights | RegisterModel | PushDelta | Head | ListVersions | ListModels | ReadAudit | AuditHead
           | IssueToken | RevokeToken | ReportEvaluation)
_BY_NAME: dict[str, type] = {c.__dataclass_fields__["command"].default: c
                             for c in (GetWeights, RegisterModel, PushDelta, Head, ListVersions, ListModels,
                                       ReadAudit, AuditHead, IssueToken, RevokeToken, ReportEvaluation)}
_JTI = re.compile(r"[0-9a-f]{1,64}\Z")
MAX_REASON_CHARS = 200


def claims(push: PushDelta) -> dict[str, Any]:
    """What ``push`` claims besides its delta, as core records it (lineage entry, audit entry, refusals)."""
    return {"fog": push.fog, "seq": push.seq, "participants": push.participants,
            "base_clocks": clocks_to_json(push.base_clocks),
            "privacy": None if push.privacy is None else {str(k): float(v) for k, v in push.privacy.items()},
            "transcript_sha256": push.transcript_sha256}


def encode(cmd: Command) -> bytes:
    body = asdict(cmd)
    if isinstance(cmd, PushDelta):
        body["base_clocks"] = clocks_to_json(cmd.base_clocks)
    if isinstance(cmd, GetWeights) and cmd.layers is not None:
        body["layers"] = list(cmd.layers)
    return json.dumps({"schema": SCHEMA, **body}, separators=(",", ":")).encode()


def _number(text: str, what: str) -> str:
    if len(text) > MAX_NUMBER_CHARS:
        raise ValidationError(f"{what} has a number longer than {MAX_NUMBER_CHARS} characters")
    return text


def _float(text: str, what: str) -> float:
    value = float(_number(text, what))
    if not math.isfinite(value):
        raise ValidationError(f"{what} has the number {text}, which is not finite as a float")
    return value


def _constant(text: str, what: str):
    raise ValidationError(f"{what} has the non-JSON number {text}")


def load_json(raw: bytes, what: str = "command") -> Any:
    """``json.loads`` within bounds: at most :data:`MAX_COMMAND_BYTES`, :data:`MAX_DEPTH` levels of
    nesting and :data:`MAX_NUMBER_CHARS` per number, no NaN/Infinity; ValidationError otherwise.

    Depth is measured before parsing (the parser recurses once per level), over the bracket characters
    outside strings; a command with few brackets skips the scan.
    """
    if len(raw) > MAX_COMMAND_BYTES:
        raise ValidationError(f"{what} larger than {MAX_COMMAND_BYTES} bytes")
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:
        depth = 0
        for m in _NESTING.finditer(raw):
            c = m.group()
            if c in (b"[", b"{"):
                depth += 1
                if depth > MAX_DEPTH:
                    raise ValidationError(f"{what} nests deeper than {MAX_DEPTH} levels")
            elif c in (b"]", b"}"):
                depth -= 1
    try:
        return json.loads(raw, parse_int=lambda t: int(_number(t, what)), parse_float=lambda t: _float(t, what),
                          parse_constant=lambda t: _constant(t, what))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValidationError(f"{what} is not valid JSON: {exc}") from None


def decode(raw: bytes, *, expect: tuple[type, ...] | None = None, action: str | None = None) -> Command:
    """Parse and validate a command; raises ValidationError with the reason.

    ``action``: ``raw`` is the body of that ``do_action`` type, whose ``command`` is the action type
    and whose ``schema`` may be left out (an empty body is ``{}``).
    """
    body = load_json(raw, "action body" if action is not None else "command") if raw or action is None else {}
    if not isinstance(body, dict):
        raise ValidationError("action body must be a JSON object" if action is not None
                              else "command must be a JSON object")
    if action is not None:
        body = {**body, "schema": body.get("schema", SCHEMA), "command": action}
    if body.pop("schema", None) != SCHEMA:
        raise ValidationError(f"command must carry \"schema\": \"{SCHEMA}\"")
    name = body.pop("command", None)
    cls = _BY_NAME.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValidationError(f"unknown command {quote(name)} (known: {', '.join(sorted(_BY_NAME))})")
    if expect is not None and cls not in expect:
        raise ValidationError(f"command {name!r} is not valid here")
    allowed = {k for k, f in cls.__dataclass_fields__.items() if f.init}
    extra = sorted(set(body) - allowed)
    if extra:
        raise ValidationError(f"{name}: unknown field(s) {quote(extra)}")
    try:
        return _build(cls, body)
    except TypeError as exc:
        raise ValidationError(f"{name}: {exc}") from None


def _require(body: Mapping[str, Any], key: str, types: type | tuple[type, ...], *, optional: bool = False) -> Any:
    if key not in body or body[key] is None:
        if optional:
            return None
        raise ValidationError(f"missing field {key!r}")
    value = body[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ValidationError(f"field {key!r} has the wrong type")
    if not isinstance(value, types):
        raise ValidationError(f"field {key!r} has the wrong type")
    if isinstance(value, int) and not -2**63 <= value < 2**63:
        raise ValidationError(f"field {key!r} is outside the 64-bit integer range")
    return value


def _model(body: Mapping[str, Any]) -> str:
    return check_name("model", _require(body, "model", str))


def _build(cls: type, body: Mapping[str, Any]) -> Command:
    if cls is GetWeights:
        version = _require(body, "version", int, optional=True)
        if version is not None and version < 0:
            raise ValidationError("field 'version' must be >= 0")
        layers = _require(body, "layers", list, optional=True)
        if layers is not None and not all(isinstance(x, str) for x in layers):
            raise ValidationError("field 'layers' must be a list of strings")
        for layer in layers or ():
            check_name("layer", layer)
        return GetWeights(_model(body), version, tuple(layers) if layers is not None else None)
    if cls is RegisterModel:
        norm = _require(body, "max_update_norm", (int, float), optional=True)
        if norm is not None and not norm > 0:
            raise ValidationError("field 'max_update_norm' must be > 0")
        return RegisterModel(_model(body), _require(body, "consistency", dict, optional=True) or {},
                             None if norm is None else float(norm))
    if cls is PushDelta:
        seq, participants = _require(body, "seq", int), _require(body, "participants", int)
        if seq < 1 or participants < 0:
            raise ValidationError("fields 'seq' >= 1 and 'participants' >= 0 are required")
        privacy = _require(body, "privacy", dict, optional=True)
        if privacy is not None:
            for k, v in privacy.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
                    raise ValidationError(f"field 'privacy' must map names to finite numbers >= 0 ({k!r})")
            privacy = {str(k): float(v) for k, v in privacy.items()}
        transcript = _require(body, "transcript_sha256", str, optional=True)
        if transcript is not None and not _HEX64.match(transcript):
            raise ValidationError("field 'transcript_sha256' must be 64 lowercase hex digits")
        return PushDelta(_model(body), check_name("fog", _require(body, "fog", str)), seq,
                         clocks_from_json(_require(body, "base_clocks", dict)), participants, privacy, transcript)
    if cls in (Head, ListVersions):
        return cls(_model(body))
    if cls is ReadAudit:
        since = _require(body, "since_seq", int, optional=True)
        limit = _require(body, "limit", int, optional=True)
        if (since is not None and since < 1) or (limit is not None and limit < 1):
            raise ValidationError("fields 'since_seq' and 'limit' must be >= 1")
        return ReadAudit(1 if since is None else since, limit)
    if cls is ReportEvaluation:
        version, devices = _require(body, "version", int), _require(body, "devices", int)
        loss, accuracy = float(_require(body, "loss", (int, float))), float(_require(body, "accuracy", (int, float)))
        if version < 1 or devices < 1 or not 0.0 <= loss < float("inf") or not 0.0 <= accuracy <= 1.0:
            raise ValidationError("report_evaluation needs 'version' >= 1, 'devices' >= 1, a finite 'loss' >= 0 "
                                  "and 'accuracy' in [0, 1]")
        return ReportEvaluation(_model(body), version, check_name("fog", _require(body, "fog", str)), loss, accuracy,
                                devices)
    if cls is IssueToken:
        ttl = _require(body, "ttl_s", int)
        if ttl < 1:  # the upper bound is tokens.MAX_TTL_S, checked where tokens are issued
            raise ValidationError("field 'ttl_s' must be >= 1")
        return IssueToken(_require(body, "sub", str), _require(body, "role", str), ttl)
    if cls is RevokeToken:
        jti = _require(body, "jti", str)
        if not _JTI.match(jti):
            raise ValidationError(f"field 'jti' must be a token's jti (1-64 lowercase hex digits), got {quote(jti)}")
        reason = _require(body, "reason", str, optional=True) or ""
        if len(reason) > MAX_REASON_CHARS:
            raise ValidationError(f"field 'reason' must be at most {MAX_REASON_CHARS} characters")
        return RevokeToken(jti, reason)
    return cls()
