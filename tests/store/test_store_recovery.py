"""Recovery on open: torn log tails, uncommitted files, damaged segments, log and manifest."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow as pa
import pytest

from hyprstream.errors import StoreError
from hyprstream.store import Store, StoreConfig, wal

pytestmark = pytest.mark.integration

SCHEMA = pa.schema([("seq", pa.int64()), ("name", pa.string())])


def batch(start: int, n: int) -> pa.Table:
    return pa.table({"seq": list(range(start, start + n)), "name": [f"r{i}" for i in range(start, start + n)]},
                    schema=SCHEMA)


def crash(store: Store) -> None:
    """Leave ``store`` as a killed writer would: lock released, nothing checkpointed."""
    os.close(store._lock_fd)
    store._lock_fd = None
    store._closed = True


def wal_file(root: Path) -> Path:
    (path,) = (root / "wal").iterdir()
    return path


def segment_files(root: Path) -> list[Path]:
    return sorted((root / "segments").iterdir())


@pytest.fixture
def crashed(tmp_path: Path) -> Path:
    """A store whose writer died with 30 rows in segments and 12 only in the log."""
    s = Store.open(tmp_path / "s", create=True)
    s.create_table("t", SCHEMA)
    for i in range(0, 30, 3):
        s.append("t", batch(i, 3))
        if i == 12:
            s.flush()
    s.flush()
    for i in range(30, 42, 3):
        s.append("t", batch(i, 3))
    info = s.info("t")
    assert info.segments == 2 and info.buffered_rows == 12
    crash(s)
    return tmp_path / "s"


def read_seq(root: Path) -> list[int]:
    with Store.open(root) as s:
        return s.read("t").column("seq").to_pylist()


def test_killed_writer_loses_nothing(crashed: Path) -> None:
    assert read_seq(crashed) == list(range(42))


def test_torn_log_tail_is_truncated_with_a_warning(crashed: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = wal_file(crashed)
    intact = path.stat().st_size
    partial = wal.encode_record(10**6, "t", wal.ipc_payload(batch(99, 1)))[:-5]
    with open(path, "ab") as fh:
        fh.write(partial)
    with caplog.at_level(logging.WARNING, logger="hyprstream.store"):
        s = Store.open(crashed)
    assert any("torn tail" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert path.stat().st_size == intact
    assert s.read("t").column("seq").to_pylist() == list(range(42))
    s.append("t", batch(42, 1))
    s.close()
    assert read_seq(crashed) == list(range(43))


def test_reader_ignores_a_torn_tail_without_repairing_it(crashed: Path) -> None:
    path = wal_file(crashed)
    with open(path, "ab") as fh:
        fh.write(b"HSW1\x10")
    size = path.stat().st_size
    with Store.open(crashed, readonly=True) as r:
        assert r.read("t").column("seq").to_pylist() == list(range(42))
    assert path.stat().st_size == size


def test_damaged_log_record_followed_by_valid_ones_is_a_clear_error(crashed: Path) -> None:
    path = wal_file(crashed)
    data = bytearray(path.read_bytes())
    data[wal.HEADER.size + 2] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="followed by valid records"):
        Store.open(crashed)


def test_uncommitted_segment_and_temporary_files_are_removed(crashed: Path) -> None:
    committed = segment_files(crashed)
    (crashed / "segments" / "999999999999.arrow").write_bytes(b"half a segment")
    (crashed / "segments" / ".000000000042.arrow.tmp").write_bytes(b"x")
    (crashed / ".manifest.json.tmp").write_bytes(b"{")
    with Store.open(crashed) as s:
        assert segment_files(crashed) == committed
        assert s.read("t").column("seq").to_pylist() == list(range(42))
    assert not (crashed / ".manifest.json.tmp").exists()


def test_corrupted_segment_is_a_clear_error(crashed: Path) -> None:
    seg = segment_files(crashed)[0]
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0x01
    seg.write_bytes(bytes(data))
    with Store.open(crashed) as s, pytest.raises(StoreError, match=f"{seg.name}: segment checksum mismatch"):
        s.read("t")


def test_truncated_segment_is_a_clear_error(crashed: Path) -> None:
    seg = segment_files(crashed)[0]
    seg.write_bytes(seg.read_bytes()[:-10])
    with Store.open(crashed) as s, pytest.raises(StoreError, match="truncated"):
        s.read("t")


def test_missing_segment_is_a_clear_error(crashed: Path) -> None:
    seg = segment_files(crashed)[0]
    seg.unlink()
    with Store.open(crashed) as s, pytest.raises(StoreError, match="committed segment is missing"):
        s.read("t")


def test_corrupted_manifest_is_a_clear_error(crashed: Path) -> None:
    (crashed / "manifest.json").write_bytes(b'{"format": "hyprstream.store.manifest/1", "wal"')
    with pytest.raises(StoreError, match="corrupted manifest"):
        Store.open(crashed)


def test_checkpoint_replaces_the_log(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", create=True, config=StoreConfig(wal_max_bytes=3000)) as s:
        s.create_table("t", SCHEMA)
        first = wal_file(s.root).name
        for i in range(0, 300, 10):
            s.append("t", batch(i, 10))
        assert wal_file(s.root).name != first
        assert wal_file(s.root).stat().st_size < 3000
    assert read_seq(tmp_path / "s") == list(range(300))
