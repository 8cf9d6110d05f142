"""Consistency modes: whether core merges a delta computed from a given base, and with what weight.

Pure decisions over vector clocks. Staleness is the number of updates the current layer value
includes that the update's base did not. Updates to different layers never conflict because each
layer has its own clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from hyprstream.config import Checked, setting
from hyprstream.core.vector_clock import Order, VectorClock


class ConsistencyMode(enum.Enum):
    STRONG = "strong"  # the base must be the current value of every layer the update touches
    BOUNDED = "bounded"  # accept while staleness <= max_staleness, down-weighted by staleness
    EVENTUAL = "eventual"  # always merge, down-weighted by staleness (FedAsync / FedBuff style)


@dataclass(frozen=True)
class ConsistencyPolicy(Checked):
    mode: ConsistencyMode = setting(ConsistencyMode.BOUNDED)
    max_staleness: int = setting(4, ge=0, doc="bounded mode: largest accepted staleness")
    staleness_exponent: float = setting(0.5, ge=0.0, le=4.0, doc="weight = (1 + staleness) ** -exponent")

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


def decide(policy: ConsistencyPolicy, base: VectorClock, current: VectorClock) -> Decision:
    """Whether a delta computed on ``base`` may be merged into a layer whose clock is ``current``."""
    order = base.compare(current)
    if order in (Order.AFTER, Order.CONCURRENT):
        return Decision(False, 0, 0.0, f"base clock {base.as_dict()} is not in core's history {current.as_dict()}")
    staleness = current.missing_from(base)
    if policy.mode is ConsistencyMode.STRONG:
        if staleness:
            return Decision(False, staleness, 0.0, f"strong consistency: base is {staleness} update(s) behind")
        return Decision(True, 0, 1.0)
    if policy.mode is ConsistencyMode.BOUNDED and staleness > policy.max_staleness:
        return Decision(
            False, staleness, 0.0,
            f"bounded consistency: staleness {staleness} exceeds max_staleness {policy.max_staleness}",
        )
    return Decision(True, staleness, staleness_weight(staleness, policy.staleness_exponent))
