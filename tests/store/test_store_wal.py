"""The write-ahead log format: round trip, torn tails, mid-file damage, encryption."""

from __future__ import annotations

import pyarrow as pa
import pytest

from hyprstream.errors import StoreError
from hyprstream.store import wal
from hyprstream.store.crypto import Cipher, generate_key

pytestmark = pytest.mark.unit


def record(seq: int, values: list[int], table: str = "t", cipher: Cipher | None = None) -> bytes:
    return wal.encode_record(seq, table, wal.ipc_payload(pa.table({"x": values})), cipher)


def test_round_trip_of_several_records() -> None:
    data = record(1, [1, 2]) + record(2, [3], table="other") + record(5, [])
    scan = wal.scan(data)
    assert [(e.seq, e.table, e.rows.column("x").to_pylist()) for e in scan.entries] == [
        (1, "t", [1, 2]), (2, "other", [3]), (5, "t", []),
    ]
    assert scan.end == len(data) and scan.torn_bytes == 0


@pytest.mark.parametrize("cut", [1, wal.HEADER.size - 1, wal.HEADER.size, wal.HEADER.size + 7, -1])
def test_torn_last_record_is_reported_not_raised(cut: int) -> None:
    good = record(1, [1]) + record(2, [2])
    last = record(3, [3])
    data = good + last[:cut]
    scan = wal.scan(data)
    assert [e.seq for e in scan.entries] == [1, 2]
    assert scan.end == len(good)
    assert scan.torn_bytes == len(data) - len(good)


def test_zero_filled_tail_is_a_torn_tail() -> None:
    good = record(1, [1])
    scan = wal.scan(good + bytes(4096))
    assert [e.seq for e in scan.entries] == [1] and scan.torn_bytes == 4096


def test_damage_followed_by_valid_records_is_refused() -> None:
    first, second, third = record(1, [1]), record(2, [2]), record(3, [3])
    damaged = bytearray(first + second + third)
    damaged[len(first) + wal.HEADER.size + 3] ^= 0xFF
    with pytest.raises(StoreError, match=f"offset {len(first)} is followed by valid records"):
        wal.scan(bytes(damaged))


def test_scan_reports_absolute_offsets() -> None:
    data = record(7, [1])
    scan = wal.scan(data, offset=1000)
    assert scan.end == 1000 + len(data)


def test_encrypted_records_round_trip_and_hide_the_data() -> None:
    cipher = Cipher(generate_key())
    data = record(1, [123456789], cipher=cipher)
    assert (123456789).to_bytes(8, "little") not in data
    assert wal.scan(data, cipher=cipher).entries[0].rows.column("x").to_pylist() == [123456789]
    with pytest.raises(StoreError, match="cannot decrypt"):
        wal.scan(data, cipher=Cipher(generate_key()))


def test_writer_appends_and_truncates(tmp_path) -> None:
    w = wal.WalWriter(tmp_path / "w.wal")
    w.append(record(1, [1]))
    size = w.size
    w.append(record(2, [2]))
    w.truncate(size)
    w.close()
    assert [e.seq for e in wal.scan((tmp_path / "w.wal").read_bytes()).entries] == [1]
    assert wal.WalWriter(tmp_path / "w.wal").size == size
