"""Client middleware: secure aggregation around the agent's unchanged train handler.

``secagg_mod(msg, context, call_next)`` answers the five stages of ``train.secagg`` messages
(see :mod:`hyprstream.privacy.secagg_messages`); any other message passes straight to ``call_next``.

* **setup**: passes the embedded train request to the wrapped handler (``call_next``), takes the
  delta from its reply, clips / weights / (noises) / quantizes it (:func:`~hyprstream.privacy.contribution.encode`),
  makes the round's keys and answers with the public keys only. The delta, the loss and
  ``num_examples`` never leave the device in the clear. A ``declined`` train reply (budget, no data)
  becomes a ``declined`` setup reply with the same reason.
* **hold** (buffered rounds): passes the embedded train request to the wrapped handler and keeps the
  reply in ``context.state`` under the dispatch's hold id (``hyprstream.secagg.held``, one at a time),
  answering only that it is ready. A later **setup** that names the hold id encodes that delta, times
  the setup's public weight, instead of training.
* **share / mask / consistency / unmask**: one step each of :class:`~hyprstream.privacy.secagg.SecAggClient`.

The device's secure-aggregation identity (:mod:`~hyprstream.privacy.identity`) comes from
``make_secagg_mod(identity=...)`` or from the node config: ``secagg-identity-key``,
``secagg-identity-cert`` and ``secagg-ca`` (PEM paths, all three or none; a SuperNode's
``--node-config``). Without one the client signs with a per-round key the fog relays (uncertified).

Between messages the client's state (keys, self-mask seed, held shares, encoded input) lives in
``context.state`` -- in memory on a SuperNode, as Flower's own SecAgg+ mod keeps it -- and is
erased after the unmask stage or when a step is refused. A certified identity's static X25519
agreements with its neighbours (fixed while both keys are) stay there across the rounds of a run
(``hyprstream.secagg.pairs``, at most ``PAIRS_KEPT``), so a device agrees with each neighbour's
identity once, not once per round.

Wiring (the agent's ClientApp)::

    app.train(SECAGG_ACTION, mods=[secagg_mod])(train)   # the same handler as train.layerwise
"""

from __future__ import annotations

import logging
from copy import copy

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from hyprstream.errors import HyprstreamError, ValidationError
from hyprstream.privacy import secagg_messages as wire
from hyprstream.privacy.contribution import encode
from hyprstream.privacy.identity import DeviceIdentity, pairs_from_bytes, pairs_to_bytes
from hyprstream.privacy.noise import RandomSource, SecureRandom, SeededRandom
from hyprstream.privacy.secagg import SecAggClient
from hyprstream.privacy.secagg_messages import Stage, Status
from hyprstream.protocol import ReplyStatus, TrainReply, train_seed

log = logging.getLogger("hyprstream.privacy")

STATE = "hyprstream.secagg"
INPUT = "hyprstream.secagg.input"
HELD = "hyprstream.secagg.held"  # buffered rounds: the delta trained for a dispatch, until its cohort's setup
PAIRS = "hyprstream.secagg.pairs"  # the device identity's static agreements, kept across rounds


IDENTITY_KEYS = ("secagg-identity-key", "secagg-identity-cert", "secagg-ca")  # node-config keys


def make_secagg_mod(*, secure: bool = True, identity: DeviceIdentity | None = None):
    """The middleware. ``secure=False`` seeds stochastic rounding and distributed noise from the
    request's seed (reproducible simulations only); keys and masks always come from the OS CSPRNG.
    ``identity``: the device's certified identity (default: the node config's, if any)."""

    def secagg_mod(msg: Message, context: Context, call_next) -> Message:
        if not wire.is_secagg(msg.content):
            return call_next(msg, context)
        stage, round_id = Stage.SETUP, b"\x00" * 16
        try:
            h = wire.header(msg.content)
            stage, round_id = h.stage, h.round_id
            device = identity if identity is not None else _configured_identity(context)
            content = _STAGES[h.stage](msg, context, call_next, h.round_id, secure, device)
        except HyprstreamError as exc:
            _clear(context)
            log.warning("secure aggregation %s refused: %s", stage.value, exc)
            content = wire.reply_status(stage, round_id, Status.REFUSED, str(exc))
        return Message(content, reply_to=msg)

    return secagg_mod


