"""Wire format of secure aggregation over Flower's Message API: the one place records are converted.

Every stage is a message of type ``train.secagg`` (:data:`SECAGG_MESSAGE_TYPE`). Its content holds a
``ConfigRecord`` under ``"secagg"`` with ``schema`` (``hyprstream.secagg/1``), ``stage`` and
``round_id``; replies that are not ``ok`` add ``status`` (``declined`` / ``refused``) and ``reason``
(a reply without ``status`` is ``ok``).

========  ===========================================  ===============================================
stage     fog -> client                                client -> fog
========  ===========================================  ===============================================
setup     the train request (``weights``, ``config``,  ``enc_key``, ``mask_key``, ``commitment``
          as in protocol.py) + index, neighbours,      (or ``declined`` with the agent's reason; no
          threshold, quantizer, clip, noise, layout    delta, metrics or ``num_examples`` ever)
share     neighbours' public keys and commitments      ``dsts`` and ``sealed`` shares for them
mask      ``srcs`` and the ``sealed`` shares for it    ``masked`` ArrayRecord: the masked field vector
unmask    ``survivors`` and ``dropped`` neighbours     ``b_owners``/``b_shares``, ``s_owners``/``s_shares``
========  ===========================================  ===============================================

A separate message type (not ``train.layerwise``) is deliberate: an agent without the secure
aggregation middleware has no handler for it and fails the message instead of training and
answering with a plaintext delta.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from hyprstream.errors import ValidationError
from hyprstream.privacy.clipping import Layout
from hyprstream.privacy.contribution import InputSpec
from hyprstream.privacy.quantize import Quantizer
from hyprstream.privacy.secagg import (
    ROUND_ID_BYTES,
    KeyAdvert,
    MaskedInput,
    NeighbourKeys,
    SealedShares,
    UnmaskRequest,
    UnmaskShares,
)

SECAGG_ACTION = "secagg"
SECAGG_MESSAGE_TYPE = f"train.{SECAGG_ACTION}"
SCHEMA = "hyprstream.secagg/1"
RECORD = "secagg"
MASKED = "masked"


class Stage(enum.Enum):
    SETUP = "setup"
    SHARE = "share"
    MASK = "mask"
    UNMASK = "unmask"


class Status(enum.Enum):
    OK = "ok"
    DECLINED = "declined"  # the agent declined to train (budget, no data, ...): not an error
    REFUSED = "refused"  # the client refused a protocol step (out of order, inconsistent request)


@dataclass(frozen=True)
class Setup:
    round_id: bytes
    index: int
    neighbours: tuple[int, ...]
    threshold: int
    spec: InputSpec


@dataclass(frozen=True)
class Header:
    stage: Stage
    round_id: bytes
    status: Status = Status.OK
    reason: str = ""


def _base(stage: Stage, round_id: bytes, **values) -> ConfigRecord:
    return ConfigRecord({"schema": SCHEMA, "stage": stage.value, "round_id": round_id, **values})


def _get(cfg: ConfigRecord, key: str, kind: type):
    if key not in cfg:
        raise ValidationError(f"secure aggregation message lacks {key!r}")
    value = cfg[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValidationError(f"secure aggregation message field {key!r} must be {kind.__name__}")
    return value


def _ints(cfg: ConfigRecord, key: str) -> list[int]:
    values = _get(cfg, key, list)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValidationError(f"secure aggregation message field {key!r} must list integers")
    return values


def _bytes_list(cfg: ConfigRecord, key: str) -> list[bytes]:
    values = _get(cfg, key, list)
    if not all(isinstance(v, bytes) for v in values):
        raise ValidationError(f"secure aggregation message field {key!r} must list bytes")
    return values


def header(content: RecordDict) -> Header:
    """Stage, round and status of any secure-aggregation message; ValidationError if it is not one."""
    cfg = content.get(RECORD)
    if not isinstance(cfg, ConfigRecord) or cfg.get("schema") != SCHEMA:
        raise ValidationError(f"not a {SCHEMA} message")
    try:
        stage = Stage(_get(cfg, "stage", str))
        status = Status(cfg.get("status", Status.OK.value))
    except ValueError as exc:
        raise ValidationError(f"secure aggregation message: {exc}") from None
    rid = _get(cfg, "round_id", bytes)
    if len(rid) != ROUND_ID_BYTES:
        raise ValidationError("secure aggregation message: bad round id")
    return Header(stage, rid, status, str(cfg.get("reason", "")))


def is_secagg(content: RecordDict) -> bool:
    return isinstance(content.get(RECORD), ConfigRecord)


def reply_status(stage: Stage, round_id: bytes, status: Status, reason: str) -> RecordDict:
    return RecordDict({RECORD: _base(stage, round_id, status=status.value, reason=reason)})


# -- setup


def setup_content(train_content: RecordDict, setup: Setup) -> RecordDict:
    spec, q = setup.spec, setup.spec.quantizer
    dims, ranks = spec.layout.wire_shapes()
    content = RecordDict(dict(train_content.items()))
    content[RECORD] = _base(
        Stage.SETUP, setup.round_id, index=setup.index, neighbours=list(setup.neighbours),
        threshold=setup.threshold, field_bits=q.bits, scale=q.scale, bound=q.bound, max_terms=q.max_terms,
        clip=spec.clip, noise_sigma=spec.noise_sigma, weighted=spec.weighted, max_weight=spec.max_weight,
        layout_names=list(spec.layout.names), layout_dims=dims, layout_ranks=ranks)
    return content


def setup_from(content: RecordDict) -> tuple[Setup, RecordDict]:
    """The setup and the train request's content (without the secure-aggregation record)."""
    h = header(content)
    if h.stage is not Stage.SETUP:
        raise ValidationError(f"expected a setup message, got {h.stage.value}")
    cfg = content[RECORD]
    try:
        q = Quantizer(bits=_get(cfg, "field_bits", int), scale=_get(cfg, "scale", float),
                      bound=_get(cfg, "bound", int), max_terms=_get(cfg, "max_terms", int))
        layout = Layout.from_wire(tuple(_get(cfg, "layout_names", list)), _ints(cfg, "layout_dims"),
                                  _ints(cfg, "layout_ranks"))
        spec = InputSpec(layout, _get(cfg, "clip", float), q, noise_sigma=_get(cfg, "noise_sigma", float),
                         weighted=_get(cfg, "weighted", bool), max_weight=_get(cfg, "max_weight", float))
    except ValueError as exc:
        raise ValidationError(f"secure aggregation setup: {exc}") from None
    setup = Setup(h.round_id, _get(cfg, "index", int), tuple(_ints(cfg, "neighbours")), _get(cfg, "threshold", int), spec)
    train = RecordDict({k: v for k, v in content.items() if k != RECORD})
    return setup, train


