"""Vector clocks, one per model layer: how many updates from each fog a layer's value includes.

Pure values with no I/O. A clock maps an actor (a fog ID) to a non-negative counter; a missing actor
counts as zero. ``a <= b`` (happens-before-or-equal) when every counter of ``a`` is at most ``b``'s.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hyprstream.errors import ValidationError


class Order(enum.Enum):
    EQUAL = "equal"
    BEFORE = "before"
    AFTER = "after"
    CONCURRENT = "concurrent"


@dataclass(frozen=True, order=False)
class VectorClock:
    """An immutable vector clock. Zero counters are dropped so equal clocks compare equal."""

    counters: tuple[tuple[str, int], ...] = field(default=())

    @classmethod
    def of(cls, counters: Mapping[str, int] | Iterable[tuple[str, int]] = ()) -> VectorClock:
        items = dict(counters)
        for actor, n in items.items():
            if not isinstance(actor, str) or not actor:
                raise ValidationError(f"vector clock actor must be a non-empty string, got {actor!r}")
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValidationError(f"vector clock counter for {actor!r} must be an integer >= 0, got {n!r}")
        return cls(tuple(sorted((a, n) for a, n in items.items() if n)))

    def __getitem__(self, actor: str) -> int:
        return dict(self.counters).get(actor, 0)

    def as_dict(self) -> dict[str, int]:
        return dict(self.counters)

    def total(self) -> int:
        """Number of updates this clock includes."""
        return sum(n for _, n in self.counters)

    def increment(self, actor: str, by: int = 1) -> VectorClock:
        d = self.as_dict()
        d[actor] = d.get(actor, 0) + by
        return VectorClock.of(d)

    def merge(self, other: VectorClock) -> VectorClock:
        """Pointwise maximum: the least clock that both happen before."""
        d = self.as_dict()
        for actor, n in other.counters:
            d[actor] = max(d.get(actor, 0), n)
        return VectorClock.of(d)

    def __le__(self, other: VectorClock) -> bool:
        o = other.as_dict()
        return all(n <= o.get(a, 0) for a, n in self.counters)

    def __lt__(self, other: VectorClock) -> bool:
        return self <= other and self != other

    def compare(self, other: VectorClock) -> Order:
        le, ge = self <= other, other <= self
        if le and ge:
            return Order.EQUAL
        if le:
            return Order.BEFORE
        if ge:
            return Order.AFTER
        return Order.CONCURRENT

    def concurrent(self, other: VectorClock) -> bool:
        return self.compare(other) is Order.CONCURRENT

    def missing_from(self, base: VectorClock) -> int:
        """Updates this clock includes that ``base`` does not: the staleness of ``base``."""
        b = base.as_dict()
        return sum(max(0, n - b.get(a, 0)) for a, n in self.counters)


def clocks_to_json(clocks: Mapping[str, VectorClock]) -> dict[str, dict[str, int]]:
    return {layer: c.as_dict() for layer, c in clocks.items()}


def clocks_from_json(data: Any) -> dict[str, VectorClock]:
    """Parse ``{layer: {actor: count}}``; raises ValidationError on any other shape."""
    if not isinstance(data, Mapping):
        raise ValidationError("clocks must be an object {layer: {actor: count}}")
    out = {}
    for layer, counters in data.items():
        if not isinstance(counters, Mapping):
            raise ValidationError(f"clock of layer {layer!r} must be an object {{actor: count}}")
        out[str(layer)] = VectorClock.of(counters)
    return out
