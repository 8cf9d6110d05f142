"""The write-ahead log: appends are durable once their record is written and fsynced.

A WAL file is a sequence of records::

    magic "HSW1" | payload length u32 | sequence number u64 | crc32(seq || payload) u32 | payload

and the payload is ``table name length u16 | table name | Arrow IPC stream of the rows``, encrypted as
a whole (bound to the sequence number) when the store is encrypted. Records are only ever appended,
one ``write`` + ``fdatasync`` each, so a crash can tear only the last record: :func:`scan` reports such
a torn tail (to be truncated), and refuses a file whose damage is followed by valid records, since
dropping those would lose acknowledged rows.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from hyprstream.errors import StoreError
from hyprstream.store.crypto import Cipher

MAGIC = b"HSW1"
HEADER = struct.Struct("<4sIQI")
_NAME_LEN = struct.Struct("<H")
_SEQ = struct.Struct("<Q")


@dataclass(frozen=True)
class WalEntry:
    """One decoded record: the rows of one append."""

    seq: int
    table: str
    rows: pa.Table


@dataclass(frozen=True)
class WalScan:
    """The valid records of a WAL region; ``end`` is the file offset just after the last one."""

    entries: list[WalEntry]
    end: int
    torn_bytes: int


def _aad(seq: int) -> bytes:
    return b"wal" + _SEQ.pack(seq)


def ipc_payload(rows: pa.Table) -> pa.Buffer:
    """``rows`` as Arrow IPC stream bytes (an independent copy of the data)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_table(rows)
    return sink.getvalue()


def decode_payload(ipc: pa.Buffer) -> pa.Table:
    """Inverse of :func:`ipc_payload`; the table's buffers are views onto ``ipc``."""
    return pa.ipc.open_stream(ipc).read_all()


def encode_record(seq: int, table: str, ipc: pa.Buffer, cipher: Cipher | None = None) -> bytes:
    """The bytes of the WAL record for the rows ``ipc`` (see :func:`ipc_payload`) appended to ``table``."""
    name = table.encode()
    payload: bytes = b"".join((_NAME_LEN.pack(len(name)), name, memoryview(ipc)))
    if cipher is not None:
        payload = cipher.encrypt(payload, _aad(seq))
    crc = zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq)))
    return HEADER.pack(MAGIC, len(payload), seq, crc) + payload


def _valid_at(buf: memoryview, pos: int) -> tuple[int, int, memoryview] | None:
    """``(seq, record length, payload)`` of a well-formed record at ``pos``, else None."""
    if len(buf) - pos < HEADER.size:
        return None
    magic, length, seq, crc = HEADER.unpack_from(buf, pos)
    if magic != MAGIC:
        return None
    start = pos + HEADER.size
    if len(buf) - start < length:
        return None
    payload = buf[start : start + length]
    if zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq))) != crc:
        return None
    return seq, HEADER.size + length, payload


def _decode(seq: int, payload: memoryview, cipher: Cipher | None, source: str) -> WalEntry:
    data = cipher.decrypt(payload, _aad(seq), what=f"{source} record {seq}") if cipher is not None else bytes(payload)
    try:
        (n,) = _NAME_LEN.unpack_from(data, 0)
        table = data[_NAME_LEN.size : _NAME_LEN.size + n].decode()
        rows = decode_payload(pa.py_buffer(data)[_NAME_LEN.size + n :])
    except (struct.error, UnicodeDecodeError, pa.ArrowException) as exc:
        raise StoreError(f"{source}: record {seq} cannot be decoded ({exc})") from exc
    return WalEntry(seq=seq, table=table, rows=rows)


def scan(data: bytes, *, offset: int = 0, cipher: Cipher | None = None, source: str = "WAL") -> WalScan:
    """Decode the records in ``data``, which starts at file offset ``offset``.

    Raises StoreError when a damaged record is followed by a valid one (mid-file corruption).
    """
    buf = memoryview(data)
    entries: list[WalEntry] = []
    pos = 0
    while pos < len(buf):
        found = _valid_at(buf, pos)
        if found is None:
            break
        seq, length, payload = found
        entries.append(_decode(seq, payload, cipher, source))
        pos += length
    if pos < len(buf):
        nxt = data.find(MAGIC, pos + 1)
        while nxt != -1:
            if _valid_at(buf, nxt) is not None:
                raise StoreError(
                    f"{source}: damaged record at offset {offset + pos} is followed by valid records; "
                    "refusing to drop acknowledged data"
                )
            nxt = data.find(MAGIC, nxt + 1)
    return WalScan(entries=entries, end=offset + pos, torn_bytes=len(buf) - pos)


def read_from(path: Path, offset: int) -> bytes:
    """The bytes of ``path`` from ``offset`` on (FileNotFoundError propagates)."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read()


class WalWriter:
    """Appends records to one WAL file; each append is on disk when :meth:`append` returns."""

    def __init__(self, path: Path, *, sync: bool = True) -> None:
        self.path = path
        self._sync = sync
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.size = os.fstat(self._fd).st_size

    def append(self, record: bytes) -> None:
        """Write ``record`` and fsync; on failure the file is cut back to its previous size."""
        view = memoryview(record)
        try:
            while view:
                view = view[os.write(self._fd, view):]
            if self._sync:
                os.fdatasync(self._fd)
        except OSError as exc:
            os.ftruncate(self._fd, self.size)
            raise StoreError(f"{self.path}: cannot append to the write-ahead log: {exc.strerror}") from exc
        self.size += len(record)

    def truncate(self, size: int) -> None:
        """Cut the file to ``size`` bytes (dropping a torn tail) and fsync."""
        os.ftruncate(self._fd, size)
        os.fsync(self._fd)
        self.size = size

    def close(self) -> None:
        os.close(self._fd)
