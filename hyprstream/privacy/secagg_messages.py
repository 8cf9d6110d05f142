"""Wire format of secure aggregation over Flower's Message API: the one place records are converted.

Every stage is a message of type ``train.secagg`` (:data:`SECAGG_MESSAGE_TYPE`). Its content holds a
``ConfigRecord`` under ``"secagg"`` with one bytes entry, ``"msg"``: a 40-byte header -- the schema
``hyprstream.secagg/7`` and a newline (20 bytes), the stage (1 byte), the status (1 byte), two zero
bytes, the round id (16 bytes) -- and then the stage's fields packed in a compact binary layout
(below); a reply that is not ``ok`` (``declined`` / ``refused``) carries its reason (UTF-8) there
instead. One entry per message whatever the neighbourhood size: per-neighbour keys, ciphertexts and
shares as record entries would be hundreds of small values, each checked, converted and copied by
Flower's record and protobuf layers. The header's size keeps the masked vector 8-byte aligned.

Body layouts (big-endian; ``ints`` is a u32 count and that many u32; ``table`` is a u32 count ``n``,
a u32 item size ``s``, ``n`` u32 indices and then the ``n`` items of ``s`` bytes back to back):

========  ================================================  ============================================
stage     fog -> client                                     client -> fog
========  ================================================  ============================================
hold      buffered rounds: the train request (as in         ``ok`` with no body (the delta stays on the
          protocol.py); the header's round id is the        device under the hold id), or ``declined``
          hold id of this dispatch                          with the agent's reason
setup     the train request (``weights``, ``config``, as    enc key (32) | mask key (32) | commitment
          in protocol.py; none for a held delta) + body:    (32) | u32 length and credential, or
          index, threshold, quantizer, clip, noise,         ``declined`` with the agent's reason; no
          flags, the input's public weight and the hold     delta, metrics or ``num_examples`` ever
          id, neighbours (``ints``), layout names, dims,
          ranks and each parameter's layer group (``ints``)
share     neighbours' adverts: ``ints`` peers, per peer     ``table`` of sealed shares, indexed by
          enc key | mask key | commitment (96 bytes),       recipient
          then per peer a u32 length and its credential
mask      ``table`` of sealed shares, indexed by sender     the masked field vector: raw little-endian
                                                            elements of the round's dtype
consist.  ``ints`` the survivor set U3                      ``table`` of MACs of U3 (32 bytes each),
                                                            indexed by the neighbour each is for
unmask    ``table`` of neighbours' MACs of U3 for the       ``table`` of b shares by owner, then
          recipient, indexed by neighbour                   ``table`` of s-key shares by owner
========  ================================================  ============================================

Every parser checks lengths and counts exactly (truncated or trailing bytes, mismatched counts,
repeated indices raise :class:`~hyprstream.errors.ValidationError` naming the message).

A separate message type (not ``train.layerwise``) is deliberate: an agent without the secure
aggregation middleware has no handler for it and fails the message instead of training and
answering with a plaintext delta.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from hyprstream.errors import ValidationError
from hyprstream.privacy.clipping import Layout
from hyprstream.privacy.contribution import InputSpec
from hyprstream.privacy.quantize import Quantizer
from hyprstream.privacy.secagg import (
    ROUND_ID_BYTES,
    KeyAdvert,
    MaskedInput,
    NeighbourKeys,
    TAG_BYTES,
    SealedShares,
    UnmaskRequest,
    UnmaskShares,
)

SECAGG_ACTION = "secagg"
SECAGG_MESSAGE_TYPE = f"train.{SECAGG_ACTION}"
SCHEMA = "hyprstream.secagg/7"
RECORD = "secagg"
FIELD = "msg"
KEY_BYTES = 32  # X25519 public keys and SHA-256 commitments
_ADVERT = 3 * KEY_BYTES
# index, threshold, bits, scale, bound, max_terms, clip, sigma, flags, max_weight, weight, hold id
_SETUP = struct.Struct(f">IIIdQQddBdd{ROUND_ID_BYTES}s")
_WEIGHTED, _FIXED, _HELD = 1, 2, 4  # setup flags: weighted by examples, fixed denominator, a held delta


class Stage(enum.Enum):
    SETUP = "setup"
    SHARE = "share"
    MASK = "mask"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    HOLD = "hold"  # buffered rounds: train now, keep the delta on the device for a later cohort's setup


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
    weight: float = 1.0  # the public factor of this client's input (a buffered cohort's staleness weight)
    hold_id: bytes = b""  # a buffered cohort: the dispatch whose held delta is the input (no train request)

    def __post_init__(self) -> None:
        if not (0 < self.weight <= 1):
            raise ValidationError(f"secure aggregation setup: the input's weight must be in (0, 1], got {self.weight}")
        if self.hold_id and len(self.hold_id) != ROUND_ID_BYTES:
            raise ValidationError("secure aggregation setup: bad hold id")

    @property
    def held(self) -> bool:
        return bool(self.hold_id)


@dataclass(frozen=True)
class Header:
    stage: Stage
    round_id: bytes
    status: Status = Status.OK
    reason: str = ""


# -- binary bodies


def _ints(values: Sequence[int]) -> bytes:
    return struct.pack(f">I{len(values)}I", len(values), *values)


def _table(items: Mapping[int, bytes]) -> bytes:
    """``items`` (index -> bytes of one length) as count, item size, sorted indices, items."""
    keys = sorted(items)
    values = [items[k] for k in keys]
    size = len(values[0]) if values else 0
    if any(len(v) != size for v in values):
        raise ValidationError("secure aggregation: items of one message differ in length")
    return b"".join([struct.pack(f">II{len(keys)}I", len(keys), size, *keys), *values])


class _Reader:
    """Sequential, bounds-checked reads of a body; every error is a ValidationError naming the message."""

    def __init__(self, body: bytes, what: str) -> None:
        self.body = body
        self.pos = 0
        self.what = what

    def fail(self, problem: str) -> ValidationError:
        return ValidationError(f"secure aggregation {self.what}: {problem}")

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.body):
            raise self.fail("truncated message")
        out = self.body[self.pos:end]
        self.pos = end
        return out

    def unpack(self, fmt: struct.Struct) -> tuple:
        return fmt.unpack(self.take(fmt.size))

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def ints(self, unique: bool = True) -> list[int]:
        n = self.u32()
        values = list(struct.unpack(f">{n}I", self.take(4 * n)))
        if unique and len(set(values)) != n:
            raise self.fail("repeated client index")
        return values

    def items(self, n: int, size: int) -> list[bytes]:
        raw = self.take(n * size)
        return [raw[i:i + size] for i in range(0, n * size, size)] if size else [b""] * n

    def table(self) -> dict[int, bytes]:
        n, size = self.u32(), self.u32()
        keys = list(struct.unpack(f">{n}I", self.take(4 * n)))
        if len(set(keys)) != n:
            raise self.fail("repeated client index")
        return dict(zip(keys, self.items(n, size), strict=True))

    def text(self) -> str:
        try:
            return self.take(self.u32()).decode()
        except UnicodeDecodeError:
            raise self.fail("text is not UTF-8") from None

    def done(self) -> None:
        if self.pos != len(self.body):
            raise self.fail(f"{len(self.body) - self.pos} trailing byte(s)")


_MAGIC = SCHEMA.encode() + b"\n"
_HEAD = struct.Struct(f">{len(_MAGIC)}sBB2x{ROUND_ID_BYTES}s")  # 40 bytes
_STAGE_CODE = {stage: i for i, stage in enumerate(Stage)}
_STATUS_CODE = {status: i for i, status in enumerate(Status)}
_STAGES = tuple(Stage)
_STATUSES = tuple(Status)


def _message(stage: Stage, round_id: bytes, parts: Sequence[bytes], status: Status = Status.OK) -> ConfigRecord:
    if len(round_id) != ROUND_ID_BYTES:
        raise ValidationError("secure aggregation message: bad round id")
    head = _HEAD.pack(_MAGIC, _STAGE_CODE[stage], _STATUS_CODE[status], round_id)
    return ConfigRecord({FIELD: b"".join([head, *parts])})


def _content(stage: Stage, round_id: bytes, *parts: bytes) -> RecordDict:
    return RecordDict({RECORD: _message(stage, round_id, parts)})


def _raw(content: RecordDict) -> bytes:
    cfg = content.get(RECORD)
    raw = cfg.get(FIELD) if isinstance(cfg, ConfigRecord) else None
    if not isinstance(raw, bytes) or len(raw) < _HEAD.size or raw[:len(_MAGIC)] != _MAGIC:
        raise ValidationError(f"not a {SCHEMA} message")
    return raw


def _body(content: RecordDict, what: str) -> _Reader:
    r = _Reader(_raw(content), what)
    r.pos = _HEAD.size
    return r


def header(content: RecordDict) -> Header:
    """Stage, round and status of any secure-aggregation message; ValidationError if it is not one."""
    raw = _raw(content)
    _, stage, status, rid = _HEAD.unpack_from(raw)
    if stage >= len(_STAGES) or status >= len(_STATUSES):
        raise ValidationError(f"secure aggregation message: unknown stage {stage} or status {status}")
    status = _STATUSES[status]
    reason = "" if status is Status.OK else raw[_HEAD.size:].decode("utf-8", "replace")
    return Header(_STAGES[stage], rid, status, reason)


def is_secagg(content: RecordDict) -> bool:
    return isinstance(content.get(RECORD), ConfigRecord)


def reply_status(stage: Stage, round_id: bytes, status: Status, reason: str) -> RecordDict:
    return RecordDict({RECORD: _message(stage, round_id, [reason.encode()], status)})


# -- setup


def setup_content(train_content: RecordDict, setup: Setup) -> RecordDict:
    """A setup message: with the train request's content, or (``setup.held``, ``train_content`` empty) for the
    delta the client trained and held for a buffered cohort."""
    spec, q = setup.spec, setup.spec.quantizer
    dims, ranks = spec.layout.wire_shapes()
    names = [n.encode() for n in spec.layout.names]
    flags = (_WEIGHTED if spec.weighted else 0) | (_FIXED if spec.fixed_denominator else 0) | \
        (_HELD if setup.held else 0)
    body = b"".join([
        _SETUP.pack(setup.index, setup.threshold, q.bits, q.scale, q.bound, q.max_terms, spec.clip,
                    spec.noise_sigma, flags, spec.max_weight, setup.weight,
                    setup.hold_id or bytes(ROUND_ID_BYTES)),
        _ints(setup.neighbours), struct.pack(">I", len(names)),
        *(struct.pack(">I", len(n)) + n for n in names),
        struct.pack(f">I{len(dims)}Q", len(dims), *dims), _ints(ranks), _ints(spec.groups)])
    content = RecordDict(dict(train_content.items()))
    content[RECORD] = _message(Stage.SETUP, setup.round_id, [body])
    return content


def setup_from(content: RecordDict) -> tuple[Setup, RecordDict]:
    """The setup and the train request's content (without the secure-aggregation record)."""
    h = header(content)
    if h.stage is not Stage.SETUP:
        raise ValidationError(f"expected a setup message, got {h.stage.value}")
    r = _body(content, "setup")
    index, threshold, bits, scale, bound, max_terms, clip, sigma, flags, max_weight, weight, hold_id = \
        r.unpack(_SETUP)
    neighbours = tuple(r.ints())
    names = [r.text() for _ in range(r.u32())]
    n = r.u32()
    dims = list(struct.unpack(f">{n}Q", r.take(8 * n)))
    ranks = r.ints(unique=False)
    groups = tuple(r.ints(unique=False))
    r.done()
    # bit 0: weighted by examples; bit 1: a fixed denominator (client-level DP); bit 2: a held delta
    if flags & ~(_WEIGHTED | _FIXED | _HELD) or flags & (_WEIGHTED | _FIXED) == _WEIGHTED | _FIXED:
        raise r.fail("bad flags")
    try:
        q = Quantizer(bits=bits, scale=scale, bound=bound, max_terms=max_terms)
        layout = Layout.from_wire(tuple(names), dims, ranks)
        spec = InputSpec(layout, clip, q, noise_sigma=sigma, weighted=bool(flags & _WEIGHTED), max_weight=max_weight,
                         groups=groups, fixed_denominator=bool(flags & _FIXED))
    except ValueError as exc:
        raise ValidationError(f"secure aggregation setup: {exc}") from None
    setup = Setup(h.round_id, index, neighbours, threshold, spec, weight,
                  hold_id if flags & _HELD else b"")
    train = RecordDict({k: v for k, v in content.items() if k != RECORD})
    if setup.held and train:
        raise r.fail("a setup for a held delta carries no train request")
    return setup, train


