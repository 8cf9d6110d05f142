"""Choosing the agents of a round from the fleet view (pure functions, no I/O).

:func:`select_agents` takes the agents connected to the fog (their ``query.device`` answers, by Flower
node ID), the fleet view's snapshot (:meth:`hyprstream.fog.fleet.FleetView.devices`) and recent
participation counts, and returns a :class:`Selection`: the chosen node IDs, best first, and the
reason for every agent left out.

Excluded (never chosen): a device whose status is ``offline``; one in the ``minimal`` strategy (or
whose policy does not accept training); one whose privacy budget is spent (telemetry's
``privacy.budget_spent``); one on battery below ``min_battery_percent``.

The others are ranked by a weighted sum of scores in [0, 1] (:func:`score`):

* ``resources``: mean of free CPU, free memory and free GPU (0 without a GPU);
* ``battery``: 1 on AC power or without a battery, else the charge;
* ``fairness``: ``1 / (1 + n)`` for ``n`` participations in the recent rounds counted by the caller
  (:class:`Participation` keeps them over a window of rounds);
* ``freshness``: ``1 - age / stale_after_s`` of the latest telemetry, 0 when older;
* ``data``: the device's data bucket (from ``query.device``: its size to within a factor of two)
  relative to the largest any candidate has.

A device without telemetry (or with telemetry older than ``stale_after_s``) is not excluded: it is
ranked on what ``query.device`` told (its data) and fairness, with the neutral 0.5 for resources and
battery, and 0 for freshness. Ties are broken by a random order drawn from ``seed``, so a selection
is deterministic for a seed.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from hyprstream.telemetry.records import Strategy
from hyprstream.telemetry.records import DeviceState
from hyprstream.config import Checked, setting
from hyprstream.errors import ValidationError
from hyprstream.fog.fleet import DeviceView
from hyprstream.protocol import DeviceInfo

NEUTRAL = 0.5  # resources and battery of a device that sent no (fresh) telemetry


@dataclass(frozen=True)
class SelectionWeights(Checked):
    resources: float = setting(1.0, ge=0.0, doc="weight of free CPU, memory and GPU")
    battery: float = setting(1.0, ge=0.0, doc="weight of battery charge (AC power counts as full)")
    fairness: float = setting(2.0, ge=0.0, doc="weight of 1 / (1 + recent participations)")
    freshness: float = setting(0.5, ge=0.0, doc="weight of the telemetry's freshness")
    data: float = setting(0.5, ge=0.0, doc="weight of the device's data bucket relative to the largest")

    def check(self):
        if not any((self.resources, self.battery, self.fairness, self.freshness, self.data)):
            yield "fairness", "at least one selection weight must be > 0"


@dataclass(frozen=True)
class SelectionRules:
    weights: SelectionWeights = field(default_factory=SelectionWeights)
    stale_after_s: float = 300.0  # telemetry older than this counts as none
    min_battery_percent: float = 20.0  # on battery below this: excluded

    def __post_init__(self) -> None:
        if not self.stale_after_s > 0:
            raise ValidationError(f"stale_after_s must be > 0, got {self.stale_after_s}")
        if not 0 <= self.min_battery_percent <= 100:
            raise ValidationError(f"min_battery_percent must be in [0, 100], got {self.min_battery_percent}")


@dataclass(frozen=True)
class Selection:
    chosen: tuple[int, ...]  # node IDs, best first
    excluded: dict[int, str]  # node ID -> why it was not eligible
    scores: dict[int, float]  # every eligible node's score (chosen or not)


def exclusion(view: DeviceView | None, rules: SelectionRules) -> str | None:
    """Why the device may not train now (None: it may)."""
    if view is None:
        return None
    if view.state is DeviceState.OFFLINE:
        return "offline"
    t = view.telemetry
    if t is None:
        return None
    if t.strategy.current is Strategy.MINIMAL or not t.strategy.accept_training:
        return f"strategy {t.strategy.current.value}: does not train"
    p = t.privacy
    if p.budget_spent:
        return f"privacy budget spent (epsilon budget {p.epsilon_budget:.3g})"
    r = t.resources
    if r.on_ac_power is not True and r.battery_percent is not None and r.battery_percent < rules.min_battery_percent:
        return f"battery {r.battery_percent:.0f}% below {rules.min_battery_percent:.0f}%"
    return None


def score(view: DeviceView | None, *, participations: int, data_share: float, now: float,
          rules: SelectionRules) -> float:
    """The ranking score of an eligible device (higher is better)."""
    w = rules.weights
    resources = battery = NEUTRAL
    freshness = 0.0
    age = view.age(now) if view is not None else None
    if view is not None and view.telemetry is not None and age is not None and age < rules.stale_after_s:
        r = view.telemetry.resources
        gpu = 0.0
        if r.gpu is not None:
            gpu = 1.0 - r.gpu.util_percent / 100.0
        resources = ((100.0 - r.cpu_percent) / 100.0 + (100.0 - r.memory_percent) / 100.0 + gpu) / 3.0
        if r.on_ac_power is True or r.battery_percent is None:
            battery = 1.0
        else:
            battery = r.battery_percent / 100.0
        freshness = 1.0 - age / rules.stale_after_s
    fairness = 1.0 / (1.0 + max(0, participations))
    return float(w.resources * resources + w.battery * battery + w.fairness * fairness
                 + w.freshness * freshness + w.data * min(1.0, max(0.0, data_share)))


def select_agents(agents: Mapping[int, DeviceInfo], fleet: Mapping[str, DeviceView], *, count: int,
                  participation: Mapping[str, int] | None = None, now: float, seed: int,
                  rules: SelectionRules = SelectionRules()) -> Selection:
    """Choose up to ``count`` agents (0: every eligible one); see the module docstring."""
    if count < 0:
        raise ValidationError(f"count must be >= 0, got {count}")
    participation = participation or {}
    excluded: dict[int, str] = {}
    eligible: list[int] = []
    for node in sorted(agents):
        reason = exclusion(fleet.get(agents[node].device_id), rules)
        if reason is None:
            eligible.append(node)
        else:
            excluded[node] = reason
    most = max((agents[n].data_bucket for n in eligible), default=0)
    scores = {n: score(fleet.get(agents[n].device_id), participations=participation.get(agents[n].device_id, 0),
                       data_share=agents[n].data_bucket / most if most else 0.0, now=now, rules=rules)
              for n in eligible}
    tiebreak = dict(zip(eligible, np.random.default_rng(seed).permutation(len(eligible)).tolist(), strict=True))
    ranked = sorted(eligible, key=lambda n: (-scores[n], tiebreak[n]))
    chosen = ranked if count == 0 else ranked[:count]
    for n in ranked[len(chosen):]:
        excluded[n] = "not chosen: lower score"
    return Selection(tuple(chosen), excluded, scores)


@dataclass(frozen=True)
class Sampling:
    """Per-agent inclusion probabilities of a client-level DP round (:func:`inclusion_rates`)."""

    rates: dict[int, float]  # node -> probability of taking part, in [0, rate]; 0 for an excluded agent
    expected: float  # the mean's fixed denominator: the sum of every agent's rate before exclusions
    excluded: dict[int, str]


def telemetry_score(view: DeviceView | None, *, participations: int, now: float, rules: SelectionRules) -> float:
    """A device's score in [0, 1] from its own telemetry and participation only (never its data size):
    :func:`score` without the data term, over the sum of the other weights."""
    w = rules.weights
    total = w.resources + w.battery + w.fairness + w.freshness
    if total <= 0:
        return 1.0
    return score(view, participations=participations, data_share=0.0, now=now, rules=rules) / total


def inclusion_rates(agents: Mapping[int, DeviceInfo], fleet: Mapping[str, DeviceView], *, rate: float,
                    participation: Mapping[str, int] | None = None, now: float,
                    rules: SelectionRules = SelectionRules()) -> Sampling:
    """Telemetry selection under client-level DP: each agent takes part independently (Poisson) with
    probability ``rate * s_i``, ``s_i`` in [0, 1] its own :func:`telemetry_score`, or 0 when its own
    record excludes it (offline, ``minimal``, budget spent, low battery).

    A device's probability is a function of its own record only, so adding, removing or changing one
    device changes no other device's probability: the round is a Poisson sample whose largest rate is
    ``rate``, the rate charged. The mean's denominator (``expected``, ``rate`` times the sum of every
    agent's score before exclusions) comes from telemetry, never from training data: a device whose own
    sample-level budget is spent (a function of its data) only lowers its own probability."""
    if not 0 < rate <= 1:
        raise ValidationError(f"rate must be in (0, 1], got {rate}")
    participation = participation or {}
    rates = {n: rate * telemetry_score(fleet.get(info.device_id),
                                       participations=participation.get(info.device_id, 0), now=now, rules=rules)
             for n, info in agents.items()}
    expected = sum(rates.values())
    excluded: dict[int, str] = {}
    for node in sorted(agents):
        reason = exclusion(fleet.get(agents[node].device_id), rules)
        if reason is not None:
            excluded[node] = reason
            rates[node] = 0.0
    return Sampling(rates, expected, excluded)


class Participation:
    """How often each device took part in the last ``window`` rounds."""

    def __init__(self, window: int = 10) -> None:
        if window < 1:
            raise ValidationError(f"window must be >= 1, got {window}")
        self._rounds: collections.deque[tuple[str, ...]] = collections.deque(maxlen=window)

    def record(self, device_ids: Sequence[str]) -> None:
        self._rounds.append(tuple(device_ids))

    def counts(self) -> dict[str, int]:
        return dict(collections.Counter(d for r in self._rounds for d in r))


class RoundSelector:
    """Selection for a fog's round loop: the fleet view, the rules and the participation history."""

    def __init__(self, fleet, rules: SelectionRules, *, count: int, window: int = 10, warmup_s: float = 0.0,
                 clock=None) -> None:
        import time

        self.fleet = fleet  # a FleetView
        self.rules = rules
        self.count = count
        self.participation = Participation(window)
        self.clock = clock or time.time
        self.warmup_s = warmup_s
        self.last: Selection | None = None

    def choose(self, agents: Mapping[int, DeviceInfo], round_no: int, count: int | None = None) -> tuple[int, ...]:
        """The node IDs to train in round ``round_no`` (seeded by it): at most ``count`` (default: the
        selector's); records them as participants. The first time, waits up to ``warmup_s`` until the view
        has telemetry of every agent."""
        self._warm_up(agents)
        self.last = select_agents(agents, self.fleet.devices(), count=self.count if count is None else count,
                                  participation=self.participation.counts(), now=self.clock(), seed=round_no,
                                  rules=self.rules)
        self.participation.record([agents[n].device_id for n in self.last.chosen])
        return self.last.chosen

    def rates(self, agents: Mapping[int, DeviceInfo], rate: float) -> Sampling:
        """Client-level DP: each agent's inclusion probability (:func:`inclusion_rates`); the caller draws
        the sample and records who took part (:meth:`record`)."""
        self._warm_up(agents)
        sampling = inclusion_rates(agents, self.fleet.devices(), rate=rate,
                                   participation=self.participation.counts(), now=self.clock(), rules=self.rules)
        self.last = Selection(tuple(n for n, p in sampling.rates.items() if p > 0), sampling.excluded,
                              dict(sampling.rates))
        return sampling

    def record(self, agents: Mapping[int, DeviceInfo], nodes: Sequence[int]) -> None:
        self.participation.record([agents[n].device_id for n in nodes if n in agents])

    def _warm_up(self, agents: Mapping[int, DeviceInfo]) -> None:
        if self.warmup_s:
            import time

            deadline = time.monotonic() + self.warmup_s
            wanted = {info.device_id for info in agents.values()}
            while time.monotonic() < deadline:
                views = self.fleet.devices()
                if all(views.get(d) is not None and views[d].telemetry is not None for d in wanted):
                    break
                time.sleep(0.05)
            self.warmup_s = 0.0


__all__ = ["NEUTRAL", "Participation", "RoundSelector", "Sampling", "Selection", "SelectionRules", "SelectionWeights",
           "exclusion", "inclusion_rates", "telemetry_score",
           "score", "select_agents"]
