"""Retention and compaction enforced by a live store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from hyprstream.store import Retention, Store, StoreConfig
from hyprstream.store.store import _merge_groups

pytestmark = pytest.mark.integration

SCHEMA = pa.schema([("t", pa.float64()), ("v", pa.float32())])


def readings(start: int, n: int) -> pa.Table:
    return pa.table({"t": np.arange(start, start + n, dtype=np.float64),
                     "v": np.arange(start, start + n, dtype=np.float32)}, schema=SCHEMA)


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def segment_bytes_on_disk(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "segments").iterdir())


def test_byte_limit_holds_within_one_segment_under_sustained_ingest(tmp_path: Path) -> None:
    seg, limit = 4096, 20_000
    with Store.open(tmp_path / "s", create=True, config=StoreConfig(segment_bytes=seg)) as s:
        s.create_table("r", SCHEMA, Retention(max_bytes=limit))
        for i in range(0, 20_000, 50):
            s.append("r", readings(i, 50))
            assert segment_bytes_on_disk(s.root) <= limit
            assert s.nbytes("r") <= limit + seg
        kept = s.read("r").column("t").to_numpy()
        # the newest rows are kept, as one contiguous run ending with the last append
        assert kept[-1] == 19_999
        assert np.array_equal(kept, np.arange(kept[0], 20_000))
        assert s.nbytes("r") >= limit - seg


def test_age_limit_drops_old_segments_as_data_arrives(tmp_path: Path) -> None:
    clock = FakeClock(1000.0)
    cfg = StoreConfig(segment_bytes=readings(0, 10).nbytes, clock=clock)  # appends of 10 rows: one segment each
    with Store.open(tmp_path / "s", create=True, config=cfg) as s:
        s.create_table("r", SCHEMA, Retention(max_age_s=100, time_column="t"))
        s.append("r", readings(850, 10))   # newest 859: older than 1000 - 100, dropped at once
        s.append("r", readings(900, 10))   # newest 909
        s.append("r", readings(990, 10))   # newest 999
        assert s.read("r").column("t").to_pylist() == list(map(float, range(900, 910))) + list(map(float, range(990, 1000)))
        clock.now = 1050.0
        s.append("r", readings(1040, 5))
        assert s.read("r").column("t").to_pylist()[0] == 990.0
        assert s.num_rows("r") == 15


def test_age_limit_with_timestamp_column(tmp_path: Path) -> None:
    schema = pa.schema([("ts", pa.timestamp("us")), ("v", pa.float32())])
    clock = FakeClock(10_000.0)
    with Store.open(tmp_path / "s", create=True, config=StoreConfig(segment_bytes=120, clock=clock)) as s:
        s.create_table("r", schema, Retention(max_age_s=60, time_column="ts"))
        for start in (9_000, 9_950):
            ts = pa.array(np.arange(start, start + 10, dtype=np.int64) * 1_000_000, pa.timestamp("us"))
            s.append("r", pa.table({"ts": ts, "v": np.zeros(10, np.float32)}, schema=schema))
        assert s.num_rows("r") == 10
        assert s.read("r").column("ts").cast(pa.int64()).to_pylist()[0] == 9_950 * 1_000_000


def test_tightened_retention_applies_at_once(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", create=True, config=StoreConfig(segment_bytes=readings(0, 10).nbytes)) as s:
        s.create_table("r", SCHEMA)
        for i in range(10):
            s.append("r", readings(i * 10, 10))
        one = s.info("r").bytes // 10
        s.create_table("r", SCHEMA, Retention(max_bytes=3 * one + one // 2))
        assert s.retention("r").max_bytes == 3 * one + one // 2
        assert s.read("r").column("t").to_pylist() == [float(x) for x in range(70, 100)]
    with Store.open(tmp_path / "s") as s:
        assert s.retention("r").max_bytes == 3 * one + one // 2


def test_compaction_merges_small_segments_and_keeps_order(tmp_path: Path) -> None:
    seg = 2000
    with Store.open(tmp_path / "s", create=True, config=StoreConfig(segment_bytes=seg)) as s:
        s.create_table("r", SCHEMA)
        for i in range(13):
            s.append("r", readings(i * 20, 20))
            s.flush()
        before = s.read("r")
        sizes = [p.stat().st_size for p in sorted((s.root / "segments").iterdir())]
        assert len(sizes) == 13
        expected = len(_merge_groups([type("M", (), {"bytes": b})() for b in sizes], seg))
        assert expected < 13
        result = s.compact("r")
        assert (result.segments_before, result.segments_after) == (13, expected)
        assert s.info("r").segments == expected
        assert len(list((s.root / "segments").iterdir())) == expected
        assert s.read("r").equals(before)
        s.append("r", readings(260, 5))  # buffered rows are written out by compact too
        s.compact("r")
        assert s.info("r").buffered_rows == 0
        assert s.read("r").column("t").to_pylist() == [float(x) for x in range(265)]
    with Store.open(tmp_path / "s") as s:
        assert s.read("r").column("t").to_pylist() == [float(x) for x in range(265)]