# -- hold (buffered rounds)


def hold_content(train_content: RecordDict, hold_id: bytes) -> RecordDict:
    """A buffered dispatch: the train request, whose delta the client keeps (under ``hold_id``) for the
    setup of the cohort it will be aggregated in."""
    content = RecordDict(dict(train_content.items()))
    content[RECORD] = _message(Stage.HOLD, hold_id, [])
    return content


def hold_from(content: RecordDict) -> tuple[bytes, RecordDict]:
    """The hold id and the train request's content of a hold message."""
    h = header(content)
    if h.stage is not Stage.HOLD:
        raise ValidationError(f"expected a hold message, got {h.stage.value}")
    _body(content, "hold").done()
    return h.round_id, RecordDict({k: v for k, v in content.items() if k != RECORD})


def held_content(hold_id: bytes) -> RecordDict:
    """The client's answer to a hold message: trained, the delta kept (nothing of it, its loss or its
    ``num_examples`` is sent)."""
    return _content(Stage.HOLD, hold_id)


def _check_advert(advert: KeyAdvert) -> None:
    if not len(advert.enc_key) == len(advert.mask_key) == len(advert.commitment) == KEY_BYTES:
        raise ValidationError("secure aggregation: public keys and commitments are 32 bytes")


def advert_content(round_id: bytes, advert: KeyAdvert) -> RecordDict:
    _check_advert(advert)
    return _content(Stage.SETUP, round_id, advert.enc_key, advert.mask_key, advert.commitment,
                    struct.pack(">I", len(advert.credential)), advert.credential)


