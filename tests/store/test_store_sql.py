"""SQL over store tables and the time-series helpers, against hand-computed and brute-force results."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from hyprstream.errors import ValidationError
from hyprstream.store import Store, StoreConfig
from hyprstream.store import timeseries as ts

pytestmark = pytest.mark.integration

SCHEMA = pa.schema([("ts", pa.timestamp("ms")), ("sensor", pa.string()), ("value", pa.float64())])


def readings(seconds: list[float], sensor: str, values: list[float]) -> pa.Table:
    ms = (np.asarray(seconds, dtype=np.float64) * 1000).astype(np.int64)
    return pa.table({"ts": pa.array(ms, pa.timestamp("ms")), "sensor": [sensor] * len(values),
                     "value": np.asarray(values, dtype=np.float64)}, schema=SCHEMA)


@pytest.fixture
def store(tmp_path: Path):
    with Store.open(tmp_path / "s", create=True, config=StoreConfig(segment_bytes=2000)) as s:
        s.create_table("r", SCHEMA)
        yield s


def test_sql_sees_tables_by_name_and_binds_parameters(store: Store) -> None:
    store.create_table("sensors", pa.schema([("sensor", pa.string()), ("room", pa.string())]))
    store.append("sensors", pa.table({"sensor": ["a", "b"], "room": ["kitchen", "hall"]}))
    store.append("r", readings([0, 1, 2], "a", [1.0, 2.0, 3.0]))
    store.append("r", readings([0, 1], "b", [10.0, 20.0]))
    got = store.sql(
        "SELECT room, sum(value) AS total FROM r JOIN sensors USING (sensor) WHERE value > ? "
        "GROUP BY room ORDER BY room", [1.5])
    assert got.to_pydict() == {"room": ["hall", "kitchen"], "total": [30.0, 5.0]}


def test_sql_spans_segments_and_buffered_rows(store: Store) -> None:
    for i in range(50):
        store.append("r", readings([i], "a", [float(i)]))
        if i in (10, 25):
            store.flush()
    assert store.info("r").segments > 0 and store.info("r").buffered_rows > 0
    assert store.sql("SELECT sum(value) AS s, count(*) AS n FROM r").to_pydict() == {"s": [1225.0], "n": [50]}


def test_bad_sql_is_a_validation_error(store: Store) -> None:
    with pytest.raises(ValidationError, match="SQL query refused"):
        store.sql("SELECT nope FROM r")
    with pytest.raises(ValidationError, match="SQL query refused"):
        store.sql("SELEC 1")


def test_rolling_stats_hand_computed(store: Store) -> None:
    store.append("r", readings([0, 1, 2, 3, 4], "a", [1.0, 2.0, 1.0, 2.0, 10.0]))
    store.append("r", readings([0, 3], "b", [5.0, 7.0]))
    got = ts.rolling_stats(store, "r", value="value", window_s=2, start=2)
    # window of t covers [t-2, t] of the same sensor; start=2 still looks back to 0
    assert got.column("sensor").to_pylist() == ["a", "a", "a", "b"]
    assert got.column("count").to_pylist() == [3, 3, 3, 1]
    assert got.column("mean").to_pylist() == pytest.approx([4 / 3, 5 / 3, 13 / 3, 7.0])
    assert got.column("std").to_pylist()[:3] == pytest.approx([np.std([1, 2, 1], ddof=1), np.std([2, 1, 2], ddof=1),
                                                               np.std([1, 2, 10], ddof=1)])
    assert got.column("std").to_pylist()[3] is None


def test_rolling_stats_time_range_accepts_datetimes(store: Store) -> None:
    store.append("r", readings([0, 10, 20, 30], "a", [1.0, 2.0, 3.0, 4.0]))
    got = ts.rolling_stats(store, "r", value="value", window_s=10,
                           start=datetime(1970, 1, 1, 0, 0, 10, tzinfo=UTC), end=datetime(1970, 1, 1, 0, 0, 30))
    assert got.column("value").to_pylist() == [2.0, 3.0]
    assert got.column("mean").to_pylist() == [1.5, 2.5]


def brute_rolling(t: np.ndarray, key: np.ndarray, v: np.ndarray, w: float) -> list[tuple]:
    out = []
    for i in np.lexsort((t, key)):
        sel = (key == key[i]) & (t >= t[i] - w) & (t <= t[i])
        vals = v[sel]
        out.append((key[i], t[i], vals.mean(), vals.std(ddof=1) if len(vals) > 1 else None, len(vals)))
    return out


def test_rolling_stats_match_brute_force_on_random_data(store: Store) -> None:
    rng = np.random.default_rng(7)
    n = 400
    t = np.round(np.sort(rng.uniform(0, 500, n)), 3)
    key = rng.choice(np.array(["a", "b", "c"]), n)
    v = rng.normal(20, 3, n)
    for lo in range(0, n, 37):
        sl = slice(lo, lo + 37)
        store.append("r", pa.table({"ts": pa.array((t[sl] * 1000).round().astype(np.int64), pa.timestamp("ms")),
                                    "sensor": key[sl], "value": v[sl]}, schema=SCHEMA))
    got = ts.rolling_stats(store, "r", value="value", window_s=30)
    expected = brute_rolling(t, key, v, 30.0)
    assert got.column("sensor").to_pylist() == [e[0] for e in expected]
    assert got.column("count").to_pylist() == [e[4] for e in expected]
    assert got.column("mean").to_pylist() == pytest.approx([e[2] for e in expected], rel=1e-9)
    stds = got.column("std").to_pylist()
    assert [s is None for s in stds] == [e[3] is None for e in expected]
    assert [s for s in stds if s is not None] == pytest.approx([e[3] for e in expected if e[3] is not None], rel=1e-9)


def test_anomalies_flags_readings_far_from_their_window(store: Store) -> None:
    values = [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 10.0, 1.0]
    store.append("r", readings(list(range(10)), "a", values))
    store.append("r", readings(list(range(10)), "b", [5.0] * 10))  # no spread: never flagged
    got = ts.anomalies(store, "r", value="value", window_s=5, k=3)
    # reading at t=8: window t in [3, 7] holds 2,1,2,1,2: mean 1.6, sample std sqrt(0.3)
    assert got.column("sensor").to_pylist() == ["a"]
    assert got.column("value").to_pylist() == [10.0]
    assert got.column("mean").to_pylist() == pytest.approx([1.6])
    assert got.column("z").to_pylist() == pytest.approx([(10.0 - 1.6) / np.sqrt(0.3)])
    assert ts.anomalies(store, "r", value="value", window_s=5, k=16).num_rows == 0


def test_time_buckets_hand_computed(store: Store) -> None:
    store.append("r", readings([0, 1, 2, 3, 4, 5, 6], "a", [1, 2, 3, 4, 5, 6, 7]))
    store.append("r", readings([4], "b", [100]))
    got = ts.time_buckets(store, "r", value="value", bucket_s=3, key="sensor")
    assert got.column("sensor").to_pylist() == ["a", "a", "a", "b"]
    epoch = datetime(1970, 1, 1)
    assert [(b - epoch).total_seconds() for b in got.column("bucket").to_pylist()] == [0.0, 3.0, 6.0, 3.0]
    assert got.column("count").to_pylist() == [3, 3, 1, 1]
    assert got.column("mean").to_pylist() == [2.0, 5.0, 7.0, 100.0]
    assert got.column("min").to_pylist() == [1.0, 4.0, 7.0, 100.0]
    assert got.column("max").to_pylist() == [3.0, 6.0, 7.0, 100.0]


def test_time_buckets_with_numeric_seconds(tmp_path: Path) -> None:
    schema = pa.schema([("t", pa.float64()), ("v", pa.float64())])
    with Store.open(tmp_path / "s", create=True) as s:
        s.create_table("m", schema)
        s.append("m", pa.table({"t": [0.5, 9.9, 10.0, 25.0], "v": [1.0, 3.0, 5.0, 7.0]}, schema=schema))
        got = ts.time_buckets(s, "m", value="v", time="t", bucket_s=10, start=0, end=20)
        assert got.to_pydict()["bucket"] == [0.0, 10.0]
        assert got.to_pydict()["mean"] == [2.0, 5.0]
        roll = ts.rolling_stats(s, "m", value="v", time="t", key=None, window_s=10)
        assert roll.column("mean").to_pylist() == [1.0, 2.0, 3.0, 7.0]


def test_helpers_validate_their_inputs(store: Store) -> None:
    with pytest.raises(ValidationError, match="window_s"):
        ts.rolling_stats(store, "r", value="value", window_s=0)
    with pytest.raises(ValidationError, match="'nope'"):
        ts.rolling_stats(store, "r", value="nope", window_s=1)
    with pytest.raises(ValidationError, match="'sensor' has type string"):
        ts.time_buckets(store, "r", value="value", time="sensor", bucket_s=1)
