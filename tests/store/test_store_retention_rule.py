"""The pure retention rule: which segments go, oldest first."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyprstream.errors import ValidationError
from hyprstream.store.retention import Retention, segments_to_drop

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class Seg:
    id: int
    bytes: int
    max_time: float | None = None


def test_unlimited_retention_drops_nothing() -> None:
    assert segments_to_drop([Seg(1, 10**9), Seg(2, 10**9)], Retention(), now=1e12) == []


def test_bytes_limit_drops_oldest_until_within() -> None:
    segs = [Seg(1, 40), Seg(2, 30), Seg(3, 20), Seg(4, 10)]
    assert segments_to_drop(segs, Retention(max_bytes=60), now=0) == [1]
    assert segments_to_drop(segs, Retention(max_bytes=30), now=0) == [1, 2]
    assert segments_to_drop(segs, Retention(max_bytes=100), now=0) == []
    assert segments_to_drop(segs, Retention(max_bytes=5), now=0) == [1, 2, 3, 4]


def test_age_limit_drops_segments_whose_newest_row_is_too_old() -> None:
    segs = [Seg(1, 1, max_time=100.0), Seg(2, 1, max_time=150.0), Seg(3, 1, max_time=199.0), Seg(4, 1, None)]
    r = Retention(max_age_s=50, time_column="ts")
    assert segments_to_drop(segs, r, now=200.0) == [1]  # 150 is exactly at the cutoff: kept
    assert segments_to_drop(segs, r, now=250.5) == [1, 2, 3]


def test_age_and_bytes_combine() -> None:
    segs = [Seg(1, 10, 0.0), Seg(2, 10, 100.0), Seg(3, 10, 10.0), Seg(4, 10, 300.0)]
    r = Retention(max_bytes=15, max_age_s=50, time_column="ts")
    assert segments_to_drop(segs, r, now=300.0) == [1, 2, 3]


@pytest.mark.parametrize(
    "kwargs",
    [{"max_bytes": 0}, {"max_bytes": -1}, {"max_bytes": 1.5}, {"max_bytes": True},
     {"max_age_s": 10}, {"max_age_s": 0, "time_column": "t"}, {"max_age_s": float("inf"), "time_column": "t"}],
)
def test_invalid_limits_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValidationError):
        Retention(**kwargs)


def test_round_trip_through_dict() -> None:
    r = Retention(max_bytes=10, max_age_s=2.5, time_column="ts")
    assert Retention.from_dict(r.to_dict()) == r


@given(sizes=st.lists(st.integers(1, 1000), max_size=30), limit=st.integers(1, 10_000))
def test_kept_bytes_never_exceed_limit_and_only_a_prefix_goes(sizes: list[int], limit: int) -> None:
    segs = [Seg(i, b) for i, b in enumerate(sizes)]
    drop = segments_to_drop(segs, Retention(max_bytes=limit), now=0)
    assert drop == list(range(len(drop)))
    kept = sizes[len(drop):]
    assert sum(kept) <= limit
    if drop:  # dropping one segment fewer would have been over the limit
        assert sum(sizes[len(drop) - 1:]) > limit