def advert_from(content: RecordDict) -> KeyAdvert:
    r = _body(content, "key advert")
    keys = r.items(3, KEY_BYTES)
    advert = KeyAdvert(*keys, r.take(r.u32()))
    r.done()
    return advert


# -- share


def keys_content(round_id: bytes, keys: NeighbourKeys) -> RecordDict:
    peers = sorted(keys.adverts)
    adverts = [keys.adverts[p] for p in peers]
    for a in adverts:
        _check_advert(a)
    return _content(Stage.SHARE, round_id, _ints(peers),
                    *(a.enc_key + a.mask_key + a.commitment for a in adverts),
                    *(struct.pack(">I", len(a.credential)) + a.credential for a in adverts))


def keys_from(content: RecordDict) -> NeighbourKeys:
    r = _body(content, "share request")
    peers = r.ints()
    raw = r.take(_ADVERT * len(peers))
    credentials = [r.take(r.u32()) for _ in peers]
    r.done()
    k = KEY_BYTES
    return NeighbourKeys({p: KeyAdvert(raw[o:o + k], raw[o + k:o + 2 * k], raw[o + 2 * k:o + _ADVERT], cred)
                          for p, o, cred in zip(peers, range(0, len(raw), _ADVERT), credentials, strict=True)})


def sealed_content(stage: Stage, round_id: bytes, shares: SealedShares, key: str = "") -> RecordDict:
    """Sealed shares, indexed by recipient (share reply) or by sender (mask request); ``key`` is kept
    for callers naming the direction (``dsts`` / ``srcs``) and does not change the layout."""
    return _content(stage, round_id, _table(shares.sealed))


