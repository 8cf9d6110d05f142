"""Accountants for the Poisson-subsampled Gaussian mechanism (pure math, no I/O).

A mechanism history is a sequence of :class:`GaussianEvent`. Two accountants compose it:

* :class:`PldAccountant` -- the one the ledger uses: privacy loss distributions (dp-accounting's
  ``pld`` package, Koskela et al. / Doroshenko et al. "Connect the Dots"), discretized
  *pessimistically* at :data:`VALUE_DISCRETIZATION_INTERVAL`, so its epsilon is an upper bound on the
  mechanism's true epsilon; events without subsampling (q = 1) compose exactly to one Gaussian, with
  a closed-form epsilon (:func:`gaussian_epsilon`). It is tighter than RDP: 7-17 % lower epsilon for
  the histories devices and fogs run (see docs/privacy.md, "Accountant and ledger").
* :class:`RdpAccountant` -- Renyi DP, below; kept as an independent implementation that tests
  compare with dp-accounting.

Renyi DP. A :class:`GaussianEvent` is ``steps`` applications of the Gaussian
mechanism with noise multiplier z (noise std / L2 sensitivity) on a Poisson sample of rate q. Its
RDP at order alpha is the sum over events of ``steps * RDP_q,z(alpha)``; epsilon at a given delta is
the minimum over orders of the conversion of Balle et al. 2020 (Prop. 12; also Asoodeh et al.)::

    eps = rdp(alpha) + log1p(-1/alpha) - log(delta * alpha) / (alpha - 1)

RDP of one step (Mironov, Talwar & Zhang 2019, "Renyi Differential Privacy of the Sampled Gaussian
Mechanism"):

* q = 1: alpha / (2 z^2);
* integer alpha: log(A_alpha) / (alpha - 1) with A_alpha = sum_k C(alpha, k) (1-q)^(alpha-k) q^k
  exp((k^2 - k) / (2 z^2));
* fractional alpha: the two-sided series of their Section 3.3, summed until its terms are
  negligible.

Both serve the device (sample-level DP-SGD: q = batch / local examples, one event per round) and
the fog (client-level: q = client sampling rate, one step per round). Tests compare both with
Google's ``dp-accounting`` package, its PLD and its RDP accountant.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from dp_accounting.pld import privacy_loss_distribution as pld

# The order grid of dp-accounting's RdpAccountant (and Opacus'), so that figures are comparable; a
# finer grid can only lower epsilon.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024])
_MAX_SERIES_TERMS = 1_000


@dataclass(frozen=True)
class GaussianEvent:
    """``steps`` compositions of the Gaussian mechanism (multiplier ``noise_multiplier``) on a Poisson
    sample of rate ``sample_rate``."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise multiplier must be positive and finite, got {self.noise_multiplier}")
        if not 0 <= self.sample_rate <= 1:
            raise ValueError(f"sample rate must lie in [0, 1], got {self.sample_rate}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {self.steps!r}")


def _log_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    hi, lo = (a, b) if a > b else (b, a)
    return hi + math.log1p(math.exp(lo - hi))


def _log_comb(n: float, k: float) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _log_erfc(x: float) -> float:
    # erfc(x) = 2 * Phi(-x * sqrt(2)); log_ndtr is accurate far into the tail
    from scipy import special  # on first use: scipy.special costs every ClientApp process ~0.2 s at import

    return math.log(2.0) + float(special.log_ndtr(-x * math.sqrt(2.0)))


def _log_a_int(q: float, z: float, alpha: int) -> float:
    log_q, log_1mq = math.log(q), math.log1p(-q)
    total = -math.inf
    for k in range(alpha + 1):
        total = _log_add(total, _log_comb(alpha, k) + k * log_q + (alpha - k) * log_1mq + (k * k - k) / (2 * z * z))
    return total


def _log_a_frac(q: float, z: float, alpha: float) -> float:
    # A_alpha = int_{-inf}^{z0} + int_{z0}^{inf}, each expanded as a binomial series (MTZ19, Sec. 3.3)
    log_q, log_1mq = math.log(q), math.log1p(-q)
    z0 = z * z * math.log(1 / q - 1) + 0.5
    a0 = a1 = -math.inf
    prev0 = prev1 = -math.inf
    for i in range(_MAX_SERIES_TERMS):
        coef = _log_comb(alpha, i)
        j = alpha - i
        s0 = (coef + i * log_q + j * log_1mq + (i * i - i) / (2 * z * z)
              + math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * z)))
        s1 = (coef + j * log_q + i * log_1mq + (j * j - j) / (2 * z * z)
              + math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * z)))
        a0, a1 = _log_add(a0, s0), _log_add(a1, s1)
        total = _log_add(a0, a1)
        if s0 < prev0 and s1 < prev1 and max(s0, s1) < total - 30:
            return total
        prev0, prev1 = s0, s1
    return math.inf  # did not converge: this order is left out (its epsilon is infinite)


