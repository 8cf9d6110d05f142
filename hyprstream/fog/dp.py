"""Client-level DP at the fog: the bookkeeping every private round shares, and plain rounds with central noise.

:class:`ClientDpRounds` is what a client-level DP round needs around its aggregate, whichever way the sum
was formed: the Poisson sample (at ``client_sampling_rate``, or at each agent's telemetry rate), the
model's budget checked before anything is drawn, the charge to the privacy ledger before the release
leaves the fog, the privacy record that travels with the push (the fixed denominator, never the realised
count), and the binding of the ledger entry to the version core commits. :class:`SecureFogAggregator
<hyprstream.fog.secure.SecureFogAggregator>` uses it over the SecAgg+ sum; :class:`PrivateFogAggregator`
over a plain round's sum; a buffered fog (:class:`~hyprstream.fog.buffered.BufferedFog` with ``private``)
over each push's sum, accounted as a replace-one release (``ClientDpRounds(replace_one=True)``).

:class:`PrivateFogAggregator` is DP-FedAvg with a trusted fog (McMahan et al. 2018; Flower's
``DifferentialPrivacyServerSideFixedClipping``): the fog receives each agent's delta, clips it to L2 norm
C over all its layer groups, sums the clipped deltas (a group an agent did not train counts as zeros),
adds N(0, (z C)^2 I) and divides by the fixed expected count D. Adding or removing one agent moves the
un-noised sum by at most C, so the released mean is the subsampled Gaussian mechanism the ledger charges.
The adversary is core and everything downstream: the fog sees each clipped update (with SecAgg+ it sees
only the sum; docs/privacy.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hyprstream.errors import HyprstreamError, ValidationError
from hyprstream.fog.aggregate import Aggregation, UpdateMatrix, UpdateSum
from hyprstream.fog.aggregator import FogAggregator, FogRound, Gathered, PendingRound, WrappedFog
from hyprstream.fog.selection import Sampling
from hyprstream.privacy.accountant import GaussianEvent, PldAccountant
from hyprstream.privacy.client_dp import ClientDP, NoisePlacement
from hyprstream.privacy.clipping import Layout
from hyprstream.privacy.config import (CLIENT_DP_DISTRIBUTED_NEEDS_SECAGG, CLIENT_DP_NEEDS_CLIP,
                                       CLIENT_DP_NEEDS_THE_MEAN, ClientDpConfig)
from hyprstream.privacy.errors import PrivacyViolation
from hyprstream.privacy.ledger import Charge, Entry, PrivacyLedger, Scope, check_budget
from hyprstream.privacy.noise import RandomSource, SecureRandom
from hyprstream.store import layer_table as lt

log = logging.getLogger("hyprstream.privacy")

class ClientDpRounds:
    """The client-level DP bookkeeping of one fog's rounds (see the module docstring). ``clip``: the L2
    bound of one agent's contribution; ``ledger``: the model's privacy ledger (without one the spend is
    accounted and enforced in memory only).

    ``replace_one``: the releases are a buffered fog's pushes (:class:`~hyprstream.fog.buffered.BufferedFog`),
    each the sum of a fixed number of updates, at most one per agent: one agent's data replaced moves the sum
    by at most 2C, nothing is sampled, so each push is charged as the Gaussian mechanism at rate 1 and its
    noise is z times that sensitivity (N(0, (2zC)^2))."""

    def __init__(self, fog: FogAggregator, config: ClientDpConfig, clip: float, *,
                 ledger: PrivacyLedger | None = None, source: RandomSource | None = None,
                 replace_one: bool = False) -> None:
        self.fog = fog
        self.config = config
        self.clip = clip
        self.replace_one = replace_one
        self.ledger = ledger
        self.source = source or SecureRandom()
        self._memory = PldAccountant() if ledger is None else None
        # ledger entries of released rounds whose push core has not answered yet: push seq -> entry seq
        self._unbound: dict[int, int] = {}
        self._bound: dict[int, Entry] = {}  # bound while their push was being sent (read back by push)
        self._sending: int | None = None  # the seq push is sending now
        if ledger is not None:
            fog.on_delivery(self._bind)
        else:
            log.warning("fog %s: client-level DP without a privacy ledger: the spend is not durable", fog.name)

    @property
    def model(self) -> str:
        return self.fog.model

    @property
    def sensitivity(self) -> float:
        """How far one agent moves the sum: C (added or removed), 2C (its update replaced; ``replace_one``)."""
        return 2.0 * self.clip if self.replace_one else self.clip

    @property
    def rate(self) -> float:
        """The sampling rate charged: ``client_sampling_rate``, or 1 for pushes (nothing is sampled)."""
        return 1.0 if self.replace_one else self.config.client_sampling_rate

    def dp(self, expected: float) -> ClientDP:
        """The mechanism of a round whose mean divides by ``expected`` (the expected number of participants,
        fixed before the sample is drawn; never below one)."""
        c = self.config
        return ClientDP(clip=self.sensitivity, noise_multiplier=c.noise_multiplier, placement=c.placement,
                        min_clients=c.min_clients, denominator=max(1.0, expected))

    def sample(self, nodes: tuple[int, ...], sampling: Sampling | None) -> tuple[tuple[int, ...], float]:
        """The Poisson sample of ``nodes`` and the mean's denominator: each agent with rate q
        (``client_sampling_rate``) over the fog's agents, or with its own rate from a telemetry selection
        (``sampling``: every rate at most q, the rate charged)."""
        q = self.config.client_sampling_rate
        if sampling is None:
            rates, expected = dict.fromkeys(nodes, q), q * len(self.fog.node_ids)
            if q >= 1:
                return nodes, expected
        else:
            rates, expected = sampling.rates, sampling.expected
            over = {n: p for n, p in rates.items() if not 0 <= p <= q}
            if over:
                raise PrivacyViolation(f"inclusion rates above the charged rate {q}: {over}")
        draws = self.source.uniform(len(nodes))
        return tuple(n for n, u in zip(nodes, draws, strict=True) if u < rates.get(n, 0.0)), expected

    def event(self) -> GaussianEvent:
        return GaussianEvent(self.config.noise_multiplier, self.rate, 1)

    def check_budget(self, what: str) -> float:
        """The model's epsilon after one more round; raises BudgetExceeded when over the budget."""
        budget = self.config.budget
        if self.ledger is not None:
            return self.ledger.check(Scope.MODEL, self.model, self.event(), budget, what)
        spent, would_be = self._memory.epsilon(budget.delta), self._memory.epsilon_if(self.event(), budget.delta)
        check_budget(spent, would_be, budget, what)
        return would_be

    def check_next(self, base, layers: Sequence[str], expected: float, what: str) -> None:
        """Refuse (``PrivacyViolation``, ``BudgetExceeded`` among them) a release that the budget cannot pay for
        or that core's norm bound would refuse (its noise over ``layers`` of ``base``, divided by ``expected``),
        before anything is drawn or charged."""
        self.check_budget(what)
        dim = sum(int(np.prod(s)) for s in lt.select_layers(base.table, layers).column("shape").to_pylist())
        self.dp(expected).check_bound(self.fog.core_bound, dim, what)

    def spent(self) -> float:
        """The model's client-level epsilon so far at the budget's delta."""
        if self.ledger is not None:
            return self.ledger.spent(Scope.MODEL, self.model, self.config.delta)
        return self._memory.epsilon(self.config.delta)

    def mechanism(self) -> str:
        return f"client-gaussian-{self.config.placement.value}" + ("-replace-one" if self.replace_one else "")

    def charge(self, round_no: int, base_version: int, group_id: str) -> Entry | None:
        """Charge one round, before its release leaves the fog (a crash from here on can only over-count)."""
        if self.ledger is not None:
            return self.ledger.charge(
                Scope.MODEL, self.model,
                Charge(self.event(), model=self.model, base_version=base_version, round=group_id,
                       mechanism=self.mechanism(), unit="device"),
                self.config.budget)
        self.check_budget(f"round {round_no} of {self.model}")
        self._memory.compose(self.event())
        return None

    def push(self, base, delta: dict[str, np.ndarray], layers: Sequence[str], expected: float, entry: Entry | None,
             reasons: list[str], *, transcript: str | None = None) -> tuple[int | None, Entry | None]:
        """Push a released mean through the fog's durable outbox with its privacy record (the realised count
        is not released: core gets 0 participants and the fixed denominator); the ledger entry is bound to
        the version core commits, whenever that happens."""
        c = self.config
        spent = entry.epsilon if entry is not None else self._memory.epsilon(c.delta)
        privacy = {"epsilon": spent, "delta": c.delta, "noise_multiplier": c.noise_multiplier,
                   "sample_rate": self.rate, "clip": self.clip, "sensitivity": self.sensitivity,
                   "expected_participants": self.dp(expected).denominator}
        seq = self.fog.next_seq()
        if entry is not None:
            self._unbound[seq] = entry.seq
        self._sending = seq
        try:
            version = self.fog.push(base, delta, layers, 0, reasons, privacy=privacy, transcript_sha256=transcript,
                                    seq=seq)
        finally:
            self._sending = None
        return version, self._bound.pop(seq, entry)

    def _bind(self, delivery) -> None:
        """Bind the ledger entry of a delivered push to the version core made of it. A push core refused,
        or one it had applied already (its answer was lost), stays charged and unbound: the ledger may
        over-count, never under-count."""
        entry_seq = self._unbound.pop(delivery.push.seq, None)
        if entry_seq is None or delivery.result is None or self.ledger is None:
            return
        bound = self.ledger.bind(entry_seq, delivery.result.version)
        if delivery.push.seq == self._sending:
            self._bound[delivery.push.seq] = bound


