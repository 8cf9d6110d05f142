"""Consistency modes: whether core merges a delta computed from a given base, and with what weight.

The weight is ``mixing * (1 + staleness) ** -staleness_exponent``: ``mixing`` is FedAsync's alpha
(Xie et al. 2019), the server learning rate every push is scaled by. Unset, it is ``1 / N`` for the N
fogs whose pushes the model has taken (the pushing fog included): N fogs' concurrent pushes from the
same base then add up to about their mean (hierarchical FedAvg) instead of their sum, which with
two or more fogs under one model overshoots and, in eventual mode, can undo what the model learned.
One fog keeps the whole step. A set ``mixing`` applies as is, whatever the number of fogs.

Pure decisions over vector clocks. Staleness is the number of updates the current layer value
includes that the update's base did not. Updates to different layers never conflict because each
layer has its own clock.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hyprstream.config import Checked, setting
from hyprstream.vector_clock import Order, VectorClock


class ConsistencyMode(enum.Enum):
    STRONG = "strong"  # the base must be the current value of every layer the update touches
    BOUNDED = "bounded"  # accept while staleness <= max_staleness, down-weighted by staleness
    EVENTUAL = "eventual"  # always merge, down-weighted by staleness (FedAsync / FedBuff style)


@dataclass(frozen=True)
class ConsistencyPolicy(Checked):
    mode: ConsistencyMode = setting(ConsistencyMode.BOUNDED)
    max_staleness: int = setting(4, ge=0, doc="bounded mode: largest accepted staleness")
    staleness_exponent: float = setting(0.5, ge=0.0, le=4.0, doc="weight = mixing * (1 + staleness) ** -exponent")
    mixing: float | None = setting(None, gt=0.0, le=1.0, doc="server learning rate: every merged delta is scaled "
                                   "by it (FedAsync's alpha); default: 1 / the number of fogs that have pushed "
                                   "to the model, so that concurrent pushes average")

    def mixing_for(self, fogs: int) -> float:
        """The server learning rate of a push when ``fogs`` fogs (this one included) push to the model."""
        return self.mixing if self.mixing is not None else 1.0 / max(1, fogs)

    def check(self):
        if self.mode is ConsistencyMode.STRONG and self.max_staleness:
            yield "max_staleness", "has no meaning in strong mode: remove it or use mode = 'bounded'"


@dataclass(frozen=True)
class Decision:
    accept: bool
    staleness: int
    weight: float
    reason: str = ""


def staleness_weight(staleness: int, exponent: float) -> float:
    """Polynomial staleness discount ``(1 + s) ** -a`` (Xie et al., FedAsync)."""
    return float((1 + staleness) ** -exponent)


def decide(policy: ConsistencyPolicy, base: VectorClock, current: VectorClock, fogs: int = 1) -> Decision:
    """Whether a delta computed on ``base`` may be merged into a layer whose clock is ``current``; ``fogs``: how
    many fogs push to the model (for the default mixing)."""
    mixing = policy.mixing_for(fogs)
    order = base.compare(current)
    if order in (Order.AFTER, Order.CONCURRENT):
        return Decision(False, 0, 0.0, f"base clock {base.as_dict()} is not in core's history {current.as_dict()}")
    staleness = current.missing_from(base)
    if policy.mode is ConsistencyMode.STRONG:
        if staleness:
            return Decision(False, staleness, 0.0, f"strong consistency: base is {staleness} update(s) behind")
        return Decision(True, 0, mixing)
    if policy.mode is ConsistencyMode.BOUNDED and staleness > policy.max_staleness:
        return Decision(
            False, staleness, 0.0,
            f"bounded consistency: staleness {staleness} exceeds max_staleness {policy.max_staleness}",
        )
    return Decision(True, staleness, mixing * staleness_weight(staleness, policy.staleness_exponent))


@dataclass(frozen=True)
class MergePlan:
    """What committing one push does to the clocks: accepted or not, and the clocks after it."""

    accept: bool
    reason: str
    staleness: dict[str, int]
    weight: float  # the smallest weight over the touched layers (one weight per push)
    new_clocks: dict[str, VectorClock]  # for the touched layers only


def plan_merge(policy: ConsistencyPolicy, current: Mapping[str, VectorClock], base: Mapping[str, VectorClock],
               touched: Iterable[str], fog: str, fogs: int = 1) -> MergePlan:
    """Decide a push from ``fog`` that changes ``touched`` layers, computed from ``base`` clocks; ``fogs``: the
    number of fogs pushing to the model, ``fog`` included (the default mixing is ``1 / fogs``).

    Each touched layer is decided on its own clock (layers the push does not touch are never
    consulted, so pushes to disjoint layers never conflict). Accepted, every touched layer's clock
    becomes its current clock with ``fog``'s counter incremented by one.
    """
    staleness: dict[str, int] = {}
    weight = 1.0
    layers = list(dict.fromkeys(touched))
    if not layers:
        return MergePlan(False, "the push touches no layer", {}, 0.0, {})
    for layer in layers:
        if layer not in current:
            return MergePlan(False, f"unknown layer {layer!r}", {}, 0.0, {})
        if layer not in base:
            return MergePlan(False, f"push lacks the base clock of layer {layer!r}", {}, 0.0, {})
        decision = decide(policy, base[layer], current[layer], fogs)
        if not decision.accept:
            return MergePlan(False, f"layer {layer!r}: {decision.reason}", {}, 0.0, {})
        staleness[layer] = decision.staleness
        weight = min(weight, decision.weight)
    return MergePlan(True, "", staleness, weight, {layer: current[layer].increment(fog) for layer in layers})
