"""Secure aggregation at the fog over a Flower Grid (Message API), as a wrapper of the fog's round.

:class:`SecureFogAggregator` wraps a :class:`~hyprstream.fog.aggregator.FogAggregator` and offers its
interface (``start_round`` / ``finish_round`` / ``run_round`` returning a ``FogRound``), but a round
runs the SecAgg+ stages (:mod:`hyprstream.privacy.secagg`) instead of collecting plaintext deltas:

1. ``start_round`` (optionally Poisson-samples the agents, checks the model's client-level budget)
   sends each agent a ``train.secagg`` *setup* message: the usual train request plus its index,
   neighbours, threshold and the encoding (quantizer sized from the clip bound and the client count,
   the round's layer layout, the distributed-noise scale).
2. ``finish_round`` collects the public keys (the agents train meanwhile; the plan's timeout), then
   runs *share*, *mask*, *consistency* and *unmask*, each under ``stage_timeout_s``: a client that is late or
   silent is treated as dropped, never waited on.
3. The unmasked sum is decoded, turned into the round's mean -- with client-level DP: central noise,
   or checked distributed noise, over a fixed denominator (:class:`~hyprstream.privacy.client_dp.ClientDP`)
   -- and pushed to core with the privacy spend and the transcript's SHA-256. The spend is charged
   to the model's ledger before the push and bound to the version core returns.

The fog never holds an individual update: setup replies carry keys, share replies sealed shares,
mask replies masked vectors (added into a running sum as they arrive), unmask replies Shamir shares.
A stage that cannot complete aborts the round with nothing released (``version`` None and the reason).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from hyprstream.errors import HyprstreamError, ValidationError
from hyprstream.fog.aggregator import WrappedFog
from hyprstream.fog.dp import ClientDpRounds
from hyprstream.fog.selection import Sampling
from hyprstream.privacy import secagg_messages as wire
from hyprstream.privacy.client_dp import ClientDP, NoisePlacement
from hyprstream.privacy.clipping import Layout
from hyprstream.privacy.config import BUFFERED_CLIENT_DP, ClientDpConfig, SecAggConfig, Weighting
from hyprstream.privacy.contribution import InputSpec, decode, group_means
from hyprstream.privacy.errors import PrivacyViolation, SecAggAborted
from hyprstream.privacy.ledger import Entry, PrivacyLedger
from hyprstream.privacy.noise import RandomSource, SecureRandom
from hyprstream.privacy.quantize import Quantizer
from hyprstream.privacy.secagg import SecAggServer, SecAggSum, new_round_id, plan_graph
from hyprstream.privacy.secagg_messages import Stage, Status
from hyprstream.store import layer_table as lt

log = logging.getLogger("hyprstream.privacy")

INT8_FIELD_BITS = 16  # the field of a secure round whose fog asks for int8 updates


@dataclass
class PendingSecureRound:
    round: int
    base: object  # Snapshot
    layers: tuple[str, ...]
    nodes: tuple[int, ...]  # agents asked to train (after sampling), index i + 1 in the protocol
    group_id: str
    started: float
    round_id: bytes = b""
    spec: InputSpec | None = None
    server: SecAggServer | None = None
    message_ids: set[str] = field(default_factory=set)
    bytes_down: int = 0
    aborted: str = ""  # why the round did not start
    expected: float = 0.0  # client-level DP: the expected participants, the mean's fixed denominator
    weights: dict[int, float] = field(default_factory=dict)  # a buffered cohort: each index's public weight


@dataclass(frozen=True)
class SecureRoundInfo:
    """What a secure round adds to its ``FogRound`` (for metrics, telemetry and the audit)."""

    round_id: str
    degree: int
    threshold: int
    survivors: tuple[int, ...]  # node IDs whose input is in the sum
    dropped_before_masking: tuple[int, ...]
    dropped_after_masking: tuple[int, ...]
    transcript_sha256: str
    privacy: Entry | None
    stage_seconds: Mapping[str, float]


class HoldRefused(ValidationError):
    """An agent refused a buffered dispatch (its training failed: it holds no delta)."""


class SecureFogAggregator(WrappedFog):
    """A :class:`FogAggregator` whose rounds aggregate securely (and, configured, with client-level DP)."""

    def __init__(self, fog, secagg: SecAggConfig, client_dp: ClientDpConfig | None = None, *,
                 ledger: PrivacyLedger | None = None, source: RandomSource | None = None,
                 poll_s: float = 0.02, clock: Callable[[], float] = time.monotonic) -> None:
        if client_dp is not None and secagg.weighting is Weighting.EXAMPLES:
            raise ValidationError("client-level DP needs uniform weighting")
        self.fog = fog
        self.secagg = secagg
        self.client_dp = client_dp
        self.ledger = ledger
        self.source = source or SecureRandom()
        self.poll_s = poll_s
        self.clock = clock
        self.last: SecureRoundInfo | None = None
        # client-level DP's sample, budget, charge and privacy record (over the secure sum)
        self.dp_rounds = (ClientDpRounds(fog, client_dp, secagg.clip, ledger=ledger, source=self.source)
                          if client_dp is not None else None)

    @property
    def field_bits(self) -> int:
        """The width of the round's field: ``[privacy.secagg] field_bits``, or 16 when the fog's rounds ask for
        int8 updates. A masked vector then travels as 16-bit field elements (half the 32-bit field's bytes);
        each input gets ``(2**15 - 1) // n`` levels per sign for ``n`` clients (at least 8 bits of range for
        up to 128 clients per round), and a round whose layers are too many for that resolution under the clip
        does not start (the reason names it)."""
        return INT8_FIELD_BITS if self.fog.plan.update_encoding == "int8" else self.secagg.field_bits

    # ---------------------------------------------------------------------------------------- dp
    def _dp(self, expected: float) -> ClientDP | None:
        """Client-level DP of a round whose mean divides by ``expected`` (the expected number of participants,
        fixed before the sample is drawn), None without client-level DP."""
        return None if self.dp_rounds is None else self.dp_rounds.dp(expected)

    def _sample(self, nodes: tuple[int, ...], sampling: Sampling | None) -> tuple[tuple[int, ...], float]:
        """Client-level DP's Poisson sample of ``nodes`` and the mean's denominator
        (:meth:`ClientDpRounds.sample <hyprstream.fog.dp.ClientDpRounds.sample>`); without it every node."""
        if self.dp_rounds is None:
            return nodes, float(len(nodes))
        return self.dp_rounds.sample(nodes, sampling)

    def spent(self) -> float | None:
        """The model's client-level epsilon so far at the budget's delta (None without client-level DP)."""
        return None if self.dp_rounds is None else self.dp_rounds.spent()

    # ------------------------------------------------------------------------------------ round
    def start_round(self, round_no: int, base=None, nodes: Sequence[int] | None = None,
                    sampling: Sampling | None = None) -> PendingSecureRound:
        """Start round ``round_no`` over ``nodes`` (default: all the fog's agents); with client-level DP
        they are Poisson-sampled first, at ``client_sampling_rate`` or at the rates of a telemetry
        ``sampling`` (:func:`~hyprstream.fog.selection.inclusion_rates`, ``nodes`` then its agents)."""
        fog = self.fog
        pending = self.plan_round(round_no, base, nodes, sampling)
        if pending.aborted:
            return pending
        base, nodes = pending.base, pending.nodes
        weights = lt.to_arrays(base.table)
        index = {node: i for i, node in enumerate(fog.node_ids)}
        messages = []
        for i, node in enumerate(nodes, start=1):
            request = fog.train_request(base, pending.layers, round_no, index[node], weights, encoded=False)
            pending.bytes_down += request.payload_bytes()
            setup = wire.Setup(pending.round_id, i, pending.server.neighbours(i), pending.server.threshold,
                               pending.spec)
            messages.append(Message(wire.setup_content(request.to_content(), setup), dst_node_id=node,
                                    message_type=wire.SECAGG_MESSAGE_TYPE, group_id=pending.group_id))
        return self._send(pending, messages)

    def plan_round(self, round_no: int, base=None, nodes: Sequence[int] | None = None,
                   sampling: Sampling | None = None) -> PendingSecureRound:
        """Round ``round_no`` planned, nothing sent: its base (pulled when None), its agents after client-level
        DP's sample, the encoding and the protocol's server (``aborted`` says why it cannot start)."""
        base = base if base is not None else self.fog.pull()
        nodes = tuple(self.fog.node_ids if nodes is None else nodes)
        self._known(nodes)
        nodes, expected = self._sample(nodes, sampling)
        return self._plan(round_no, base, nodes, expected)

    def start_cohort(self, round_no: int, base, held: Mapping[int, tuple[bytes, float]]) -> PendingSecureRound:
        """A buffered fog's secure round over the agents that trained and hold a delta: ``held`` maps each
        agent to its hold id (:meth:`start_hold`) and the public weight of its input (its staleness weight, in
        (0, 1]); the released mean divides by the survivors' sum of weights. No train request is sent: each
        agent encodes the delta it holds. ``base``: the version the mean is pushed onto. With client-level DP the
        cohort's sum (each input clipped and times its weight) is released over the fixed denominator
        ``len(held)``, noised, and charged as a replace-one release (the rounds' ``replace_one`` must be set:
        :func:`hyprstream.fog.engine.buffered_privacy`)."""
        if self.dp_rounds is not None and not self.dp_rounds.replace_one:
            raise ValidationError(BUFFERED_CLIENT_DP)
        nodes = tuple(held)
        self._known(nodes)
        pending = self._plan(round_no, base, nodes, float(len(nodes)))
        if pending.aborted:
            return pending
        pending.weights = {i: float(held[node][1]) for i, node in enumerate(nodes, start=1)}
        messages = []
        for i, node in enumerate(nodes, start=1):
            hold_id, weight = held[node]
            setup = wire.Setup(pending.round_id, i, pending.server.neighbours(i), pending.server.threshold,
                               pending.spec, weight=weight, hold_id=hold_id)
            messages.append(Message(wire.setup_content(RecordDict(), setup), dst_node_id=node,
                                    message_type=wire.SECAGG_MESSAGE_TYPE, group_id=pending.group_id))
        return self._send(pending, messages)

    def start_hold(self, index: int, base, node: int) -> tuple[str, bytes, int]:
        """A buffered fog's dispatch ``index`` to ``node``: train on ``base`` and hold the delta for a later
        cohort (:meth:`start_cohort`). Returns the message id, the hold id and the request's payload bytes."""
        fog = self.fog
        self._known((node,))
        layers = fog.plan.layers or tuple(lt.layers_in(base.table))
        request = fog.train_request(base, layers, index, fog.node_ids.index(node), lt.to_arrays(base.table),
                                    encoded=False)
        hold_id = new_round_id()
        message = Message(wire.hold_content(request.to_content(), hold_id), dst_node_id=node,
                          message_type=wire.SECAGG_MESSAGE_TYPE, group_id=f"{fog.name}/dispatch-{index}")
        (message_id,) = self.grid.push_messages([message])
        return message_id, hold_id, request.payload_bytes()

    @staticmethod
    def held_reply(msg: Message, hold_id: bytes) -> str | None:
        """None when ``msg`` says the agent trained and holds the delta of ``hold_id``; else why it does not
        (an error, a decline with the agent's reason). ValidationError for a reply that is not one."""
        if msg.has_error():
            return f"error: {msg.error.reason}"
        h = wire.header(msg.content)
        if h.stage is not Stage.HOLD or h.round_id != hold_id:
            raise ValidationError(f"reply for another dispatch or stage ({h.stage.value})")
        if h.status is Status.DECLINED:
            return f"declined: {h.reason}"
        if h.status is Status.REFUSED:
            raise HoldRefused(f"client refused the hold: {h.reason}")
        return None

    def _known(self, nodes: Sequence[int]) -> None:
        unknown = set(nodes) - set(self.fog.node_ids)
        if unknown:
            raise ValidationError(f"fog {self.fog.name!r} has no agents {sorted(unknown)}")

    def _plan(self, round_no: int, base, nodes: tuple[int, ...], expected: float) -> PendingSecureRound:
        """The round's encoding (layout, quantizer, noise) and its SecAgg+ server; ``aborted`` says why a
        round cannot start (budget, too few agents, a grid too coarse, a release core would refuse)."""
        fog = self.fog
        layers = fog.plan.layers or tuple(lt.layers_in(base.table))
        pending = PendingSecureRound(round_no, base, layers, nodes, f"{fog.name}/round-{round_no}", self.clock(),
                                     expected=expected)
        dp = self._dp(expected)
        try:
            if self.dp_rounds is not None:
                self.dp_rounds.check_budget(f"round {round_no} of {fog.model}")
            if len(nodes) < self.secagg.min_clients:
                raise SecAggAborted(f"{len(nodes)} agent(s) selected, at least {self.secagg.min_clients} needed")
            trained = lt.select_layers(base.table, layers)
            names = trained.column("name").to_pylist()
            layout = Layout.of(dict(zip(names, (tuple(s) for s in trained.column("shape").to_pylist()), strict=True)))
            # each parameter's layer group, as an index into the request's layers: a device that trains
            # only some groups (hybrid) sends zeros and a zero weight for the others
            group = dict(zip(names, (layers.index(g) for g in trained.column("layer").to_pylist()), strict=True))
            groups = tuple(group[n] for n in layout.names) if len(layers) > 1 else ()
            if dp is not None:  # before any noise is drawn or charged: a release core would refuse is not made
                dp.check_bound(fog.core_bound, layout.size, f"round {round_no} of {fog.model}")
            quantizer = Quantizer.for_clients(clip=self.secagg.clip, max_clients=len(nodes), bits=self.field_bits,
                                              noise_std=dp.local_std() if dp else 0.0)
            spec = InputSpec(layout, self.secagg.clip, quantizer,
                             noise_sigma=dp.local_sigma(quantizer, layout.size) if dp else 0.0,
                             weighted=self.secagg.weighting is Weighting.EXAMPLES, max_weight=self.secagg.max_weight,
                             groups=groups, fixed_denominator=dp is not None)
            degree, threshold = plan_graph(len(nodes), threshold_fraction=self.secagg.threshold_fraction,
                                           expected_dropout=self.secagg.expected_dropout,
                                           degree=self.secagg.degree or None)
            min_survivors = self.secagg.min_clients
            if dp is not None and dp.placement is NoisePlacement.DISTRIBUTED:
                min_survivors = max(min_survivors, dp.min_clients)
            pending.round_id = new_round_id()
            pending.spec = spec
            pending.server = SecAggServer(len(nodes), degree=degree, threshold=threshold, dim=spec.dim,
                                          dtype=quantizer.dtype, round_id=pending.round_id, source=self.source,
                                          min_survivors=min_survivors)
        except (PrivacyViolation, SecAggAborted, ValueError) as exc:  # BudgetExceeded among them
            pending.aborted = str(exc)
            log.warning("fog %s round %d: secure round not started: %s", fog.name, round_no, exc)
        return pending

    def _send(self, pending: PendingSecureRound, messages: list[Message]) -> PendingSecureRound:
        pending.message_ids = set(self.grid.push_messages(messages))
        log.info("fog %s round %d: secure round %s over %d agents (degree %d, threshold %d)", self.fog.name,
                 pending.round, pending.round_id.hex()[:8], len(pending.nodes), pending.server.degree,
                 pending.server.threshold)
        return pending

    def _collect(self, ids: set[str], nodes: set[int], deadline: float,
                 on_reply: Callable[[int, Message], None] | None = None) -> dict[int, Message]:
        """Replies to ``ids`` from ``nodes`` until all arrived or ``deadline`` (monotonic) passed."""
        out: dict[int, Message] = {}
        waiting = set(ids)
        while waiting:
            for m in self.grid.pull_messages(waiting):
                waiting.discard(m.metadata.reply_to_message_id)
                node = m.metadata.src_node_id
                if node in nodes and node not in out:
                    out[node] = m
                    if on_reply is not None:
                        on_reply(node, m)
            if not waiting or self.clock() >= deadline:
                break
            time.sleep(self.poll_s)
        return out

    def _stage(self, pending: PendingSecureRound, stage: Stage, contents: Mapping[int, RecordDict],
               counts: dict[str, int], reasons: list[str], uplink: dict[int, int],
               on_reply: Callable[[int, RecordDict], None]) -> None:
        """Send one later stage's messages (node -> content); each valid ``ok`` reply goes to ``on_reply``."""
        messages = [Message(c, dst_node_id=node, message_type=wire.SECAGG_MESSAGE_TYPE, group_id=pending.group_id)
                    for node, c in contents.items()]
        ids = set(self.grid.push_messages(messages))
        pending.bytes_down += sum(_payload_bytes(c) for c in contents.values())

        def handle(node: int, msg: Message) -> None:
            self._route(pending, stage, node, msg, counts, reasons, uplink, on_reply)

        got = self._collect(ids, set(contents), self.clock() + self.secagg.stage_timeout_s, handle)
        counts["silent"] += len(contents) - len(got)

    def finish_round(self, pending: PendingSecureRound):
        from hyprstream.fog.aggregator import FogRound

        counts = {"declined": 0, "refused": 0, "failed": 0, "silent": 0}
        reasons: list[str] = []
        uplink: dict[int, int] = {}  # payload bytes received, per agent
        stage_seconds: dict[str, float] = {}
        version, delta, result = None, {}, None
        survivors: tuple[int, ...] = ()
        self.last = None
        if pending.aborted:
            reasons.append(f"secure aggregation not started: {pending.aborted}")
        else:
            try:
                result = self._run_stages(pending, counts, reasons, uplink, stage_seconds)
            except SecAggAborted as exc:
                reasons.append(f"secure aggregation aborted: {exc}")
                log.warning("fog %s round %d: %s", self.name, pending.round, exc)
        if result is not None:
            node_of = dict(enumerate(pending.nodes, start=1))
            survivors = tuple(node_of[i] for i in result.survivors)
            try:
                delta, entry, transcript = self._release(pending, result)
                version, entry = self._push(pending, delta, len(survivors), entry, transcript, reasons)
            except HyprstreamError as exc:
                reasons.append(f"not released: {exc}")
                log.warning("fog %s round %d: not released: %s", self.name, pending.round, exc)
                entry, transcript = None, ""
            self.last = SecureRoundInfo(
                pending.round_id.hex(), pending.server.degree, pending.server.threshold, survivors,
                tuple(node_of[i] for i in result.dropped_before_masking),
                tuple(node_of[i] for i in result.dropped_after_masking), transcript, entry, stage_seconds)
        failed = counts["failed"] + counts["silent"]
        return FogRound(
            fog=self.name, round=pending.round, base_version=pending.base.version, version=version,
            layers=pending.layers, participants=len(survivors) if version is not None else 0,
            declined=counts["declined"], refused=counts["refused"], failed=failed,
            bytes_up=sum(uplink.values()), bytes_down=pending.bytes_down, train_loss=float("nan"),
            seconds=self.clock() - pending.started, delta=delta, reasons=tuple(reasons), nodes=pending.nodes,
            contributors=survivors if version is not None else (), uplink=uplink)

    def run_round(self, round_no: int, base=None, nodes: Sequence[int] | None = None,
                  sampling: Sampling | None = None):
        return self.finish_round(self.start_round(round_no, base, nodes, sampling))

    # -------------------------------------------------------------------------------- internals
    def _run_stages(self, pending: PendingSecureRound, counts: dict[str, int], reasons: list[str],
                    uplink: dict[int, int], seconds: dict[str, float]) -> SecAggSum:
        server = pending.server
        assert server is not None
        index = {node: i for i, node in enumerate(pending.nodes, start=1)}
        node_of = {i: node for node, i in index.items()}
        rid = pending.round_id
        t0 = self.clock()

        # stage 0: collect the setup replies to the messages start_round sent (training happens there)
        adverts = {}

        def on_advert(node: int, content: RecordDict) -> None:
            adverts[index[node]] = wire.advert_from(content)

        got = self._collect(pending.message_ids, set(pending.nodes), pending.started + self.plan.timeout_s,
                            lambda node, msg: self._route(pending, Stage.SETUP, node, msg, counts, reasons, uplink,
                                                          on_advert))
        counts["silent"] += len(pending.nodes) - len(got)
        server.collect_adverts(adverts)
        seconds["setup"] = self.clock() - t0

        def stage(name: Stage, contents: dict[int, RecordDict], handler) -> None:
            t = self.clock()
            self._stage(pending, name, {node_of[i]: c for i, c in contents.items()}, counts, reasons, uplink,
                        lambda node, content: handler(index[node], content))
            seconds[name.value] = self.clock() - t

        shares = {}
        stage(Stage.SHARE, {i: wire.keys_content(rid, server.keys_for(i)) for i in sorted(server.advertised)},
              lambda i, c: shares.__setitem__(i, wire.sealed_from(c, "dsts")))
        server.collect_shares(shares)

        stage(Stage.MASK,
              {i: wire.sealed_content(Stage.MASK, rid, server.inbox_for(i), "srcs") for i in sorted(server.shared)},
              lambda i, c: server.add_masked(i, wire.masked_from(c, server.dtype)))
        server.close_masking()

        tags = {}
        u3 = wire.survivors_content(rid, server.survivor_set())  # one message for every survivor
        stage(Stage.CONSISTENCY, {i: u3 for i in sorted(server.masked)},
              lambda i, c: tags.__setitem__(i, wire.confirmation_from(c)))
        confirmed = server.collect_confirmations(tags)

        unmask = {}
        stage(Stage.UNMASK, {i: wire.unmask_content(rid, server.unmask_request_for(i)) for i in sorted(confirmed)},
              lambda i, c: unmask.__setitem__(i, wire.shares_from(c)))
        return server.finish(unmask)

    def _route(self, pending, stage, node, msg, counts, reasons, uplink, on_reply) -> None:
        """Check one reply of ``stage`` and hand its content to ``on_reply`` when it is a valid ``ok``."""
        if msg.has_error():
            counts["failed"] += 1
            reasons.append(f"error: {msg.error.reason}")
            return
        try:
            h = wire.header(msg.content)
            if h.round_id != pending.round_id or h.stage is not stage:
                raise ValidationError(f"reply for another round or stage ({h.stage.value})")
            uplink[node] = uplink.get(node, 0) + _payload_bytes(msg.content)
            if h.status is Status.DECLINED:
                counts["declined"] += 1
                reasons.append(f"declined: {h.reason}")
                return
            if h.status is Status.REFUSED:
                raise ValidationError(f"client refused the {stage.value} stage: {h.reason}")
            on_reply(node, msg.content)
        except ValidationError as exc:
            counts["refused"] += 1
            reasons.append(f"refused: {exc}")
            log.warning("fog %s round %d: %s", self.name, pending.round, exc)

    def _release(self, pending: PendingSecureRound, result: SecAggSum) -> tuple[dict[str, np.ndarray], Entry | None, str]:
        spec = pending.spec
        assert spec is not None
        n = len(result.survivors)
        dec = decode(result.total, n, spec)
        dp = self._dp(pending.expected)
        entry, kept = None, None
        if dp is not None:
            mean = dp.release(dec.total, n, self.source)
            # charged before the release leaves the fog: a crash from here on can only over-count
            entry = self.dp_rounds.charge(pending.round, pending.base.version, pending.group_id)
        elif spec.carries_weights:
            mean, kept = group_means(dec, spec)
            if not kept:
                raise SecAggAborted("the survivors' weights sum to zero")
        else:  # uniform: over the survivors, each counted with its public weight (1 outside a buffered cohort)
            mean = dec.total / sum(pending.weights.get(i, 1.0) for i in result.survivors)
        delta = spec.layout.unflatten(mean, np.float32)
        if kept is not None and len(kept) < spec.n_groups:  # a group no survivor trained is not pushed
            delta = {name: v for name, v in delta.items() if spec.group_of(name) in kept}
        return delta, entry, _transcript(pending, result)

    def _push(self, pending: PendingSecureRound, delta: dict[str, np.ndarray], participants: int,
              entry: Entry | None, transcript: str, reasons: list[str]) -> tuple[int | None, Entry | None]:
        """Push the released mean through the fog's durable outbox (while core is unreachable it waits
        there, and the fog trains on with it applied locally); with client-level DP the privacy record goes
        with it and the ledger entry is bound to the version core commits, whenever that happens."""
        spec = pending.spec
        layers = tuple(layer for g, layer in enumerate(pending.layers)
                       if not spec.groups or any(spec.group_of(name) == g for name in delta))
        if self.dp_rounds is not None:
            return self.dp_rounds.push(pending.base, delta, layers, pending.expected, entry, reasons,
                                       transcript=transcript)
        return self.fog.push(pending.base, delta, layers, participants, reasons, transcript_sha256=transcript), None


def _payload_bytes(content: RecordDict) -> int:
    total = 0
    for rec in content.values():
        if isinstance(rec, ArrayRecord):
            total += sum(len(a.data) for a in rec.values())
        elif isinstance(rec, ConfigRecord):
            for v in rec.values():
                if isinstance(v, bytes):
                    total += len(v)
                elif isinstance(v, list):
                    total += sum(len(x) if isinstance(x, bytes) else 8 for x in v)
                else:
                    total += 8
    return total


def _transcript(pending: PendingSecureRound, result: SecAggSum) -> str:
    """SHA-256 over the round's public transcript: parameters, public keys, who survived, the sum."""
    server, spec = pending.server, pending.spec
    assert server is not None and spec is not None
    h = hashlib.sha256()
    q = spec.quantizer
    h.update(f"{wire.SCHEMA}|{pending.group_id}|v{pending.base.version}|{','.join(pending.layers)}|"
             f"n={server.n}|k={server.degree}|t={server.threshold}|bits={q.bits}|scale={q.scale!r}|"
             f"bound={q.bound}|clip={spec.clip!r}|noise={spec.noise_sigma!r}|weighted={spec.weighted}|"
             f"fixed={spec.fixed_denominator}|groups={','.join(map(str, spec.groups))}".encode())
    h.update(pending.round_id)
    for i, a in sorted(server.public_keys().items()):
        h.update(i.to_bytes(4, "big") + a.enc_key + a.mask_key + a.commitment)
    for group in (result.survivors, result.dropped_before_masking, result.dropped_after_masking):
        h.update(b"|" + b"".join(i.to_bytes(4, "big") for i in group))
    h.update(hashlib.sha256(np.ascontiguousarray(result.total).tobytes()).digest())
    return h.hexdigest()


__all__ = ["PendingSecureRound", "SecureFogAggregator", "SecureRoundInfo"]