secagg_mod = make_secagg_mod()

_loaded: dict[tuple[str, ...], DeviceIdentity] = {}


def _configured_identity(context: Context) -> DeviceIdentity | None:
    paths = tuple(str(context.node_config.get(k, "")) for k in IDENTITY_KEYS)
    if not any(paths):
        return None
    if not all(paths):
        raise ValidationError(f"node config: {', '.join(IDENTITY_KEYS)} are set together or not at all")
    if paths not in _loaded:
        _loaded[paths] = DeviceIdentity.load(*paths)
    return _loaded[paths]


def _source(secure: bool, seed: int, index: int) -> RandomSource:
    return SecureRandom() if secure else SeededRandom(train_seed(seed, 0, index))


def _setup(msg: Message, context: Context, call_next, round_id: bytes, secure: bool,
           identity: DeviceIdentity | None) -> RecordDict:
    _clear(context)  # a new round replaces any abandoned one
    setup, train_content = wire.setup_from(msg.content)
    if setup.held:  # a buffered cohort: the delta this device trained and held for it
        train, config = _take_held(context, setup.hold_id)
    else:
        train, config = _train(msg, context, call_next, train_content)
        if train.status is ReplyStatus.DECLINED:
            return wire.reply_status(Stage.SETUP, round_id, Status.DECLINED, train.reason)
    asked = tuple(config.get("layers", ()))
    trained = None
    if tuple(train.layers) != asked:  # a device in its hybrid strategy trains fewer layer groups
        if not train.layers or not set(train.layers) <= set(asked):
            raise ValidationError(f"this device trained {list(train.layers)}, the round asked for {list(asked)}")
        if setup.spec.n_groups != len(asked):
            return wire.reply_status(Stage.SETUP, round_id, Status.DECLINED,
                                     f"this round sums the layer groups {list(asked)} as one; "
                                     f"this device trained {list(train.layers)}")
        trained = [asked.index(layer) for layer in train.layers]  # zeros for the others, weight 0 there
    seed = config.get("seed", 0)
    encoded = encode(train.delta, train.num_examples, setup.spec, _source(secure, int(seed), setup.index),
                     trained, scale=setup.weight)
    client = SecAggClient(round_id, setup.index, setup.neighbours, setup.threshold, setup.spec.dim,
                          setup.spec.quantizer.dtype, identity)
    advert = client.advertise()
    _save(context, client)
    # the raw field elements (dtype and length are the client's): no npy framing to write and parse
    context.state[INPUT] = ConfigRecord({"x": encoded.vector.tobytes()})
    return wire.advert_content(round_id, advert)


def _train(msg: Message, context: Context, call_next, train_content: RecordDict) -> tuple[TrainReply, ConfigRecord]:
    """The agent's train handler's reply to the embedded request, checked against it, and the request's config."""
    reply = call_next(Message(content=train_content, metadata=copy(msg.metadata)), context)
    if reply.has_error():
        raise ValidationError(f"training failed: {reply.error.reason}")
    train = TrainReply.from_content(reply.content)
    config = train_content.get("config")
    config = config if isinstance(config, ConfigRecord) else ConfigRecord()
    if train.status is not ReplyStatus.DECLINED and train.model_version != config.get("model_version"):
        raise ValidationError(f"trained version {train.model_version}, requested {config.get('model_version')}")
    return train, config


def _hold(msg: Message, context: Context, call_next, hold_id: bytes, secure: bool,
          identity: DeviceIdentity | None) -> RecordDict:
    """Buffered rounds: train now and keep the delta on the device (one at a time, under ``hold_id``) for
    the setup of the cohort it will be aggregated in; answer only that it is ready."""
    _, train_content = wire.hold_from(msg.content)
    train, config = _train(msg, context, call_next, train_content)
    if train.status is ReplyStatus.DECLINED:
        return wire.reply_status(Stage.HOLD, hold_id, Status.DECLINED, train.reason)
    _drop_held(context)
    reply = train.to_content()
    for key, record in reply.items():
        context.state[f"{HELD}.reply.{key}"] = record
    context.state[f"{HELD}.request"] = config
    context.state[HELD] = ConfigRecord({"id": hold_id, "records": list(reply.keys())})
    return wire.held_content(hold_id)