@dataclass
class PendingDpRound:
    inner: PendingRound
    expected: float  # the mean's fixed denominator
    aborted: str = ""  # why the round did not start

    # what the round engine's callers read of a pending round
    base = property(lambda self: self.inner.base)
    round = property(lambda self: self.inner.round)
    layers = property(lambda self: self.inner.layers)
    nodes = property(lambda self: self.inner.nodes)


@dataclass(frozen=True)
class DpRoundInfo:
    """What a private plain round adds to its ``FogRound``: the ledger entry it charged (None: in memory)."""

    privacy: Entry | None


class PrivateFogAggregator(WrappedFog):
    """A :class:`FogAggregator` whose rounds release a client-level DP mean with central noise (see the
    module docstring); the same interface as the fog (``start_round`` / ``finish_round`` / ``run_round``)."""

    def __init__(self, fog: FogAggregator, client_dp: ClientDpConfig, *, ledger: PrivacyLedger | None = None,
                 source: RandomSource | None = None) -> None:
        if client_dp.placement is NoisePlacement.DISTRIBUTED:
            raise ValidationError(CLIENT_DP_DISTRIBUTED_NEEDS_SECAGG)
        if client_dp.clip is None:
            raise ValidationError(CLIENT_DP_NEEDS_CLIP)
        if fog.plan.aggregation is not Aggregation.MEAN:
            raise ValidationError(CLIENT_DP_NEEDS_THE_MEAN)
        self.fog = fog
        self.client_dp = client_dp
        self.rounds = ClientDpRounds(fog, client_dp, client_dp.clip, ledger=ledger, source=source)
        self.last: DpRoundInfo | None = None

    def spent(self) -> float:
        return self.rounds.spent()

    def start_round(self, round_no: int, base=None, nodes: Sequence[int] | None = None,
                    sampling: Sampling | None = None) -> PendingDpRound:
        """Sample (at ``client_sampling_rate``, or at a telemetry ``sampling``'s rates), check the budget and
        core's norm bound against the noise, then send the train requests of round ``round_no``."""
        fog = self.fog
        base = base if base is not None else fog.pull()
        nodes = tuple(fog.node_ids if nodes is None else nodes)
        unknown = set(nodes) - set(fog.node_ids)
        if unknown:
            raise ValidationError(f"fog {fog.name!r} has no agents {sorted(unknown)}")
        sampled, expected = self.rounds.sample(nodes, sampling)
        aborted = ""
        try:
            self.rounds.check_next(base, fog.plan.layers or tuple(lt.layers_in(base.table)), expected,
                                   f"round {round_no} of {fog.model}")
        except PrivacyViolation as exc:  # BudgetExceeded among them
            aborted, sampled = str(exc), ()
            log.warning("fog %s round %d: private round not started: %s", fog.name, round_no, exc)
        return PendingDpRound(fog.start_round(round_no, base, sampled), expected, aborted)

    def finish_round(self, pending: PendingDpRound) -> FogRound:
        """Collect and check the replies, clip each to C, sum, noise, divide by D, charge, push."""
        fog, inner = self.fog, pending.inner
        self.last = None
        if pending.aborted:
            return fog.outcome(inner, fog.gather(inner), None, {}, [f"private round not started: {pending.aborted}"])
        gathered = fog.gather(inner, clip=self.rounds.clip)
        reasons: list[str] = []
        version, delta = None, {}
        # A started round releases whatever arrived, however few (none: the noise alone, over the same D):
        # releasing only above a count would make the release itself depend on who took part, unaccounted.
        try:
            delta = self._release(pending, gathered)
            entry = self.rounds.charge(inner.round, inner.base.version, f"{fog.name}/round-{inner.round}")
            version, entry = self.rounds.push(inner.base, delta, inner.layers, pending.expected, entry, reasons)
            self.last = DpRoundInfo(entry)
        except HyprstreamError as exc:  # BudgetExceeded: spent since the round started
            reasons.append(f"not released: {exc}")
            log.warning("fog %s round %d: not released: %s", fog.name, inner.round, exc)
            delta = {}
        return fog.outcome(inner, gathered, version, delta, reasons)

    def run_round(self, round_no: int, base=None, nodes: Sequence[int] | None = None,
                  sampling: Sampling | None = None) -> FogRound:
        return self.finish_round(self.start_round(round_no, base, nodes, sampling))

    def _release(self, pending: PendingDpRound, gathered: Gathered) -> dict[str, np.ndarray]:
        return noised_mean(self.rounds, gathered.matrices, pending.inner.layers, pending.expected,
                           len(gathered.contributors))


def noised_mean(rounds: ClientDpRounds, matrices: Mapping[str, UpdateMatrix | UpdateSum], layers: Sequence[str],
                expected: float, inputs: int) -> dict[str, np.ndarray]:
    """(the weighted sum of the clipped deltas in ``matrices`` + N(0, (z S)^2 I)) / D over every parameter of
    ``layers``, S the rounds' sensitivity and D ``expected``, in the layout's (sorted) order; a layer group no
    contributor trained sums to zero (its release is noise alone)."""
    sums: dict[str, np.ndarray] = {}
    for layer in layers:
        updates = matrices[layer]
        total = updates.total_weight  # each clipped delta counts with its weight (1, or a staleness weight)
        mean = updates.mean() if updates.count else {}
        for name, shape in updates.shapes.items():
            sums[name] = mean[name].astype(np.float64) * total if updates.count else np.zeros(shape)
    layout = Layout.of({name: value.shape for name, value in sums.items()})
    released = rounds.dp(expected).release(layout.flatten(sums), inputs, rounds.source)
    return layout.unflatten(released, np.float32)