@lru_cache(maxsize=4096)
def _rdp_one(q: float, z: float, alpha: float) -> float:
    if q == 0:
        return 0.0
    if q == 1:
        return alpha / (2 * z * z)
    log_a = _log_a_int(q, z, int(alpha)) if float(alpha).is_integer() else _log_a_frac(q, z, alpha)
    return log_a / (alpha - 1)


def rdp_subsampled_gaussian(sample_rate: float, noise_multiplier: float,
                            orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP of one step of the Poisson-subsampled Gaussian mechanism at each order."""
    GaussianEvent(noise_multiplier, sample_rate, 1)  # validates
    return np.array([_rdp_one(float(sample_rate), float(noise_multiplier), float(a)) for a in orders])


def rdp_of(history: Iterable[GaussianEvent], orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """Composed RDP of a mechanism history at each order."""
    total = np.zeros(len(orders))
    for e in history:
        if e.steps:
            total += e.steps * rdp_subsampled_gaussian(e.sample_rate, e.noise_multiplier, orders)
    return total


def epsilon_from_rdp(rdp: Sequence[float], delta: float, orders: Sequence[float] = DEFAULT_ORDERS) -> tuple[float, float]:
    """(epsilon, best order) for ``delta`` from RDP values (Balle et al. 2020 conversion)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if len(rdp) != len(orders):
        raise ValueError("rdp and orders differ in length")
    best, best_order = math.inf, float("nan")
    for a, r in zip(orders, rdp, strict=True):
        if a <= 1.01 or not math.isfinite(r):
            continue
        if r <= 0 or delta * delta + math.expm1(-r) > 0:
            return 0.0, float(a)  # (the second case: delta <= sqrt(1 - exp(-KL)) already)
        eps = r + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
        if eps < best:
            best, best_order = eps, float(a)
    return max(0.0, best), best_order


def rdp_epsilon(history: Iterable[GaussianEvent], delta: float, orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """Epsilon at ``delta`` of a mechanism history by RDP (0 for an empty history)."""
    events = [e for e in history if e.steps and e.sample_rate > 0]
    if not events:
        return 0.0
    return epsilon_from_rdp(rdp_of(events, orders), delta, orders)[0]


class RdpAccountant:
    """An append-only mechanism history with its composed RDP kept up to date."""

    def __init__(self, history: Iterable[GaussianEvent] = (), orders: Sequence[float] = DEFAULT_ORDERS) -> None:
        self.orders = tuple(float(a) for a in orders)
        self.history: list[GaussianEvent] = []
        self._rdp = np.zeros(len(self.orders))
        for e in history:
            self.compose(e)

    def compose(self, event: GaussianEvent) -> None:
        self.history.append(event)
        if event.steps:
            self._rdp += event.steps * rdp_subsampled_gaussian(event.sample_rate, event.noise_multiplier, self.orders)

    def epsilon(self, delta: float) -> float:
        if not np.any(self._rdp > 0):
            return 0.0
        return epsilon_from_rdp(self._rdp, delta, self.orders)[0]

    def epsilon_if(self, event: GaussianEvent, delta: float) -> float:
        """Epsilon after composing ``event``, without composing it."""
        if not event.steps or event.sample_rate == 0:
            return self.epsilon(delta)
        rdp = self._rdp + event.steps * rdp_subsampled_gaussian(event.sample_rate, event.noise_multiplier, self.orders)
        return epsilon_from_rdp(rdp, delta, self.orders)[0]


# PLD: the width of the grid privacy losses are rounded to (pessimistically: up for the
# remove-neighbour's losses, so epsilon stays an upper bound). 1e-3 gives epsilons within 2e-3 of
# 1e-4's (measured at epsilon 7-25) at a tenth of the time and memory.
VALUE_DISCRETIZATION_INTERVAL = 1e-3
_PLD_CACHE_SIZE = 16  # composed histories kept per process (each ~0.5 MB at the interval above)
_PREFIX_LOOKUPS = 8  # how many of a history's longest prefixes are looked up in that cache


# A history's non-subsampled events (q = 1) compose exactly to one Gaussian mechanism of
# mu = sqrt(sum steps / z^2) (Dong, Roth & Su 2019), whose epsilon has a closed form; its PLD is only
# built to compose with subsampled events, and only up to this mu (its grid grows with mu: at 20 it
# spans ~400,000 points; its epsilon alone is then ~200 at delta 1e-5). Beyond, such a mixed
# history's epsilon is reported as infinite -- an upper bound.
_PLD_GAUSSIAN_MU_MAX = 20.0


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon at ``delta`` of the Gaussian mechanism with ``mu`` = sensitivity / noise std (Balle and
    Wang 2018): the least epsilon with ``Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu) <= delta``
    (bisection, returning the upper end: never below it)."""
    if not 0 < delta < 1 or not mu >= 0:
        raise ValueError(f"need mu >= 0 and delta in (0, 1), got mu {mu}, delta {delta}")
    if mu == 0:
        return 0.0

    def excess(eps: float) -> float:  # delta(eps) - delta, decreasing in eps
        from scipy import special

        return float(special.ndtr(mu / 2 - eps / mu) - math.exp(eps + special.log_ndtr(-mu / 2 - eps / mu))) - delta

    lo, hi = 0.0, mu * mu / 2 + mu * math.sqrt(2 * math.log(1 / delta)) + 1.0  # delta(hi) < delta
    if excess(lo) <= 0:
        return 0.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if excess(mid) <= 0 else (mid, hi)
        if hi - lo <= 1e-12 * hi:
            break
    return hi


@lru_cache(maxsize=64)
def _pld():
    """dp-accounting's PLD module, imported on first use: it costs a second or more (scipy.stats), which
    every process that merely imports this module (a ClientApp process per message) would pay."""
    from dp_accounting.pld import privacy_loss_distribution

    return privacy_loss_distribution


def _event_pld(noise_multiplier: float, sample_rate: float, steps: int, interval: float) -> pld.PrivacyLossDistribution:
    """The PLD of one subsampled event: ``steps`` self-compositions of the Poisson-subsampled Gaussian
    (add-or-remove-one neighbours, the relation Poisson sampling amplifies under)."""
    one = _pld().from_gaussian_mechanism(noise_multiplier, pessimistic_estimate=True,
                                      value_discretization_interval=interval, sampling_prob=sample_rate)
    return one.self_compose(steps) if steps > 1 else one


@lru_cache(maxsize=16)
def _gaussian_pld(mu: float, interval: float) -> pld.PrivacyLossDistribution:
    return _pld().from_gaussian_mechanism(1.0 / mu, pessimistic_estimate=True, value_discretization_interval=interval)


class _ComposedCache:
    """Composed PLDs of recent histories, shared by the accountants of one process: a ledger is
    re-read from its store on every use, and re-composing a long history costs a convolution per
    event. Keyed by (interval, history); the newest ``size`` are kept."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[float, tuple[GaussianEvent, ...]], pld.PrivacyLossDistribution] = OrderedDict()

    def get(self, key: tuple[float, tuple[GaussianEvent, ...]]) -> pld.PrivacyLossDistribution | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
            return hit

    def put(self, key: tuple[float, tuple[GaussianEvent, ...]], value: pld.PrivacyLossDistribution) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


_COMPOSED = _ComposedCache(_PLD_CACHE_SIZE)


def _charged(e: GaussianEvent) -> bool:
    """Whether ``e`` spends anything (steps > 0 and q > 0)."""
    return bool(e.steps) and e.sample_rate > 0


def _history_pld(events: tuple[GaussianEvent, ...], interval: float) -> pld.PrivacyLossDistribution:
    """The composed PLD of ``events`` (all charged and subsampled): from the cache, or from its longest
    recent prefix there, composing the rest; a run of equal (z, q) events is composed as one
    self-composition."""
    start, composed = 0, _pld().identity(value_discretization_interval=interval)
    for k in range(len(events), max(0, len(events) - _PREFIX_LOOKUPS), -1):
        hit = _COMPOSED.get((interval, events[:k]))
        if hit is not None:
            start, composed = k, hit
            break
    i = start
    while i < len(events):
        j, steps = i, 0
        while j < len(events) and (events[j].noise_multiplier, events[j].sample_rate) == (
                events[i].noise_multiplier, events[i].sample_rate):
            steps += events[j].steps
            j += 1
        composed = composed.compose(_event_pld(events[i].noise_multiplier, events[i].sample_rate, steps, interval))
        i = j
    if start < len(events):
        _COMPOSED.put((interval, events), composed)
    return composed


def _pld_epsilon(mu2: float, subsampled: pld.PrivacyLossDistribution | None, delta: float, interval: float) -> float:
    """Epsilon at ``delta`` of a Gaussian of mu = sqrt(mu2) composed with the PLD of the subsampled events."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if subsampled is None:
        return gaussian_epsilon(math.sqrt(mu2), delta)
    if mu2 > 0:
        mu = math.sqrt(mu2)
        if mu > _PLD_GAUSSIAN_MU_MAX:
            return math.inf
        subsampled = subsampled.compose(_gaussian_pld(mu, interval))
    return max(0.0, float(subsampled.get_epsilon_for_delta(delta)))


def epsilon(history: Iterable[GaussianEvent], delta: float, interval: float = VALUE_DISCRETIZATION_INTERVAL) -> float:
    """Epsilon at ``delta`` of a mechanism history as the ledger accounts it (PLD; 0 for an empty
    history)."""
    return PldAccountant(history, interval).epsilon(delta)


class PldAccountant:
    """An append-only mechanism history accounted by PLD; the interface of :class:`RdpAccountant`.

    Non-subsampled events (q = 1) are kept as one Gaussian (exact; closed-form epsilon when they are
    all there is). The PLD of the subsampled events is built on first use (from the process's cache
    of recent histories where it can) and then kept up to date one convolution per composed event;
    ``epsilon_if`` keeps its composition so that charging the same event next costs nothing more.
    """

    def __init__(self, history: Iterable[GaussianEvent] = (),
                 interval: float = VALUE_DISCRETIZATION_INTERVAL) -> None:
        if not 0 < interval < 1:
            raise ValueError(f"value discretization interval must lie in (0, 1), got {interval}")
        self.interval = interval
        self.history: list[GaussianEvent] = []
        self._mu2 = 0.0  # sum of steps / z^2 over the non-subsampled events
        self._subsampled: list[GaussianEvent] = []
        self._pld: pld.PrivacyLossDistribution | None = None
        self._pending: tuple[GaussianEvent, pld.PrivacyLossDistribution] | None = None
        for e in history:
            self.compose(e)

    def _composed(self) -> pld.PrivacyLossDistribution | None:
        if not self._subsampled:
            return None
        if self._pld is None:
            self._pld = _history_pld(tuple(self._subsampled), self.interval)
        return self._pld

    def _with(self, event: GaussianEvent) -> pld.PrivacyLossDistribution:
        if self._pending is not None and self._pending[0] == event:
            return self._pending[1]
        before = self._composed()
        one = _event_pld(event.noise_multiplier, event.sample_rate, event.steps, self.interval)
        after = before.compose(one) if before is not None else one
        self._pending = (event, after)
        return after

    def compose(self, event: GaussianEvent) -> None:
        self.history.append(event)
        if not _charged(event):
            return
        if event.sample_rate == 1:
            self._mu2 += event.steps / event.noise_multiplier ** 2
            return
        after = self._with(event) if self._pld is not None else None
        self._subsampled.append(event)
        self._pending = None  # (it was composed onto the history before this event)
        if after is not None:
            self._pld = after
            _COMPOSED.put((self.interval, tuple(self._subsampled)), after)

    def epsilon(self, delta: float) -> float:
        if not self._subsampled and self._mu2 == 0:
            return 0.0
        return _pld_epsilon(self._mu2, self._composed(), delta, self.interval)

    def epsilon_if(self, event: GaussianEvent, delta: float) -> float:
        """Epsilon after composing ``event``, without composing it."""
        if not _charged(event):
            return self.epsilon(delta)
        if event.sample_rate == 1:
            return _pld_epsilon(self._mu2 + event.steps / event.noise_multiplier ** 2, self._composed(), delta,
                                self.interval)
        return _pld_epsilon(self._mu2, self._with(event), delta, self.interval)


__all__ = [
    "DEFAULT_ORDERS",
    "VALUE_DISCRETIZATION_INTERVAL",
    "GaussianEvent",
    "PldAccountant",
    "RdpAccountant",
    "epsilon",
    "epsilon_from_rdp",
    "gaussian_epsilon",
    "rdp_epsilon",
    "rdp_of",
    "rdp_subsampled_gaussian",
]
