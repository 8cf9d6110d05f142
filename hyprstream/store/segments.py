"""Immutable segment files: the committed rows of a table, one Arrow IPC file each.

A segment is written once (temporary file, fsync, atomic rename, directory fsync) and never
modified; it becomes part of a table only when a manifest that lists it is committed. Plain segments
are memory-mapped on read, so the Arrow buffers handed to callers (and to DuckDB) are the page cache
itself; encrypted segments are decrypted into memory. The manifest keeps each file's size and CRC-32,
checked when a segment is loaded.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from hyprstream.errors import StoreError, ValidationError
from hyprstream.store.crypto import Cipher
from hyprstream.store.files import write_atomic
from hyprstream.store.manifest import SegmentMeta

SEGMENT_DIR = "segments"
_SECONDS_PER_UNIT = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def segment_file(seg_id: int) -> str:
    return f"{seg_id:012d}.arrow"


def check_time_type(name: str, type_: pa.DataType) -> None:
    """ValidationError unless a column of ``type_`` can serve as a retention time column."""
    if not (pa.types.is_timestamp(type_) or pa.types.is_integer(type_) or pa.types.is_floating(type_)):
        raise ValidationError(
            f"time column {name!r} has type {type_}; expected a timestamp or numeric seconds"
        )


def time_range(column: pa.ChunkedArray) -> tuple[float | None, float | None]:
    """``(min, max)`` of a time column in seconds since the epoch; ``(None, None)`` if all null."""
    if pa.types.is_timestamp(column.type):
        scale = _SECONDS_PER_UNIT[column.type.unit]
        column = column.cast(pa.int64())
    else:
        scale = 1.0
    mm = pc.min_max(column)
    lo, hi = mm["min"].as_py(), mm["max"].as_py()
    if lo is None or hi is None:
        return None, None
    return float(lo) * scale, float(hi) * scale


def split_rows(table: pa.Table, max_bytes: int) -> list[pa.Table]:
    """``table`` cut into consecutive slices of about ``max_bytes`` each (zero-copy)."""
    if table.num_rows == 0:
        return []
    per_row = max(table.nbytes / table.num_rows, 1e-9)
    rows = max(1, int(max_bytes / per_row))
    n = math.ceil(table.num_rows / rows)
    return [table.slice(i * rows, rows) for i in range(n)]


def encode(table: pa.Table) -> pa.Buffer:
    """The Arrow IPC file bytes of ``table`` as one contiguous record batch."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return sink.getvalue()


def write_segment(
    directory: Path,
    seg_id: int,
    table: pa.Table,
    *,
    cipher: Cipher | None,
    time_column: str | None,
    sync: bool = True,
) -> SegmentMeta:
    """Write ``table`` as segment ``seg_id`` in ``directory`` and describe it."""
    name = segment_file(seg_id)
    data: pa.Buffer | bytes = encode(table)
    if cipher is not None:
        data = cipher.encrypt(memoryview(data), name.encode())
    write_atomic(directory / name, memoryview(data), sync=sync)
    lo, hi = time_range(table.column(time_column)) if time_column is not None else (None, None)
    return SegmentMeta(id=seg_id, file=name, rows=table.num_rows, bytes=len(memoryview(data)),
                       crc32=zlib.crc32(memoryview(data)), min_time=lo, max_time=hi)


def read_segment(directory: Path, meta: SegmentMeta, *, cipher: Cipher | None, verify: bool = True) -> pa.Table:
    """The rows of a committed segment; FileNotFoundError if it was removed meanwhile."""
    path = directory / meta.file
    if cipher is None:
        buf: pa.Buffer = pa.memory_map(str(path), "r").read_buffer()
    else:
        buf = pa.py_buffer(path.read_bytes())
    if buf.size != meta.bytes:
        raise StoreError(f"{path}: segment has {buf.size} bytes, the manifest says {meta.bytes} (truncated?)")
    if verify and zlib.crc32(memoryview(buf)) != meta.crc32:
        raise StoreError(f"{path}: segment checksum mismatch (corrupted)")
    if cipher is not None:
        buf = pa.py_buffer(cipher.decrypt(memoryview(buf), meta.file.encode(), what=str(path)))
    try:
        table = pa.ipc.open_file(buf).read_all()
    except pa.ArrowException as exc:
        raise StoreError(f"{path}: unreadable segment ({exc})") from exc
    if table.num_rows != meta.rows:
        raise StoreError(f"{path}: segment has {table.num_rows} rows, the manifest says {meta.rows}")
    return table
