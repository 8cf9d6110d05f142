"""Retention limits of a store table and the pure rule that picks the segments to drop.

A table keeps its data in immutable segments, oldest first. Retention removes whole segments:

* by age: a segment goes once its newest ``time_column`` value is older than ``max_age_s``;
* by bytes: the oldest segments go while the table's segments take more than ``max_bytes``.

Rows still in the write-ahead log (at most one segment's worth per table) are not counted, so a
table holds at most ``max_bytes`` plus one segment.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hyprstream.errors import ValidationError


class SegmentStats(Protocol):
    """What retention needs to know of a segment."""

    @property
    def id(self) -> int: ...

    @property
    def bytes(self) -> int: ...

    @property
    def max_time(self) -> float | None: ...


@dataclass(frozen=True)
class Retention:
    """Per-table limits; ``None`` means unlimited.

    ``time_column`` names a timestamp or numeric (seconds since the epoch) column; it is needed
    for ``max_age_s``.
    """

    max_bytes: int | None = None
    max_age_s: float | None = None
    time_column: str | None = None

    def __post_init__(self) -> None:
        if self.max_bytes is not None and (isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes <= 0):
            raise ValidationError(f"retention max_bytes must be a positive integer, got {self.max_bytes!r}")
        if self.max_age_s is not None:
            if isinstance(self.max_age_s, bool) or not isinstance(self.max_age_s, (int, float)):
                raise ValidationError(f"retention max_age_s must be a number, got {self.max_age_s!r}")
            if not math.isfinite(self.max_age_s) or self.max_age_s <= 0:
                raise ValidationError(f"retention max_age_s must be positive and finite, got {self.max_age_s!r}")
            if self.time_column is None:
                raise ValidationError("retention max_age_s needs a time_column")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest."""
        return {"max_bytes": self.max_bytes, "max_age_s": self.max_age_s, "time_column": self.time_column}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Retention:
        """Inverse of :meth:`to_dict`."""
        return cls(max_bytes=data.get("max_bytes"), max_age_s=data.get("max_age_s"), time_column=data.get("time_column"))


def segments_to_drop(segments: Sequence[SegmentStats], retention: Retention, now: float) -> list[int]:
    """Ids of the segments (given oldest first) that ``retention`` removes at time ``now``."""
    drop: set[int] = set()
    if retention.max_age_s is not None:
        cutoff = now - retention.max_age_s
        drop.update(s.id for s in segments if s.max_time is not None and s.max_time < cutoff)
    if retention.max_bytes is not None:
        total = sum(s.bytes for s in segments if s.id not in drop)
        for s in segments:
            if total <= retention.max_bytes:
                break
            if s.id not in drop:
                drop.add(s.id)
                total -= s.bytes
    return [s.id for s in segments if s.id in drop]
