"""The Store's public API: open/create, tables, appends, reads, sizes, readers and the writer lock."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from hyprstream.errors import StoreError, ValidationError
from hyprstream.store import Retention, Store, StoreConfig

pytestmark = pytest.mark.integration

SCHEMA = pa.schema([
    pa.field("ts", pa.timestamp("ms"), nullable=False),
    pa.field("sensor", pa.string()),
    pa.field("value", pa.float64()),
])


def rows(start: int, n: int, sensor: str = "a") -> pa.Table:
    return pa.table({
        "ts": pa.array(np.arange(start, start + n, dtype=np.int64), pa.timestamp("ms")),
        "sensor": pa.array([sensor] * n),
        "value": pa.array(np.arange(start, start + n, dtype=np.float64) * 0.5),
    }, schema=SCHEMA)


@pytest.fixture
def store(tmp_path: Path):
    with Store.open(tmp_path / "s", create=True) as s:
        s.create_table("samples", SCHEMA)
        yield s


def test_open_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        Store.open(tmp_path / "nope")


def test_open_directory_that_is_not_a_store_raises_and_leaves_it_alone(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a hyprstream store"):
        Store.open(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_create_does_not_overwrite_a_store_whose_marker_was_removed(store: Store) -> None:
    store.append("samples", rows(0, 3))
    store.close()
    (store.root / "STORE").unlink()
    with pytest.raises(StoreError, match="manifest with tables but no STORE file"):
        Store.open(store.root, create=True)


def test_create_makes_missing_parents(tmp_path: Path) -> None:
    with Store.open(tmp_path / "a" / "b", create=True) as s:
        assert s.tables() == []
    with Store.open(tmp_path / "a" / "b") as s:
        assert s.tables() == []


def test_create_table_is_idempotent_for_same_schema(store: Store) -> None:
    store.create_table("samples", SCHEMA)
    store.create_table("other", pa.schema([("x", pa.int32())]))
    assert store.tables() == ["samples", "other"]
    assert store.schema("samples").equals(SCHEMA)


def test_create_table_with_different_schema_raises(store: Store) -> None:
    with pytest.raises(StoreError, match="different schema"):
        store.create_table("samples", pa.schema([("ts", pa.int64())]))


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a b", "x" * 129, 3])
def test_invalid_table_names_are_refused(store: Store, name: object) -> None:
    with pytest.raises(ValidationError, match="invalid table name"):
        store.create_table(name, SCHEMA)  # type: ignore[arg-type]


def test_retention_time_column_must_exist_and_be_time_like(store: Store) -> None:
    with pytest.raises(ValidationError, match="'when'"):
        store.create_table("t1", SCHEMA, Retention(max_age_s=5, time_column="when"))
    with pytest.raises(ValidationError, match="'sensor'"):
        store.create_table("t2", SCHEMA, Retention(max_age_s=5, time_column="sensor"))


def test_unknown_table_raises(store: Store) -> None:
    with pytest.raises(StoreError, match="no table 'nope'"):
        store.read("nope")
    with pytest.raises(StoreError, match="no table 'nope'"):
        store.append("nope", rows(0, 1))


def test_append_returns_row_count_and_read_returns_rows_in_order(store: Store) -> None:
    assert store.append("samples", rows(0, 3)) == 3
    assert store.append("samples", rows(3, 2).to_batches()[0]) == 2
    got = store.read("samples")
    assert got.schema.equals(SCHEMA)
    assert got.column("value").to_pylist() == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert got.column("ts").cast(pa.int64()).to_pylist() == [0, 1, 2, 3, 4]
    assert store.num_rows("samples") == 5


def test_append_accepts_columns_in_any_order(store: Store) -> None:
    t = rows(0, 2)
    store.append("samples", t.select(["value", "sensor", "ts"]))
    assert store.read("samples").equals(t)


def test_read_selected_columns(store: Store) -> None:
    store.append("samples", rows(0, 4, sensor="z"))
    got = store.read("samples", columns=["sensor", "value"])
    assert got.column_names == ["sensor", "value"]
    assert got.column("sensor").to_pylist() == ["z"] * 4
    with pytest.raises(ValidationError, match="'nope'"):
        store.read("samples", columns=["nope"])


def test_empty_table_reads_empty_with_schema(store: Store) -> None:
    got = store.read("samples")
    assert got.num_rows == 0 and got.schema.equals(SCHEMA)
    assert store.append("samples", rows(0, 0)) == 0
    assert store.num_rows("samples") == 0 and store.nbytes("samples") == 0


@pytest.mark.parametrize(
    ("bad", "column"),
    [
        (rows(0, 2).drop_columns(["value"]), "value"),
        (rows(0, 2).append_column("extra", pa.array([1, 2])), "extra"),
        (rows(0, 2).set_column(2, "value", pa.array([1, 2], pa.int64())), "value"),
        (rows(0, 2).set_column(0, "ts", pa.array([None, 1], pa.timestamp("ms"))), "ts"),
    ],
    ids=["missing", "extra", "wrong-type", "null-in-non-nullable"],
)
def test_schema_mismatch_names_the_column_and_appends_nothing(store: Store, bad: pa.Table, column: str) -> None:
    store.append("samples", rows(0, 1))
    with pytest.raises(ValidationError, match=f"column '{column}'"):
        store.append("samples", bad)
    assert store.num_rows("samples") == 1


def test_append_refuses_non_arrow_input(store: Store) -> None:
    with pytest.raises(ValidationError, match="pyarrow Table or RecordBatch"):
        store.append("samples", {"ts": [1]})  # type: ignore[arg-type]


def test_rows_survive_reopen_from_log_and_segments(tmp_path: Path) -> None:
    cfg = StoreConfig(segment_bytes=400)
    with Store.open(tmp_path / "s", create=True, config=cfg) as s:
        s.create_table("samples", SCHEMA)
        for i in range(0, 40, 4):
            s.append("samples", rows(i, 4))
        s.append("samples", rows(40, 1))
        expected = s.read("samples")
        assert s.info("samples").segments > 0 and s.info("samples").buffered_rows > 0
    with Store.open(tmp_path / "s", config=cfg) as s:
        assert s.read("samples").equals(expected)
        assert s.num_rows("samples") == 41


def test_rows_survive_an_unclosed_writer(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "s", create=True)
    s.create_table("samples", SCHEMA)
    s.append("samples", rows(0, 5))
    os.close(s._lock_fd)  # the process "dies": lock released, nothing checkpointed
    s._lock_fd = None
    with Store.open(tmp_path / "s") as again:
        assert again.read("samples").equals(rows(0, 5))


def test_nbytes_counts_segment_files_after_flush(store: Store) -> None:
    store.append("samples", rows(0, 100))
    assert store.nbytes("samples") == rows(0, 100).nbytes
    store.flush()
    files = list((store.root / "segments").iterdir())
    assert len(files) == 1
    assert store.nbytes("samples") == files[0].stat().st_size
    assert store.num_rows("samples") == 100


def test_large_append_is_split_into_segments_of_bounded_size(tmp_path: Path) -> None:
    cfg = StoreConfig(segment_bytes=10_000)
    with Store.open(tmp_path / "s", create=True, config=cfg) as s:
        s.create_table("samples", SCHEMA)
        big = rows(0, 5000)
        s.append("samples", big)
        info = s.info("samples")
        assert info.buffered_rows == 0
        assert info.segments == pytest.approx(big.nbytes / 10_000, abs=1)
        assert s.read("samples").equals(big)


def test_closed_store_refuses_operations(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "s", create=True)
    s.create_table("samples", SCHEMA)
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.read("samples")
    with pytest.raises(StoreError, match="closed"):
        s.append("samples", rows(0, 1))


def test_second_writer_is_refused_naming_the_holder(store: Store) -> None:
    with pytest.raises(StoreError, match=f"another process \\(pid {os.getpid()}\\)"):
        Store.open(store.root)


def test_lock_is_released_on_close(tmp_path: Path) -> None:
    Store.open(tmp_path / "s", create=True).close()
    Store.open(tmp_path / "s").close()


def test_reader_sees_acknowledged_rows_and_refuses_writes(tmp_path: Path) -> None:
    cfg = StoreConfig(segment_bytes=500)
    with Store.open(tmp_path / "s", create=True, config=cfg) as w:
        w.create_table("samples", SCHEMA)
        w.append("samples", rows(0, 3))
        r = Store.open(tmp_path / "s", readonly=True)
        assert r.tables() == ["samples"]
        assert r.read("samples").equals(rows(0, 3))
        for i in range(3, 60, 3):
            w.append("samples", rows(i, 3))
            assert r.num_rows("samples") == i + 3
        w.flush()
        assert r.read("samples").equals(w.read("samples"))
        with pytest.raises(StoreError, match="read-only"):
            r.append("samples", rows(0, 1))
        with pytest.raises(StoreError, match="read-only"):
            r.create_table("x", SCHEMA)
        r.close()


def test_readonly_create_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="read-only"):
        Store.open(tmp_path / "s", create=True, readonly=True)


def test_drop_table_removes_data_and_name_can_be_reused(store: Store) -> None:
    store.append("samples", rows(0, 10))
    store.flush()
    store.drop_table("samples")
    assert store.tables() == []
    assert list((store.root / "segments").iterdir()) == []
    other = pa.schema([("x", pa.int64())])
    store.create_table("samples", other)
    store.append("samples", pa.table({"x": [7]}))
    store.close()
    with Store.open(store.root) as again:
        assert again.read("samples").to_pydict() == {"x": [7]}