def advert_content(round_id: bytes, advert: KeyAdvert) -> RecordDict:
    return RecordDict({RECORD: _base(Stage.SETUP, round_id,
                                     enc_key=advert.enc_key, mask_key=advert.mask_key,
                                     commitment=advert.commitment)})


def advert_from(content: RecordDict) -> KeyAdvert:
    cfg = content[RECORD]
    return KeyAdvert(_get(cfg, "enc_key", bytes), _get(cfg, "mask_key", bytes), _get(cfg, "commitment", bytes))


# -- share


def keys_content(round_id: bytes, keys: NeighbourKeys) -> RecordDict:
    peers = sorted(keys.adverts)
    return RecordDict({RECORD: _base(
        Stage.SHARE, round_id, peers=peers, enc_keys=[keys.adverts[p].enc_key for p in peers],
        mask_keys=[keys.adverts[p].mask_key for p in peers],
        commitments=[keys.adverts[p].commitment for p in peers])})


def keys_from(content: RecordDict) -> NeighbourKeys:
    cfg = content[RECORD]
    peers, enc, mask, com = (_ints(cfg, "peers"), _bytes_list(cfg, "enc_keys"), _bytes_list(cfg, "mask_keys"),
                             _bytes_list(cfg, "commitments"))
    if not len(peers) == len(enc) == len(mask) == len(com):
        raise ValidationError("secure aggregation share request: lists differ in length")
    return NeighbourKeys({p: KeyAdvert(e, m, c) for p, e, m, c in zip(peers, enc, mask, com, strict=True)})


