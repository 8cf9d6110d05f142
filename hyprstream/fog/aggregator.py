"""The fog's round logic over a Flower Grid: pull layers from core, train on agents, aggregate, push.

One class serves the simulator (an in-memory grid) and a deployed SuperLink alike: it is handed a
Flower ``Grid``, the node IDs of its agents and a core client. A round is split into ``start_round``
(send the train requests) and ``finish_round`` (collect, check, aggregate, push) so that several fogs
sharing one grid can have their rounds in flight at the same time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from hyprstream.coreapi.client import CoreClient
from hyprstream.coreapi.commands import PushDelta
from hyprstream.coreapi.records import Snapshot
from hyprstream.errors import TransportError, ValidationError
from hyprstream.fog.aggregate import Aggregation, Rule, UpdateMatrix, UpdateSum, updates_for
from hyprstream.fog.outbox import Delivery, Outbox, Outcome, Push
from hyprstream.protocol import TRAIN_MESSAGE_TYPE, ReplyStatus, TrainReply, TrainRequest, train_seed
from hyprstream.store import layer_table as lt

log = logging.getLogger("hyprstream.fog")


@dataclass(frozen=True)
class RoundPlan:
    """What a round asks of the agents."""

    task: str
    layers: tuple[str, ...]  # empty: every layer group of the model
    local_steps: int
    batch_size: int
    lr: float
    min_replies: int = 1
    timeout_s: float = 120.0
    max_update_norm: float | None = None
    update_encoding: str = "fp32"  # how agents encode their deltas ("int8": hyprstream.codec)
    aggregation: Rule = Aggregation.MEAN  # robust and installed rules: plain rounds only (the fog sees each delta)
    trim_fraction: float = 0.1  # trimmed_mean: share of values dropped at each end, per coordinate


@dataclass
class PendingRound:
    round: int
    base: Snapshot
    layers: tuple[str, ...]
    message_ids: set[str]
    nodes: tuple[int, ...]
    bytes_down: int
    started: float


@dataclass(frozen=True)
class FogRound:
    """Outcome of one fog round."""

    fog: str
    round: int
    base_version: int
    version: int | None  # the version core committed, None when nothing was pushed
    layers: tuple[str, ...]
    participants: int
    declined: int
    refused: int
    failed: int
    bytes_up: int
    bytes_down: int
    train_loss: float
    seconds: float
    delta: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    reasons: tuple[str, ...] = ()
    nodes: tuple[int, ...] = ()  # agents asked to train
    contributors: tuple[int, ...] = ()  # agents whose updates were aggregated
    uplink: dict[int, int] = field(default_factory=dict)  # payload bytes received, per agent


@dataclass
class Gathered:
    """A round's checked replies (:meth:`FogAggregator.gather`): one matrix per requested layer group, and
    what was left out and why."""

    matrices: dict[str, UpdateMatrix | UpdateSum]
    declined: int = 0
    refused: int = 0
    failed: int = 0
    bytes_up: int = 0
    losses: list[tuple[float, int]] = field(default_factory=list)  # (train loss, examples) per contributor
    reasons: list[str] = field(default_factory=list)
    contributors: list[int] = field(default_factory=list)
    uplink: dict[int, int] = field(default_factory=dict)


class FogAggregator:
    def __init__(self, name: str, grid: Grid, node_ids: Sequence[int], core: CoreClient, model: str,
                 plan: RoundPlan, *, seed: int = 0, outbox: Outbox | None = None, poll_s: float = 0.05) -> None:
        if not node_ids:
            raise ValidationError(f"fog {name!r} has no agents")
        self.name = name
        self.grid = grid
        self.node_ids = list(node_ids)
        self.core = core
        self.model = model
        self.plan = plan
        self.seed = seed
        self.poll_s = poll_s  # how often the grid is asked for replies
        self.outbox = outbox if outbox is not None else Outbox()
        self._seq = max((p.seq for p in self.outbox.pending()), default=0)
        self._local: Snapshot | None = None  # last pulled version plus this fog's undelivered deltas
        self._hooks: list[Callable[[Delivery], None]] = []
        self.last_staleness: int | None = None  # of the last push core committed, as core measured it
        self.core_bound: float | None = None  # core's max_update_norm of the model (None: no bound), as last read

    def pull(self) -> Snapshot:
        """The current master layers; while core is unreachable, the last ones pulled with this fog's
        own undelivered updates applied, so that its agents keep training (partition tolerance). Reads
        the model's ``max_update_norm`` too (``core_bound``), which bounds what core accepts."""
        try:
            self.deliver()
            self._local = self.core.get_weights(self.model)
            self.core_bound = self.core.head(self.model).get("max_update_norm")
        except TransportError:
            if self._local is None:
                raise
            log.warning("fog %s: core unreachable, training on version %d plus %d local update(s)",
                        self.name, self._local.version, len(self.outbox))
        return self._local

    def next_seq(self) -> int:
        """The sequence number of this fog's next push: strictly increasing, across restarts too (core
        refuses a sequence number it has seen as a replay). Every kind of round (plain, secure,
        buffered) takes its numbers here."""
        self._seq = max(self._seq + 1, time.time_ns() // 1000)
        return self._seq

    def deliver(self) -> list[Delivery]:
        """Send buffered pushes to core, in order, as far as it can be reached."""
        return self._delivered(self.outbox.flush(self.core))

    def on_delivery(self, hook: Callable[[Delivery], None]) -> None:
        """Call ``hook`` with each answer core gives to one of this fog's pushes (whenever it is sent:
        at once or, after a partition, from the outbox)."""
        self._hooks.append(hook)

    def _delivered(self, deliveries: list[Delivery]) -> list[Delivery]:
        for delivery in deliveries:
            if delivery.result is not None:  # versions core committed on the push's layers since its base
                self.last_staleness = max(delivery.result.staleness.values(), default=0)
            for hook in self._hooks:
                hook(delivery)
        return deliveries

    def train_request(self, base: Snapshot, layers: tuple[str, ...], round_no: int, agent: int,
                      weights: dict[str, np.ndarray], *, encoded: bool = True) -> TrainRequest:
        """The plan's train request in round ``round_no`` to the agent at index ``agent`` of :attr:`node_ids`
        (its seed: :func:`train_seed` of the fog's seed, the round and that index); ``encoded=False``: fp32
        deltas whatever the plan's encoding (a secure round quantizes them itself)."""
        p = self.plan
        return TrainRequest(model=self.model, model_version=base.version, task=p.task, layers=layers,
                            local_steps=p.local_steps, batch_size=p.batch_size, lr=p.lr,
                            seed=train_seed(self.seed, round_no, agent), weights=weights,
                            update_encoding=p.update_encoding if encoded else "fp32")

    def start_round(self, round_no: int, base: Snapshot | None = None,
                    nodes: Sequence[int] | None = None) -> PendingRound:
        """Send train requests to ``nodes`` (default: all of this fog's agents)."""
        base, nodes, weights, layers = self.round_inputs(base, nodes)
        messages = []
        bytes_down = 0
        index = {node: i for i, node in enumerate(self.node_ids)}
        # Every request of the round carries the same weights: serialise them into one record shared by
        # all the messages (as Flower's own strategies share one ArrayRecord) instead of once per agent.
        shared = None
        for node in nodes:
            request = self.train_request(base, layers, round_no, index[node], weights)
            if shared is None:
                content = request.to_content()
                shared, payload = content["weights"], request.payload_bytes()
            else:
                content = replace(request, weights={}).to_content()
                content["weights"] = shared
            bytes_down += payload
            messages.append(Message(content, dst_node_id=node, message_type=TRAIN_MESSAGE_TYPE,
                                    group_id=f"{self.name}/round-{round_no}"))
        ids = set(self.grid.push_messages(messages)) if messages else set()
        log.info("fog %s round %d: sent layers %s of version %d to %d agents",
                 self.name, round_no, list(layers), base.version, len(ids))
        return PendingRound(round_no, base, layers, ids, nodes, bytes_down, time.monotonic())

    def round_inputs(self, base: Snapshot | None, nodes: Sequence[int] | None
                     ) -> tuple[Snapshot, tuple[int, ...], dict[str, np.ndarray], tuple[str, ...]]:
        """A round's base (pulled when None), its agents (default: all; an agent not this fog's is refused), the
        base's weights and the layer groups the round trains."""
        base = base if base is not None else self.pull()
        nodes = tuple(self.node_ids if nodes is None else nodes)
        unknown = set(nodes) - set(self.node_ids)
        if unknown:
            raise ValidationError(f"fog {self.name!r} has no agents {sorted(unknown)}")
        return base, nodes, lt.to_arrays(base.table), tuple(self.plan.layers or lt.layers_in(base.table))

    def collect(self, pending: PendingRound, poll_s: float | None = None) -> list[Message]:
        """Replies for ``pending`` until all have arrived or the round's timeout passes (asking the grid every
        ``poll_s`` seconds, default :attr:`poll_s`)."""
        poll_s = self.poll_s if poll_s is None else poll_s
        waiting = set(pending.message_ids)
        replies: list[Message] = []
        deadline = pending.started + self.plan.timeout_s
        while waiting and time.monotonic() < deadline:
            got = list(self.grid.pull_messages(waiting))
            replies.extend(got)
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if waiting:
                time.sleep(poll_s)
        if waiting:
            log.warning("fog %s round %d: %s", self.name, pending.round, self.silence(pending, replies))
        return replies

    def silence(self, pending: PendingRound, replies: Sequence[Message]) -> str:
        """Which agents of ``pending`` did not answer in time, and the setting that gives them longer."""
        answered = {m.metadata.src_node_id for m in replies}
        silent = [n for n in pending.nodes if n not in answered]
        return (f"agent(s) {', '.join(map(str, silent))} did not answer within {self.plan.timeout_s:g} s "
                f"(raise rounds.timeout_s; in a simulation, [runtime] round_timeout_s)")

    def gather(self, pending: PendingRound, *, clip: float | None = None) -> Gathered:
        """Collect and check ``pending``'s replies (status, version, layers, names, shapes, finiteness, the
        norm bound) into one matrix per requested layer group, in the fog's agent order. ``clip``: each
        accepted delta is scaled to L2 norm at most ``clip`` over all its layer groups and counts with
        weight 1 (client-level DP), instead of its ``num_examples``."""
        order = {node: i for i, node in enumerate(self.node_ids)}
        # Aggregate in a fixed order (not arrival order) so that float sums are reproducible.
        replies = sorted(self.collect(pending) if pending.message_ids else [],
                         key=lambda m: order.get(m.metadata.src_node_id, len(order)))
        trained = lt.select_layers(pending.base.table, pending.layers)
        # One matrix per layer group: an agent may train only some of the requested groups (a device in
        # its hybrid strategy does, and says which in reply.layers); each group is averaged over the
        # agents that trained it.
        rule = Aggregation.MEAN if clip is not None else self.plan.aggregation
        g = Gathered({layer: updates_for(rule, _shapes(lt.select_layers(trained, [layer])),
                                         capacity=max(1, len(pending.nodes))) for layer in pending.layers})
        g.failed = len(pending.message_ids) - len(replies)
        if g.failed:
            g.reasons.append(self.silence(pending, replies))
        for msg in replies:
            if msg.has_error():
                g.failed += 1
                g.reasons.append(f"error: {msg.error.reason}")
                continue
            try:
                reply = TrainReply.from_content(msg.content)
                g.bytes_up += reply.payload_bytes()
                g.uplink[msg.metadata.src_node_id] = reply.payload_bytes()
                if reply.status is ReplyStatus.DECLINED:
                    g.declined += 1
                    g.reasons.append(f"declined: {reply.reason}")
                    continue
                if reply.model_version != pending.base.version:
                    raise ValidationError(f"reply for version {reply.model_version}, expected {pending.base.version}")
                self._add(g.matrices, reply, clip=clip)
                g.losses.append((reply.train_loss, reply.num_examples))
                g.contributors.append(msg.metadata.src_node_id)
            except ValidationError as exc:
                g.refused += 1
                g.reasons.append(f"refused: {exc}")
                log.warning("fog %s round %d: refused an update: %s", self.name, pending.round, exc)
        return g

    def finish_round(self, pending: PendingRound) -> FogRound:
        g = self.gather(pending)
        reasons: list[str] = []
        version = None
        delta: dict[str, np.ndarray] = {}
        ready = [layer for layer, m in g.matrices.items() if m.count >= max(1, self.plan.min_replies)]
        try:
            for layer in ready:
                delta.update(g.matrices[layer].aggregate(self.plan.aggregation, self.plan.trim_fraction))
        except ValidationError as exc:  # an installed rule that failed or returned a wrong or non-finite value
            log.error("fog %s round %d: aggregation failed, nothing pushed: %s", self.name, pending.round, exc)
            reasons.append(f"aggregation: {exc}")
            delta = {}
        if delta:
            version = self.push(pending.base, delta, ready, len(g.contributors), reasons)
        elif not ready:
            log.warning("fog %s round %d: %d usable update(s), fewer than %d: nothing pushed",
                        self.name, pending.round, len(g.contributors), self.plan.min_replies)
        return self.outcome(pending, g, version, delta, reasons)

    def outcome(self, pending: PendingRound, g: Gathered, version: int | None, delta: dict[str, np.ndarray],
                reasons: Sequence[str]) -> FogRound:
        """The ``FogRound`` of ``pending``: what :meth:`gather` found, and what was pushed."""
        losses = g.losses
        loss = (sum(v * n for v, n in losses) / max(1, sum(n for _, n in losses))) if losses else float("nan")
        return FogRound(
            fog=self.name, round=pending.round, base_version=pending.base.version, version=version,
            layers=pending.layers, participants=len(g.contributors), declined=g.declined, refused=g.refused,
            failed=g.failed, bytes_up=g.bytes_up, bytes_down=pending.bytes_down, train_loss=loss,
            seconds=time.monotonic() - pending.started, delta=delta, reasons=(*g.reasons, *reasons),
            nodes=pending.nodes, contributors=tuple(g.contributors), uplink=g.uplink,
        )

    def push(self, base: Snapshot, delta: dict[str, np.ndarray], layers: Sequence[str], participants: int,
             reasons: list[str], *, privacy: dict[str, float] | None = None,
             transcript_sha256: str | None = None, seq: int | None = None) -> int | None:
        """Push ``delta`` (the ``layers`` of ``base``) to core through the outbox; the version core
        committed, or None (the reason appended to ``reasons``). While core is unreachable the push waits
        in the outbox and the fog's local model is ``base`` with it applied."""
        version = None
        record = PushDelta(self.model, self.name, self.next_seq() if seq is None else seq,
                           {layer: base.clocks[layer] for layer in layers}, participants, privacy, transcript_sha256)
        push = Push(record, lt.to_table(delta, layer=_layer_lookup(base.table)))
        self.outbox.put(push)  # durable before it is sent
        for delivery in self.deliver():
            if delivery.push.seq == push.seq and delivery.result is not None:
                version = delivery.result.version
            elif delivery.outcome is Outcome.REFUSED:
                reasons.append(f"core refused push {delivery.push.seq}: {delivery.reason}")
        if version is None and len(self.outbox):
            reasons.append(f"core unreachable: {len(self.outbox)} push(es) buffered")
            self._local = _project(base, push)
        return version

    def _add(self, matrices: dict[str, UpdateMatrix | UpdateSum], reply: TrainReply,
             weight: float | None = None, *, clip: float | None = None) -> None:
        """Check a whole reply (layers, names, shapes, finiteness, the norm bound over all its layers),
        then store each of its layer groups with ``weight`` (default: its ``num_examples``); a refused
        reply leaves every matrix unchanged. ``clip``: scaled to L2 norm at most ``clip`` over all its
        layers, with ``weight`` (default 1)."""
        layers = list(reply.layers)
        if not layers or len(set(layers)) != len(layers) or not set(layers) <= set(matrices):
            raise ValidationError(f"reply trained layers {layers}, the request asked for {sorted(matrices)}")
        names = {name: layer for layer in layers for name in matrices[layer].shapes}
        extra = sorted(set(reply.delta) - set(names))
        if extra:
            raise ValidationError(f"update has parameters outside its layers {layers}: {extra}")
        checked, sq = {}, 0.0
        for layer in layers:
            part = {n: reply.delta[n] for n in matrices[layer].shapes if n in reply.delta}
            norm, checked[layer] = matrices[layer].check(part, reply.num_examples)
            sq += norm * norm
        bound = self.plan.max_update_norm
        if bound is not None and not np.sqrt(sq) <= bound:
            raise ValidationError(f"update norm {np.sqrt(sq):.4g} exceeds the bound {bound:.4g}")
        if clip is not None:
            # a relative margin of 1e-6 keeps the clipped norm below ``clip`` after float32 rounding
            scale = min(1.0, clip / (float(np.sqrt(sq)) * (1.0 + 1e-6))) if sq > 0 else 1.0
            if scale < 1.0:
                checked = {layer: {n: v * np.float32(scale) for n, v in part.items()}
                           for layer, part in checked.items()}
            weight = 1.0 if weight is None else weight
        for layer in layers:
            matrices[layer].store(checked[layer], reply.num_examples if weight is None else weight)

    def run_round(self, round_no: int, base: Snapshot | None = None,
                  nodes: Sequence[int] | None = None) -> FogRound:
        return self.finish_round(self.start_round(round_no, base, nodes))


class WrappedFog:
    """A round runner around a :class:`FogAggregator` (``self.fog``): the fog's identity, and its pull."""

    fog: FogAggregator

    name = property(lambda self: self.fog.name)
    node_ids = property(lambda self: self.fog.node_ids)
    grid = property(lambda self: self.fog.grid)
    core = property(lambda self: self.fog.core)
    model = property(lambda self: self.fog.model)
    plan = property(lambda self: self.fog.plan)

    def pull(self) -> Snapshot:
        return self.fog.pull()


def _project(snapshot: Snapshot, push: Push) -> Snapshot:
    """``snapshot`` with ``push`` applied as core would apply a current push (weight 1)."""
    weights = lt.to_arrays(snapshot.table, copy=True)
    for name, d in lt.to_arrays(push.delta).items():
        weights[name] = (weights[name] + d).astype(weights[name].dtype, copy=False)
    layer = _layer_lookup(snapshot.table)
    clocks = dict(snapshot.clocks)
    for name in push.record.base_clocks:
        clocks[name] = clocks[name].increment(push.record.fog)
    return Snapshot(snapshot.model, snapshot.version, lt.to_table(weights, layer=layer), clocks)


def _shapes(table) -> dict[str, tuple[int, ...]]:
    return dict(zip(table.column("name").to_pylist(), (tuple(x) for x in table.column("shape").to_pylist()),
                    strict=True))


def _layer_lookup(table):
    mapping = dict(zip(table.column("name").to_pylist(), table.column("layer").to_pylist(), strict=True))
    return mapping.__getitem__


__all__ = ["FogAggregator", "FogRound", "PendingRound", "RoundPlan"]