def sealed_from(content: RecordDict, key: str = "") -> SealedShares:
    r = _body(content, "sealed shares")
    sealed = r.table()
    r.done()
    return SealedShares(sealed)


# -- mask


def masked_content(round_id: bytes, masked: MaskedInput) -> RecordDict:
    y = np.asarray(masked.vector)
    y = np.ascontiguousarray(y.astype(y.dtype.newbyteorder("<"), copy=False))
    return _content(Stage.MASK, round_id, memoryview(y).cast("B"))  # one copy, into the message


def masked_from(content: RecordDict, dtype: np.dtype) -> MaskedInput:
    """The masked vector, read as the round's field ``dtype`` (the fog checks its length)."""
    r = _body(content, "masked input")
    dtype = np.dtype(dtype)
    size = len(r.body) - r.pos
    if size % dtype.itemsize:
        raise r.fail(f"{size} bytes are not a vector of {dtype}")
    y = np.frombuffer(r.body, dtype=dtype.newbyteorder("<"), offset=r.pos)
    return MaskedInput(y.astype(dtype, copy=False))


# -- consistency


def survivors_content(round_id: bytes, survivors: Sequence[int]) -> RecordDict:
    return _content(Stage.CONSISTENCY, round_id, _ints(survivors))


def survivors_from(content: RecordDict) -> tuple[int, ...]:
    r = _body(content, "survivor set")
    survivors = tuple(r.ints())
    r.done()
    return survivors


def _tags(r: _Reader) -> dict[int, bytes]:
    tags = r.table()
    r.done()
    if any(len(t) != TAG_BYTES for t in tags.values()):
        raise r.fail(f"a MAC is not {TAG_BYTES} bytes")
    return tags


def confirmation_content(round_id: bytes, tags: Mapping[int, bytes]) -> RecordDict:
    """A client's MACs of the survivor set, one per neighbour it is for."""
    if any(len(t) != TAG_BYTES for t in tags.values()):
        raise ValidationError(f"secure aggregation: a MAC is {TAG_BYTES} bytes")
    return _content(Stage.CONSISTENCY, round_id, _table(tags))


def confirmation_from(content: RecordDict) -> dict[int, bytes]:
    return _tags(_body(content, "survivor confirmation"))


# -- unmask


def unmask_content(round_id: bytes, req: UnmaskRequest) -> RecordDict:
    return _content(Stage.UNMASK, round_id, _table(req.tags))


def unmask_from(content: RecordDict) -> UnmaskRequest:
    return UnmaskRequest(_tags(_body(content, "unmask request")))


def shares_content(round_id: bytes, shares: UnmaskShares) -> RecordDict:
    return _content(Stage.UNMASK, round_id, _table(shares.self_mask), _table(shares.mask_key))


def shares_from(content: RecordDict) -> UnmaskShares:
    r = _body(content, "unmask reply")
    b, s = r.table(), r.table()
    r.done()
    return UnmaskShares(b, s)


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
    "confirmation_content",
    "confirmation_from",
    "header",
    "held_content",
    "hold_content",
    "hold_from",
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
    "survivors_content",
    "survivors_from",
    "unmask_content",
    "unmask_from",
]