def sealed_content(stage: Stage, round_id: bytes, shares: SealedShares, key: str) -> RecordDict:
    """``key`` is ``dsts`` (share reply: recipients) or ``srcs`` (mask request: senders)."""
    peers = sorted(shares.sealed)
    return RecordDict({RECORD: _base(stage, round_id,
                                     **{key: peers, "sealed": [shares.sealed[p] for p in peers]})})


def sealed_from(content: RecordDict, key: str) -> SealedShares:
    cfg = content[RECORD]
    peers, sealed = _ints(cfg, key), _bytes_list(cfg, "sealed")
    if len(peers) != len(sealed) or len(set(peers)) != len(peers):
        raise ValidationError("secure aggregation: sealed shares do not match their peers")
    return SealedShares(dict(zip(peers, sealed, strict=True)))


# -- mask


def masked_content(round_id: bytes, masked: MaskedInput) -> RecordDict:
    return RecordDict({RECORD: _base(Stage.MASK, round_id),
                       MASKED: ArrayRecord({"y": Array(np.ascontiguousarray(masked.vector))})})


def masked_from(content: RecordDict) -> MaskedInput:
    rec = content.get(MASKED)
    if not isinstance(rec, ArrayRecord) or "y" not in rec:
        raise ValidationError("secure aggregation: masked reply without its vector")
    return MaskedInput(rec["y"].numpy())


# -- unmask


def unmask_content(round_id: bytes, req: UnmaskRequest) -> RecordDict:
    return RecordDict({RECORD: _base(Stage.UNMASK, round_id, survivors=list(req.survivors), dropped=list(req.dropped))})


def unmask_from(content: RecordDict) -> UnmaskRequest:
    cfg = content[RECORD]
    return UnmaskRequest(tuple(_ints(cfg, "survivors")), tuple(_ints(cfg, "dropped")))


def shares_content(round_id: bytes, shares: UnmaskShares) -> RecordDict:
    b, s = sorted(shares.self_mask), sorted(shares.mask_key)
    return RecordDict({RECORD: _base(Stage.UNMASK, round_id,
                                     b_owners=b, b_shares=[shares.self_mask[v] for v in b],
                                     s_owners=s, s_shares=[shares.mask_key[v] for v in s])})


def shares_from(content: RecordDict) -> UnmaskShares:
    cfg = content[RECORD]
    b, bs, s, ss = _ints(cfg, "b_owners"), _bytes_list(cfg, "b_shares"), _ints(cfg, "s_owners"), _bytes_list(cfg, "s_shares")
    if len(b) != len(bs) or len(s) != len(ss):
        raise ValidationError("secure aggregation unmask reply: lists differ in length")
    return UnmaskShares(dict(zip(b, bs, strict=True)), dict(zip(s, ss, strict=True)))


__all__ = [
    "SCHEMA",
    "SECAGG_ACTION",
    "SECAGG_MESSAGE_TYPE",
    "Header",
    "Setup",
    "Stage",
    "Status",
    "advert_content",
    "advert_from",
    "header",
    "is_secagg",
    "keys_content",
    "keys_from",
    "masked_content",
    "masked_from",
    "reply_status",
    "sealed_content",
    "sealed_from",
    "setup_content",
    "setup_from",
    "shares_content",
    "shares_from",
    "unmask_content",
    "unmask_from",
]
