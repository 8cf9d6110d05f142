"""Buffered asynchronous aggregation (FedBuff, Nguyen et al., AISTATS 2022) on a fog.

A :class:`BufferedFog` wraps a :class:`~hyprstream.fog.aggregator.FogAggregator` (its grid, agents,
core client, plan, outbox and push sequence) and, instead of rounds, keeps up to ``concurrency`` of
its agents training at once on the fog's current model. Each reply is checked as in a synchronous
round (status, model version, layers, names, shapes, finiteness, the plan's norm bound) and buffered
with the weight ``num_examples / sqrt(1 + s)``, where the staleness ``s`` is the fog's model version
now minus the version the agent trained from; a reply with ``s > max_staleness`` is refused. When
``buffer_k`` updates are buffered, their weighted mean is pushed to core through the fog's outbox
(the same sequence numbers and delivery rules as a round), the fog pulls the new version, and the
buffer starts empty. An agent that finished goes to the back of the queue of idle agents and the
first idle agent gets the next request at once (with ``concurrency`` equal to the number of agents,
that is the agent that just finished).

Staleness weight. ``1 / sqrt(1 + s)`` is FedBuff's choice (the polynomial discount of Xie et al.,
FedAsync, with exponent 1/2, :func:`hyprstream.consistency.staleness_weight`): an update from
one version ago still counts 71 %, from three versions ago 50 %, so stragglers contribute without
letting an old model pull the current one back. Staleness counts every version core committed in
between, including other fogs' versions.

Client-level DP (``private``: the fog's :class:`~hyprstream.fog.dp.ClientDpRounds`, replace-one). Each
update is clipped to C and weighted by ``1 / sqrt(1 + s)`` alone (its ``num_examples`` is not used); a
push takes at most one update per agent (an agent whose update is buffered is asked again after the
push) and releases (sum + N(0, (2zC)^2)) / ``buffer_k``, charged before it leaves. A refused update
(non-finite, over the norm bound) keeps its place in the buffer as zeros, so that who fills a buffer
does not depend on what any update holds. With ``secure`` too, ``private`` is the secure runner's
``dp_rounds``: each cohort's sum is released over ``buffer_k`` by the runner. Before every push the
budget and core's norm bound are checked; when the next push would not fit, the fog is
:attr:`BufferedFog.finished` and dispatches nothing more.

Agents that decline, fail (an error reply) or stay silent past the plan's ``timeout_s`` rest until
the fog's next push, then are asked again. When every agent rests and none is training, nothing can
fill the buffer: :meth:`BufferedFog.step` raises :class:`~hyprstream.errors.HyprstreamError`.

Virtual clock (simulation). With ``duration(node_id, dispatch) -> float`` (simulated seconds of
the agent's job; :class:`Dispatch` says what was sent) the fog dispatches each request for real at
once, keeps an event queue of simulated completion times, and handles completions in that order:
when the earliest completion is agent i's, it waits for i's real reply (leaving others' replies on
the grid). Each push records its simulated time, so a run is deterministic and nothing sleeps. Ties
go to the earlier dispatch. A ``choose`` (selection) works on the virtual clock too, reading the
simulated devices' state at :attr:`BufferedFog.now`; when no agent is training and it chooses none of
the idle ones, simulated time moves on by ``retry_s`` and they are offered again (an error once that
has lasted ``max_wait_s``).

API: the round engine's buffered scheduler drives it, for the fog's ServerApp (one fog, real time) and
the simulation harness (several fogs on one simulated clock)::

    fog = FogAggregator(name, grid, node_ids, core, model, plan, seed=...)
    buffered = BufferedFog(fog, buffer_k=3, max_staleness=4, concurrency=8, duration=None)
    pushes = hyprstream.fog.engine.run_buffered([buffered], max_pushes=10)   # list[BufferedPush]
    # one step by hand: the fog's next completion (virtual clock) or, in real time, replies until a push
    buffered.next_time; buffered.step()

``BufferedFog.now`` is the current simulated time (seconds since the first dispatch; real seconds
without a virtual clock). The layer groups trained are the plan's ``layers`` (all groups when empty),
the same every push.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message

from hyprstream.consistency import staleness_weight
from hyprstream.coreapi.records import Snapshot
from hyprstream.errors import HyprstreamError, ValidationError
from hyprstream.fog.aggregate import UpdateMatrix, UpdateSum, updates_for
from hyprstream.fog.aggregator import FogAggregator, FogRound, _shapes
from hyprstream.privacy.errors import PrivacyViolation
from hyprstream.protocol import ReplyStatus, TrainReply
from hyprstream.store import layer_table as lt

log = logging.getLogger("hyprstream.fog")

STALENESS_EXPONENT = 0.5  # weight = (1 + s) ** -0.5, FedBuff's 1 / sqrt(1 + s)


def buffered_weight(num_examples: int, staleness: int) -> float:
    """The weight of one buffered update: its example count discounted by ``1 / sqrt(1 + staleness)``."""
    if staleness < 0:
        raise ValidationError(f"staleness must be >= 0, got {staleness}")
    return num_examples * staleness_weight(staleness, STALENESS_EXPONENT)


@dataclass(frozen=True)
class Dispatch:
    """One train request sent to one agent."""

    index: int  # 1, 2, ... over the life of the BufferedFog (also the request's seed round)
    node: int
    version: int  # the fog's model version the agent trains from
    layers: tuple[str, ...]
    bytes_down: int  # payload bytes of the request (the weights sent)
    sent_at: float  # BufferedFog.now when sent


@dataclass(frozen=True)
class BufferedPush:
    """One push of a buffered fog, and what happened since the previous one."""

    fog: str
    index: int  # 1, 2, ... pushes of this BufferedFog
    base_version: int  # the fog's model version the mean was pushed onto
    version: int | None  # the version core committed, None when it did not (see reasons)
    layers: tuple[str, ...]
    participants: int
    contributors: tuple[int, ...]  # agents whose updates were in the buffer, in arrival order
    staleness: tuple[int, ...]  # of each buffered update, in the same order
    weights: tuple[float, ...]  # of each buffered update: num_examples / sqrt(1 + staleness)
    dispatches: tuple[int, ...]  # Dispatch.index of each buffered update
    declined: int
    refused: int
    failed: int
    bytes_up: int
    bytes_down: int
    train_loss: float
    sim_time: float | None  # simulated seconds at the push (virtual clock), else None
    seconds: float  # real seconds since the previous push (the first: since the first dispatch)
    delta: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    reasons: tuple[str, ...] = ()
    uplink: dict[int, int] = field(default_factory=dict)  # payload bytes received since the last push, per agent

    @property
    def max_staleness(self) -> int:
        return max(self.staleness, default=0)

    @property
    def mean_staleness(self) -> float:
        return float(np.mean(self.staleness)) if self.staleness else 0.0

    def as_round(self) -> FogRound:
        """This push as a :class:`~hyprstream.fog.aggregator.FogRound` (round number: the push's
        index), for code that records rounds (metrics, the simulator's tables)."""
        return FogRound(
            fog=self.fog, round=self.index, base_version=self.base_version, version=self.version,
            layers=self.layers, participants=self.participants, declined=self.declined, refused=self.refused,
            failed=self.failed, bytes_up=self.bytes_up, bytes_down=self.bytes_down, train_loss=self.train_loss,
            seconds=self.seconds, delta=self.delta, reasons=self.reasons, nodes=self.contributors,
            contributors=self.contributors, uplink=dict(self.uplink))


@dataclass
class _Job:
    dispatch: Dispatch
    message_id: str
    deadline: float  # monotonic seconds: no reply by then means the agent failed
    done: float  # simulated completion time (virtual clock), else 0
    hold_id: bytes = b""  # secure: the dispatch's hold id (the agent keeps its delta under it)


class BufferedFog:
    def __init__(self, fog: FogAggregator, *, buffer_k: int, max_staleness: int, concurrency: int | None = None,
                 duration: Callable[[int, Dispatch], float] | None = None, poll_s: float = 0.05,
                 secure=None, choose: Callable[[tuple[int, ...], int, int], Sequence[int]] | None = None,
                 retry_s: float = 60.0, max_wait_s: float = 30 * 86400.0, private=None) -> None:
        if not isinstance(buffer_k, int) or buffer_k < 1:
            raise ValidationError(f"buffer_k must be an integer >= 1, got {buffer_k!r}")
        if not isinstance(max_staleness, int) or max_staleness < 0:
            raise ValidationError(f"max_staleness must be an integer >= 0, got {max_staleness!r}")
        concurrency = len(fog.node_ids) if concurrency is None else concurrency
        if not isinstance(concurrency, int) or not 1 <= concurrency <= len(fog.node_ids):
            raise ValidationError(f"concurrency must be between 1 and the fog's {len(fog.node_ids)} agents, "
                                  f"got {concurrency!r}")
        if secure is not None and secure.fog is not fog:
            raise ValidationError("the secure runner must wrap this buffered fog's FogAggregator")
        if secure is not None and buffer_k < secure.secagg.min_clients:
            raise ValidationError(f"buffer_k {buffer_k} is below the {secure.secagg.min_clients} clients a secure "
                                  "sum needs ([privacy.secagg] min_clients)")
        if not 0 < retry_s <= max_wait_s:
            raise ValidationError(f"need 0 < retry_s <= max_wait_s, got {retry_s} and {max_wait_s}")
        if private is not None or (secure is not None and secure.dp_rounds is not None):
            _check_private(fog, private, secure, buffer_k)
        self.fog = fog
        # telemetry selection: choose(idle agents, free slots, call number) -> the agents to send a job now
        self.choose = choose
        self._choices = 0
        self.secure = secure  # a SecureFogAggregator around ``fog``: each buffer is one secure cohort round
        # client-level DP (central): each push clipped, noised and charged (hyprstream.fog.dp.ClientDpRounds)
        self.private = private
        self.finished = ""  # why the fog stopped pushing (the privacy budget spent), "" while it goes on
        self._parked: list[int] = []  # private: agents whose update is in the buffer, asked again after the push
        self.buffer_k = buffer_k
        self.max_staleness = max_staleness
        self.concurrency = concurrency
        self.duration = duration
        self.poll_s = poll_s
        self.retry_s = retry_s  # virtual clock: simulated seconds between offers when no agent is eligible
        self.max_wait_s = max_wait_s  # ... and how long that may last before the fog gives up
        self._waited = 0.0
        self.pushes: list[BufferedPush] = []
        self._snapshot: Snapshot | None = None
        self._idle: deque[int] = deque(fog.node_ids)
        self._resting: list[int] = []  # declined or failed since the last push
        self._jobs: dict[str, _Job] = {}  # in flight, by message ID
        self._events: list[tuple[float, int, str]] = []  # (simulated completion, dispatch index, message ID)
        self._dispatches = itertools.count(1)
        self._now = 0.0
        self._t0: float | None = None
        self._reset_buffer()

    # -- public surface
    @property
    def now(self) -> float:
        """Simulated seconds since the first dispatch (real seconds without a virtual clock)."""
        if self.duration is not None or self._t0 is None:
            return self._now
        return time.monotonic() - self._t0

    @property
    def next_time(self) -> float:
        """Simulated time of the earliest pending completion (``now`` before anything was dispatched)."""
        self._start()
        if self.finished:
            return math.inf
        self._fill()
        if self.duration is None:
            return self.now
        if not self._events:  # none eligible now: the idle agents are offered again a little later
            return self.now + self.retry_s if self.choose is not None and self._idle else self.now
        return self._events[0][0]

    @property
    def in_flight(self) -> tuple[int, ...]:
        return tuple(job.dispatch.node for job in self._jobs.values())

    def step(self, stop: threading.Event | None = None) -> list[BufferedPush]:
        """Handle the next completion (virtual clock) or, in real time, replies until a push was made
        or ``stop`` is set; returns the pushes this made (at most one with a virtual clock; none once
        :attr:`finished`)."""
        self._start()
        if self.finished:
            return []
        self._fill()
        if self.duration is not None and not self._jobs and self.choose is not None and self._idle:
            self._wait_virtually()
            return []
        if not self._await_work(stop):
            return []
        if self.duration is not None:
            self._now, _, message_id = heapq.heappop(self._events)
            job = self._jobs[message_id]
            return self._finish(job, self._wait_for(job))
        pushes: list[BufferedPush] = []
        while not pushes and not (stop is not None and stop.is_set()):
            got = {m.metadata.reply_to_message_id: m for m in self.fog.grid.pull_messages(list(self._jobs))}
            expired = [mid for mid, job in self._jobs.items()
                       if mid not in got and time.monotonic() >= job.deadline]
            if not got and not expired:
                time.sleep(self.poll_s)
                continue
            # a fixed order (by dispatch), not arrival order, so that float sums are reproducible
            for mid in sorted([*got, *expired], key=lambda m: self._jobs[m].dispatch.index):
                pushes.extend(self._finish(self._jobs[mid], got.get(mid)))
            if not pushes and not self._await_work(stop):
                break
        return pushes

    def _await_work(self, stop: threading.Event | None) -> bool:
        """Until an agent is training: with a telemetry selection, idle agents none of which is eligible now
        are offered again every ``poll_s`` (telemetry changes); False when ``stop`` is set meanwhile. Without
        one (or with no idle agent left), no agent training means nothing can fill the buffer: an error."""
        warned = False
        while not self._jobs:
            if self.choose is None or not self._idle:
                self._check_busy()
            if stop is not None and stop.is_set():
                return False
            if not warned:
                log.warning("fog %s: none of the %d idle agent(s) is eligible now; asking again", self.fog.name,
                            len(self._idle))
                warned = True
            time.sleep(self.poll_s)
            self._fill()
        return True

    def _wait_virtually(self) -> None:
        """Virtual clock, no agent training and none of the idle ones eligible: simulated time passes by
        ``retry_s`` (batteries charge, devices come online); an error after ``max_wait_s`` in a row."""
        self._waited += self.retry_s
        if self._waited > self.max_wait_s:
            raise HyprstreamError(f"fog {self.fog.name}: none of its {len(self._idle)} idle agent(s) was eligible for "
                                  f"{self.max_wait_s:g} simulated seconds: nothing can fill the buffer")
        self._now += self.retry_s

    def _check_busy(self) -> None:
        if not self._jobs:
            assert self._snapshot is not None
            if self._parked:
                raise HyprstreamError(
                    f"fog {self.fog.name}: with client-level DP a push takes one update per agent, and only "
                    f"{len(self._parked)} agent(s) could fill this buffer of {self.buffer_k} (the others declined "
                    "or failed): lower buffer_k")
            raise HyprstreamError(f"fog {self.fog.name}: every agent declined or failed since version "
                                  f"{self._snapshot.version}: nothing to aggregate")

    # -- internals
    def _start(self) -> None:
        if self._snapshot is None:
            self._snapshot = self.fog.pull()
            self._t0 = self._since = time.monotonic()
            self._reset_buffer()
            self._check_budget()

    def _check_budget(self) -> None:
        """Private: whether the next push fits the model's budget and core's norm bound; if not, the fog is
        :attr:`finished` (nothing more is dispatched or released)."""
        if self.private is None or self._snapshot is None:
            return
        base = self._snapshot
        try:
            self.private.check_next(base, self.fog.plan.layers or tuple(lt.layers_in(base.table)),
                                    float(self.buffer_k), f"push {len(self.pushes) + 1} of {self.fog.model}")
        except PrivacyViolation as exc:  # BudgetExceeded among them
            self.finished = str(exc)
            log.warning("fog %s: buffered rounds stop: %s", self.fog.name, exc)

    def _reset_buffer(self) -> None:
        self._matrices: dict[str, UpdateMatrix | UpdateSum] = {}
        if self._snapshot is not None:  # a running sum for the mean, rows for a robust or installed rule
            layers = self.fog.plan.layers or tuple(lt.layers_in(self._snapshot.table))
            self._matrices = {layer: updates_for(self.fog.plan.aggregation,
                                                 _shapes(lt.select_layers(self._snapshot.table, [layer])),
                                                 capacity=self.buffer_k) for layer in layers}
        self._contributors: list[int] = []
        self._staleness: list[int] = []
        self._weights: list[float] = []
        self._buffered: list[int] = []
        self._holds: list[bytes] = []  # secure: each buffered agent's hold id
        self._losses: list[tuple[float, int]] = []
        self._reasons: list[str] = []
        self._counts = {"declined": 0, "refused": 0, "failed": 0, "bytes_up": 0, "bytes_down": 0}
        self._uplink: dict[int, int] = {}

    def _fill(self) -> None:
        """Send requests to idle agents until ``concurrency`` are training (with a telemetry selection, to the
        idle agents it chooses; the others stay idle and are offered again)."""
        slots = self.concurrency - len(self._jobs)
        if slots <= 0 or not self._idle:
            return
        if self.choose is None:
            for _ in range(min(slots, len(self._idle))):
                self._dispatch(self._idle.popleft())
            return
        self._choices += 1
        idle = tuple(self._idle)
        for node in [n for n in dict.fromkeys(self.choose(idle, slots, self._choices)) if n in idle][:slots]:
            self._idle.remove(node)
            self._dispatch(node)
            self._waited = 0.0

    def _dispatch(self, node: int) -> None:
        assert self._snapshot is not None
        index = next(self._dispatches)
        hold_id = b""
        if self.secure is not None:  # the agent trains and holds its delta for the cohort it will be in
            message_id, hold_id, bytes_down = self.secure.start_hold(index, self._snapshot, node)
            layers = self.fog.plan.layers or tuple(lt.layers_in(self._snapshot.table))
        else:
            pending = self.fog.start_round(index, base=self._snapshot, nodes=[node])
            (message_id,), layers, bytes_down = pending.message_ids, pending.layers, pending.bytes_down
        dispatch = Dispatch(index, node, self._snapshot.version, layers, bytes_down, self.now)
        self._counts["bytes_down"] += bytes_down
        done = 0.0
        if self.duration is not None:
            seconds = float(self.duration(node, dispatch))
            if not math.isfinite(seconds) or seconds < 0:
                raise ValidationError(f"duration for agent {node} must be finite and >= 0, got {seconds}")
            done = self._now + seconds
            heapq.heappush(self._events, (done, index, message_id))
        self._jobs[message_id] = _Job(dispatch, message_id, time.monotonic() + self.fog.plan.timeout_s, done, hold_id)

    def _wait_for(self, job: _Job) -> Message | None:
        """The real reply to ``job`` (None when none came before its deadline); others stay on the grid."""
        while True:
            got = list(self.fog.grid.pull_messages([job.message_id]))
            if got:
                return got[0]
            if time.monotonic() >= job.deadline:
                return None
            time.sleep(self.poll_s)

    def _finish(self, job: _Job, msg: Message | None) -> list[BufferedPush]:
        del self._jobs[job.message_id]
        node, counts = job.dispatch.node, self._counts
        usable = False
        if msg is None:
            counts["failed"] += 1
            reason = (f"agent {node} did not answer within {self.fog.plan.timeout_s:g} s (raise rounds.timeout_s; "
                      f"in a simulation, [runtime] round_timeout_s)")
            self._reasons.append(reason)
            log.warning("fog %s: %s", self.fog.name, reason)
        elif self.secure is not None:
            usable = self._held(job, msg)
        elif msg.has_error():
            counts["failed"] += 1
            self._reasons.append(f"error: {msg.error.reason}")
        else:
            try:
                reply = TrainReply.from_content(msg.content)
                counts["bytes_up"] += reply.payload_bytes()
                self._uplink[node] = self._uplink.get(node, 0) + reply.payload_bytes()
                if reply.status is ReplyStatus.DECLINED:
                    counts["declined"] += 1
                    self._reasons.append(f"declined: {reply.reason}")
                else:
                    self._accept(job.dispatch, reply)
                    usable = True
            except ValidationError as exc:
                counts["refused"] += 1
                self._reasons.append(f"refused: {exc}")
                log.warning("fog %s: refused an update of agent %d: %s", self.fog.name, node, exc)
                if self.private is not None:
                    # Its slot counts, as zeros: who fills a private buffer, and so every later push, must
                    # not depend on what an update holds (non-finite values, a norm over the bound).
                    self._count_slot(job.dispatch)
                    usable = True
        # A secure cohort's agents wait for its round (so each is in it once); a private buffer takes one update
        # per agent: its agents wait for the push.
        if usable and self.secure is None and self.private is not None:
            self._parked.append(node)
        elif not (usable and self.secure is not None):
            (self._idle if usable else self._resting).append(node)
        pushes = []
        if len(self._contributors) >= self.buffer_k:
            pushes.append(self._push_cohort() if self.secure is not None else
                          self._push_private() if self.private is not None else self._push())
        self._fill()
        return pushes

    def _held(self, job: _Job, msg: Message) -> bool:
        """Secure: whether the agent trained and holds the delta of ``job`` (then it joins the next cohort)."""
        from hyprstream.fog.secure import HoldRefused

        counts, node = self._counts, job.dispatch.node
        try:
            reason = self.secure.held_reply(msg, job.hold_id)
            if reason is None:
                staleness = self._staleness_of(job.dispatch)
                self._contributors.append(node)
                self._staleness.append(staleness)
                self._weights.append(buffered_weight(1, staleness))
                self._buffered.append(job.dispatch.index)
                self._holds.append(job.hold_id)
                return True
            counts["declined" if reason.startswith("declined") else "failed"] += 1
            self._reasons.append(reason)
        except ValidationError as exc:
            counts["refused"] += 1
            self._reasons.append(f"refused: {exc}")
            log.warning("fog %s: refused a reply of agent %d: %s", self.fog.name, node, exc)
            if self.private is not None and isinstance(exc, HoldRefused):
                # Its place in the cohort counts (holding nothing, it drops out of the sum: zeros), so that
                # who fills a private cohort does not depend on what the agent's training produced.
                self._count_slot(job.dispatch, public_weight=True)
                self._holds.append(job.hold_id)
                return True
        return False

    def _staleness_of(self, dispatch: Dispatch) -> int:
        assert self._snapshot is not None
        staleness = self._snapshot.version - dispatch.version
        if staleness > self.max_staleness:
            raise ValidationError(f"staleness {staleness} exceeds max_staleness {self.max_staleness}")
        return staleness

    def _accept(self, dispatch: Dispatch, reply: TrainReply) -> None:
        assert self._snapshot is not None
        if reply.model_version != dispatch.version:
            raise ValidationError(f"reply for version {reply.model_version}, expected {dispatch.version}")
        staleness = self._staleness_of(dispatch)
        if self.private is not None:  # clipped to C, its weight the public discount alone (at most 1)
            weight = staleness_weight(staleness, STALENESS_EXPONENT)
            self.fog._add(self._matrices, reply, weight=weight, clip=self.private.clip)
        else:
            weight = buffered_weight(reply.num_examples, staleness)
            self.fog._add(self._matrices, reply, weight=weight)
        self._contributors.append(dispatch.node)
        self._staleness.append(staleness)
        self._weights.append(weight)
        self._buffered.append(dispatch.index)
        self._losses.append((reply.train_loss, reply.num_examples))

    def _count_slot(self, dispatch: Dispatch, *, public_weight: bool = False) -> None:
        """Private: a refused update's place in the buffer, contributing zeros (its staleness as it was). A
        secure cohort's member keeps its public staleness weight (the protocol takes positive weights); its
        input is missing, so it adds zeros all the same."""
        assert self._snapshot is not None
        staleness = max(0, self._snapshot.version - dispatch.version)
        self._contributors.append(dispatch.node)
        self._staleness.append(staleness)
        self._weights.append(buffered_weight(1, staleness) if public_weight else 0.0)
        self._buffered.append(dispatch.index)

    def _push(self) -> BufferedPush:
        assert self._snapshot is not None
        base = self._snapshot
        ready = [layer for layer, m in self._matrices.items() if m.count]
        delta: dict[str, np.ndarray] = {}
        reasons = list(self._reasons)
        plan = self.fog.plan
        try:  # the staleness-weighted mean, or the plan's robust rule over the buffer's rows
            for layer in ready:
                delta.update(self._matrices[layer].aggregate(plan.aggregation, plan.trim_fraction))
        except ValidationError as exc:  # an installed rule that failed or returned a wrong or non-finite value
            log.error("fog %s: aggregation failed, nothing pushed: %s", self.fog.name, exc)
            reasons.append(f"aggregation: {exc}")
            delta, ready = {}, []
        version = self.fog.push(base, delta, ready, len(self._contributors), reasons) if delta else None
        losses = self._losses
        loss = sum(v * n for v, n in losses) / max(1, sum(n for _, n in losses)) if losses else float("nan")
        return self._pushed(base, version, tuple(ready), delta, reasons, loss, tuple(self._contributors))

    def _push_private(self) -> BufferedPush:
        """Client-level DP: (the sum of the buffer's clipped, discounted updates + N(0, (2zC)^2 I)) / buffer_k over
        every requested layer group, charged to the ledger before it leaves (a replace-one Gaussian release,
        :class:`~hyprstream.fog.dp.ClientDpRounds`); core gets 0 participants and the fixed denominator."""
        from hyprstream.fog.dp import noised_mean

        assert self._snapshot is not None and self.private is not None
        base, private = self._snapshot, self.private
        layers = self.fog.plan.layers or tuple(lt.layers_in(base.table))
        reasons = list(self._reasons)
        version, delta = None, {}
        try:
            delta = noised_mean(private, self._matrices, layers, float(self.buffer_k), len(self._contributors))
            index = len(self.pushes) + 1
            entry = private.charge(index, base.version, f"{self.fog.name}/push-{index}")
            version, _ = private.push(base, delta, layers, float(self.buffer_k), entry, reasons)
        except HyprstreamError as exc:  # BudgetExceeded: spent by another fog of the model meanwhile
            reasons.append(f"not released: {exc}")
            log.warning("fog %s: buffered push not released: %s", self.fog.name, exc)
            delta = {}
        losses = self._losses
        loss = sum(v * n for v, n in losses) / max(1, sum(n for _, n in losses)) if losses else float("nan")
        return self._pushed(base, version, tuple(layers) if delta else (), delta, reasons, loss,
                            tuple(self._contributors))

    def _push_cohort(self) -> BufferedPush:
        """Secure: one SecAgg+ round among the buffered agents, each encoding the delta it holds times its
        public staleness weight; the mean divides by the survivors' sum of weights. Loss and example counts
        stay on the devices."""
        assert self._snapshot is not None and self.secure is not None
        base = self._snapshot
        held = {node: (hold_id, weight) for node, hold_id, weight
                in zip(self._contributors, self._holds, self._weights, strict=True)}
        result = self.secure.finish_round(self.secure.start_cohort(len(self.pushes) + 1, base, held))
        counts = self._counts
        counts["declined"] += result.declined
        counts["refused"] += result.refused
        counts["failed"] += result.failed
        counts["bytes_up"] += result.bytes_up
        counts["bytes_down"] += result.bytes_down
        for node, nbytes in result.uplink.items():
            self._uplink[node] = self._uplink.get(node, 0) + nbytes
        self._idle.extend(self._contributors)  # every agent of the cohort is free again, dropped or not
        # contributors: the cohort, in the order its agents finished; participants: the survivors summed
        return self._pushed(base, result.version, result.layers if result.version is not None else (),
                            result.delta, [*self._reasons, *result.reasons], float("nan"),
                            tuple(self._contributors), participants=len(result.contributors))

    def _pushed(self, base: Snapshot, version: int | None, layers: tuple[str, ...], delta: dict[str, np.ndarray],
                reasons: list[str], loss: float, contributors: tuple[int, ...],
                participants: int | None = None) -> BufferedPush:
        """Record a push, pull the new version and start an empty buffer."""
        counts = self._counts
        record = BufferedPush(
            fog=self.fog.name, index=len(self.pushes) + 1, base_version=base.version, version=version,
            layers=layers, participants=len(contributors) if participants is None else participants,
            contributors=contributors,
            staleness=tuple(self._staleness), weights=tuple(self._weights),
            dispatches=tuple(self._buffered), declined=counts["declined"],
            refused=counts["refused"], failed=counts["failed"], bytes_up=counts["bytes_up"],
            bytes_down=counts["bytes_down"], train_loss=loss,
            sim_time=self._now if self.duration is not None else None,
            seconds=time.monotonic() - self._since, delta=delta, reasons=tuple(reasons), uplink=dict(self._uplink))
        self._since = time.monotonic()
        self.pushes.append(record)
        log.info("fog %s: buffered push %d of %d update(s) (staleness max %d), version %s", self.fog.name,
                 record.index, record.participants, record.max_staleness, version)
        self._snapshot = self.fog.pull()
        self._idle.extend(self._parked)  # private: the buffer's agents, free for the next one
        self._idle.extend(self._resting)  # agents that declined or failed are asked again on the new version
        self._parked, self._resting = [], []
        self._reset_buffer()
        self._check_budget()
        return record


def _check_private(fog: FogAggregator, private, secure, buffer_k: int) -> None:
    """A buffered fog's client-level DP: noise on a mean of plain updates (or the secure runner's own, over each
    cohort), accounted as replace-one pushes, with enough agents to fill a buffer one update each."""
    from hyprstream.fog.aggregate import Aggregation
    from hyprstream.privacy.client_dp import NoisePlacement
    from hyprstream.privacy.config import CLIENT_DP_NEEDS_THE_MEAN

    if secure is not None and private is not secure.dp_rounds:
        raise ValidationError("a secure buffered fog's client-level DP is its secure runner's (dp_rounds)")
    if fog.plan.aggregation is not Aggregation.MEAN:
        raise ValidationError(CLIENT_DP_NEEDS_THE_MEAN)
    if not private.replace_one:
        raise ValidationError("a buffered fog's pushes are accounted as replace-one releases: "
                              "ClientDpRounds(..., replace_one=True)")
    if buffer_k > len(fog.node_ids):
        raise ValidationError(f"with client-level DP a push takes one update per agent: buffer_k {buffer_k} is "
                              f"more than the fog's {len(fog.node_ids)} agents")
    distributed = NoisePlacement(private.config.placement) is NoisePlacement.DISTRIBUTED
    if secure is not None and distributed and private.config.min_clients > buffer_k:
        raise ValidationError(f"distributed noise is split over client_dp.min_clients = {private.config.min_clients} "
                              f"inputs, more than a cohort of buffer_k {buffer_k} holds: no cohort could be released")


def async_versions_per_second(pushes: Sequence[BufferedPush]) -> float:
    """Committed versions per simulated second over a virtual-clock run (0 without pushes)."""
    committed = [p for p in pushes if p.version is not None]
    if not committed or committed[-1].sim_time in (None, 0):
        return 0.0
    return len(committed) / committed[-1].sim_time


__all__ = ["STALENESS_EXPONENT", "BufferedFog", "BufferedPush", "Dispatch", "async_versions_per_second",
           "buffered_weight"]
