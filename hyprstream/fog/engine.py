"""The fog's round engine: the one place where rounds are scheduled, for the deployed fog and the simulator.

A round is a pipeline of stages over one fog's agents::

    select -> sample -> request -> collect and check -> aggregate -> noise -> push

=====================  =====================================================================================
stage                  where it is done
=====================  =====================================================================================
select                 :meth:`Lane.choose`: the agents that may train (the caller's candidates; with a
                       ``[fleet]`` view, :class:`~hyprstream.fog.selection.RoundSelector`'s rules)
sample                 client-level DP's Poisson sample (:meth:`ClientDpRounds.sample
                       <hyprstream.fog.dp.ClientDpRounds.sample>`, at the selection's rates)
request                ``start_round`` of the lane's runner: one train request per agent, the same weights
collect and check      ``finish_round`` (sync) or :meth:`BufferedFog.step <hyprstream.fog.buffered.BufferedFog.step>`:
                       every reply checked by :meth:`FogAggregator.check_reply
                       <hyprstream.fog.aggregator.FogAggregator>` (status, version, layers, names, shapes,
                       finiteness, norm bound) or by the SecAgg+ stages
aggregate              plain or robust (:mod:`hyprstream.fog.aggregate`), or secure (SecAgg+)
noise                  client-level DP on the secure sum or the fog's clipped sum
                       (:class:`~hyprstream.privacy.client_dp.ClientDP`)
push                   :meth:`FogAggregator.push <hyprstream.fog.aggregator.FogAggregator.push>`, through
                       the durable outbox, with one sequence number per push
=====================  =====================================================================================

Two schedulers drive those stages, and nothing else loops over rounds:

- :func:`run_sync` -- rounds. Every lane's requests of a round are sent before any lane's replies are
  collected, so the fogs that share one grid (the simulator) have their rounds in flight at once and all
  start from the version current when the round began; the deployed fog is the case of one lane.
- :func:`run_buffered` -- FedBuff. The fog whose next completion is earliest is stepped (a virtual clock
  in the simulator, real time in a deployment, where there is one fog).

Which runner a fog's rounds go through (plain, or secure with client-level DP) is decided once, by
:func:`round_runner`.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hyprstream.errors import ValidationError
from hyprstream.fog.aggregator import FogAggregator, FogRound
from hyprstream.fog.buffered import BufferedFog, BufferedPush
from hyprstream.fog.dp import ClientDpRounds, PrivateFogAggregator
from hyprstream.fog.secure import SecureFogAggregator
from hyprstream.fog.selection import RoundSelector, Sampling
from hyprstream.privacy.config import ClientDpConfig, SecAggConfig
from hyprstream.privacy.ledger import PrivacyLedger
from hyprstream.privacy.noise import RandomSource
from hyprstream.store import Store

log = logging.getLogger("hyprstream.fog")

Runner = FogAggregator | SecureFogAggregator | PrivateFogAggregator


def round_runner(fog: FogAggregator, secagg: SecAggConfig | None, client_dp: ClientDpConfig | None = None, *,
                 ledger: PrivacyLedger | None = None, source: RandomSource | None = None,
                 poll_s: float | None = None) -> Runner:
    """What runs ``fog``'s rounds: the fog itself; with secure aggregation configured, the fog wrapped in
    SecAgg+ (and client-level DP with ``client_dp``); with client-level DP alone, plain rounds whose clipped
    sum the fog noises (:class:`~hyprstream.fog.dp.PrivateFogAggregator`). The spend is charged to
    ``ledger`` (in memory without one). ``source``: the randomness of the protocol and the noise (default:
    the operating system's; seeded only in simulations)."""
    if secagg is None:
        if client_dp is not None:
            return PrivateFogAggregator(fog, client_dp, ledger=ledger, source=source)
        return fog
    options = {} if poll_s is None else {"poll_s": poll_s}
    return SecureFogAggregator(fog, secagg, client_dp, ledger=ledger, source=source, **options)


def buffered_privacy(runner: Runner) -> ClientDpRounds | None:
    """What a buffered fog over ``runner``'s fog releases with client-level DP: the private (or secure) runner's
    bookkeeping, its pushes accounted as replace-one releases (:class:`~hyprstream.fog.dp.ClientDpRounds`);
    None without client-level DP."""
    rounds = runner.rounds if isinstance(runner, PrivateFogAggregator) else \
        runner.dp_rounds if isinstance(runner, SecureFogAggregator) else None
    if rounds is not None:
        rounds.replace_one = True
    return rounds


def open_ledger(path: Path) -> PrivacyLedger:
    """The model's client-level privacy ledger kept in the store at ``path`` (created when missing); the
    caller closes ``ledger.store`` when the fog stops."""
    store = Store.open(path, create=True)
    try:
        return PrivacyLedger(store)
    except BaseException:
        store.close()
        raise


@dataclass
class Lane:
    """One fog's stages: its runner, and its selection when the fog has a ``[fleet]`` view.

    ``devices``: the fog's agents as the last device query answered (what selection ranks)."""

    runner: Runner
    selector: RoundSelector | None = None
    devices: Mapping[int, object] = field(default_factory=dict)
    _sampling: Sampling | None = field(default=None, repr=False)

    @property
    def fog(self) -> FogAggregator:
        return self.runner if isinstance(self.runner, FogAggregator) else self.runner.fog

    @property
    def client_dp(self) -> ClientDpConfig | None:
        return None if isinstance(self.runner, FogAggregator) else self.runner.client_dp

    def choose(self, round_no: int, candidates: Sequence[int] | None) -> tuple[int, ...]:
        """Select: the agents asked to train in round ``round_no``, out of ``candidates`` (None: all the fog's
        agents). With a selector, its rules choose; with client-level DP too, every agent gets an inclusion
        rate from telemetry (independent of private data) and the sample is drawn at those rates."""
        nodes = tuple(self.fog.node_ids if candidates is None else candidates)
        self._sampling = None
        if self.selector is None:
            return nodes
        wanted = set(nodes)
        devices = {n: d for n, d in self.devices.items() if n in wanted}
        dp = self.client_dp
        if dp is not None and self.selector.count > 0:
            self._sampling = self.selector.rates(devices, dp.client_sampling_rate)
            return tuple(n for n, p in self._sampling.rates.items() if p > 0)
        return tuple(self.selector.choose(devices, round_no))

    def start(self, round_no: int, nodes: Sequence[int]):
        """Sample and request: round ``round_no`` sent to ``nodes`` (from :meth:`choose`), on the model's
        current version."""
        if self._sampling is not None:
            return self.runner.start_round(round_no, nodes=tuple(nodes), sampling=self._sampling)
        return self.runner.start_round(round_no, nodes=tuple(nodes))

    def finish(self, pending) -> FogRound:
        """Collect and check, aggregate, noise, push."""
        result = self.runner.finish_round(pending)
        if self._sampling is not None and self.selector is not None:
            self.selector.record(self.devices, result.nodes)
        return result

    def spent(self) -> float | None:
        """Client-level epsilon the model has spent (None without client-level DP)."""
        return None if isinstance(self.runner, FogAggregator) else self.runner.spent()


# prepare(round) -> each lane's candidate agents (None: all of the lane's agents), or None to stop
Prepare = Callable[[int], Sequence[Sequence[int] | None] | None]


def run_sync(lanes: Sequence[Lane], *, rounds: int, prepare: Prepare | None = None,
             on_round: Callable[[int, object, FogRound], None] | None = None,
             on_step: Callable[[int, list[FogRound]], None] | None = None,
             stop: threading.Event | None = None, pause_s: float = 0.0,
             idle_wait_s: float | None = None) -> list[FogRound]:
    """Synchronous rounds over ``lanes`` until ``rounds`` rounds ran (0: until ``stop``); returns them all.

    For each round: ``prepare(round)`` (the fleet of this round, or None to stop); every lane selects and
    sends its requests; then each lane, in order, collects, aggregates and pushes, and ``on_round(lane index,
    pending, result)`` sees the outcome; ``on_step(round, results)`` closes the round. When no lane has an
    agent to ask and ``idle_wait_s`` is set, the round is not run: the scheduler waits that long and asks
    again (a deployed fog whose agents are all offline or excluded); without it the round runs empty (the
    simulator's step passes with nobody training). ``pause_s``: rest between rounds."""
    stop = stop or threading.Event()
    done: list[FogRound] = []
    round_no = 0
    while not stop.is_set() and (rounds == 0 or round_no < rounds):
        round_no += 1
        candidates = [None] * len(lanes) if prepare is None else prepare(round_no)
        if candidates is None:
            break
        chosen = [lane.choose(round_no, c) for lane, c in zip(lanes, candidates, strict=True)]
        if idle_wait_s is not None and not any(chosen):
            reasons = sorted({r for lane in lanes if lane.selector is not None
                              for r in lane.selector.last.excluded.values()})
            log.warning("fog %s: no eligible agent for round %d (%s)", ", ".join(lane.fog.name for lane in lanes),
                        round_no, "; ".join(reasons))
            round_no -= 1
            stop.wait(idle_wait_s)
            continue
        pending = [lane.start(round_no, nodes) for lane, nodes in zip(lanes, chosen, strict=True)]
        results = []
        for i, (lane, p) in enumerate(zip(lanes, pending, strict=True)):
            result = lane.finish(p)
            results.append(result)
            if on_round is not None:
                on_round(i, p, result)
        done.extend(results)
        if on_step is not None:
            on_step(round_no, results)
        if pause_s:
            stop.wait(pause_s)
    return done


def run_buffered(fogs: Sequence[BufferedFog], *, max_pushes: int, sim_until: float | None = None,
                 stop: threading.Event | None = None,
                 on_push: Callable[[BufferedPush], None] | None = None) -> list[BufferedPush]:
    """Buffered (FedBuff) operation of ``fogs`` until ``max_pushes`` pushes were made over all of them, the
    simulated time passes ``sim_until``, ``stop`` is set or every fog has :attr:`~BufferedFog.finished` (its
    client-level DP budget spent); returns the pushes in the order they were made.

    The fog whose next completion is earliest is stepped (ties: the earlier fog in ``fogs``), so with a
    virtual clock pushes reach core in simulated-time order; ``on_push`` sees each push as it is made."""
    if max_pushes < 1:
        raise ValidationError(f"max_pushes must be >= 1, got {max_pushes}")
    done: list[BufferedPush] = []
    while len(done) < max_pushes and not (stop is not None and stop.is_set()):
        fog = min(fogs, key=lambda b: b.next_time)  # min keeps the first of equal times
        if fog.next_time == math.inf:  # every fog finished (client-level DP: the budget is spent)
            log.warning("buffered rounds end: %s", "; ".join(f"{b.fog.name}: {b.finished}" for b in fogs))
            break
        if sim_until is not None and fog.next_time > sim_until:
            break
        for push in fog.step(stop):
            done.append(push)
            if on_push is not None:
                on_push(push)
    return done


__all__ = ["Lane", "Runner", "buffered_privacy", "open_ledger", "round_runner", "run_buffered", "run_sync"]