def _take_held(context: Context, hold_id: bytes) -> tuple[TrainReply, ConfigRecord]:
    """The held delta of dispatch ``hold_id``, taken off the device's state (it is encoded once)."""
    held = context.state.get(HELD)
    if not isinstance(held, ConfigRecord) or held.get("id") != hold_id:
        raise ValidationError("no delta held for this cohort's dispatch")
    try:
        reply = RecordDict({key: context.state[f"{HELD}.reply.{key}"] for key in held["records"]})
        config = context.state[f"{HELD}.request"]
    finally:
        _drop_held(context)
    return TrainReply.from_content(reply), config


def _drop_held(context: Context) -> None:
    for key in [k for k in context.state.keys() if k == HELD or k.startswith(f"{HELD}.")]:
        del context.state[key]


def _load(context: Context, round_id: bytes, identity: DeviceIdentity | None) -> SecAggClient:
    state = context.state.get(STATE)
    if not isinstance(state, ConfigRecord) or not isinstance(state.get("client"), bytes):
        raise ValidationError("no secure-aggregation round in progress")
    client = SecAggClient.from_bytes(state["client"], identity)
    if client.round_id != round_id:
        raise ValidationError("message for another secure-aggregation round")
    return client


def _save(context: Context, client: SecAggClient) -> None:
    context.state[STATE] = ConfigRecord({"client": client.to_bytes()})


def _clear(context: Context) -> None:
    for key in (STATE, INPUT):
        if key in context.state:
            del context.state[key]


def _share(msg: Message, context: Context, call_next, round_id: bytes, secure: bool,
           identity: DeviceIdentity | None) -> RecordDict:
    client = _load(context, round_id, identity)
    stored = context.state.get(PAIRS)
    blob = stored.get("pairs") if isinstance(stored, ConfigRecord) else None
    known = pairs_from_bytes(client.identity, blob) if isinstance(blob, bytes) else {}
    sealed = client.share(wire.keys_from(msg.content), known)
    _save(context, client)
    if known:  # a certified identity's static agreements, for the next rounds (they outlive this round's state)
        context.state[PAIRS] = ConfigRecord({"pairs": pairs_to_bytes(client.identity, known)})
    return wire.sealed_content(Stage.SHARE, round_id, sealed, "dsts")


def _mask(msg: Message, context: Context, call_next, round_id: bytes, secure: bool,
          identity: DeviceIdentity | None) -> RecordDict:
    client = _load(context, round_id, identity)
    stored = context.state.get(INPUT)
    raw = stored.get("x") if isinstance(stored, ConfigRecord) else None
    if not isinstance(raw, bytes) or len(raw) != client.dim * client.dtype.itemsize:
        raise ValidationError("no encoded input for this round")
    masked = client.mask(wire.sealed_from(msg.content, "srcs"), np.frombuffer(raw, dtype=client.dtype))
    _save(context, client)
    del context.state[INPUT]  # the plain encoded input is not kept past masking
    return wire.masked_content(round_id, masked)


def _consistency(msg: Message, context: Context, call_next, round_id: bytes, secure: bool,
                 identity: DeviceIdentity | None) -> RecordDict:
    client = _load(context, round_id, identity)
    tags = client.confirm_survivors(wire.survivors_from(msg.content))
    _save(context, client)
    return wire.confirmation_content(round_id, tags)


def _unmask(msg: Message, context: Context, call_next, round_id: bytes, secure: bool,
            identity: DeviceIdentity | None) -> RecordDict:
    client = _load(context, round_id, identity)
    try:
        shares = client.unmask(wire.unmask_from(msg.content))
    finally:
        _clear(context)
    return wire.shares_content(round_id, shares)


_STAGES = {Stage.SETUP: _setup, Stage.SHARE: _share, Stage.MASK: _mask, Stage.CONSISTENCY: _consistency,
           Stage.UNMASK: _unmask, Stage.HOLD: _hold}

__all__ = ["HELD", "IDENTITY_KEYS", "INPUT", "PAIRS", "STATE", "make_secagg_mod", "secagg_mod"]
