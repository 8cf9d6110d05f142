"""The store manifest: which tables exist, their schemas, retention and committed segments.

The manifest is one JSON file replaced atomically (see :mod:`hyprstream.store.files`); the store's
state is whatever the last committed manifest says plus the write-ahead log records newer than each
table's ``flushed_seq``. Every append gets a sequence number; a table's ``flushed_seq`` is the
highest sequence number whose rows are already in its segments.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from hyprstream.errors import StoreError
from hyprstream.store.files import write_atomic
from hyprstream.store.retention import Retention

FORMAT = "hyprstream.store.manifest/1"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class SegmentMeta:
    """One immutable segment file of a table."""

    id: int
    file: str
    rows: int
    bytes: int
    crc32: int
    min_time: float | None = None
    max_time: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "file": self.file, "rows": self.rows, "bytes": self.bytes,
                "crc32": self.crc32, "min_time": self.min_time, "max_time": self.max_time}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SegmentMeta:
        return cls(id=int(d["id"]), file=str(d["file"]), rows=int(d["rows"]), bytes=int(d["bytes"]),
                   crc32=int(d["crc32"]), min_time=d.get("min_time"), max_time=d.get("max_time"))


@dataclass(frozen=True)
class TableMeta:
    """A table: schema, retention, segments oldest first, and the last sequence number they hold."""

    name: str
    schema: pa.Schema
    retention: Retention
    flushed_seq: int
    segments: tuple[SegmentMeta, ...] = ()

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.segments)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.segments)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": base64.b64encode(self.schema.serialize().to_pybytes()).decode("ascii"),
            "schema_text": self.schema.to_string(show_schema_metadata=False),
            "retention": self.retention.to_dict(),
            "flushed_seq": self.flushed_seq,
            "segments": [s.to_dict() for s in self.segments],
        }

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> TableMeta:
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(d["schema"])))
        return cls(name=name, schema=schema, retention=Retention.from_dict(d["retention"]),
                   flushed_seq=int(d["flushed_seq"]),
                   segments=tuple(SegmentMeta.from_dict(s) for s in d["segments"]))


@dataclass(frozen=True)
class Manifest:
    """The committed state of a store."""

    wal: str
    last_seq: int = 0
    next_segment_id: int = 1
    wal_generation: int = 1
    tables: Mapping[str, TableMeta] = field(default_factory=dict)

    def with_table(self, meta: TableMeta) -> Manifest:
        return replace(self, tables={**self.tables, meta.name: meta})

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "wal": self.wal,
            "wal_generation": self.wal_generation,
            "last_seq": self.last_seq,
            "next_segment_id": self.next_segment_id,
            "tables": {name: t.to_dict() for name, t in self.tables.items()},
        }
        return json.dumps(doc, separators=(",", ":")).encode()  # compact: json's C encoder (written per commit)

    @classmethod
    def from_json(cls, data: bytes, *, source: str) -> Manifest:
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT:
                raise StoreError(f"{source}: unknown manifest format {doc.get('format')!r}")
            return cls(
                wal=str(doc["wal"]),
                wal_generation=int(doc["wal_generation"]),
                last_seq=int(doc["last_seq"]),
                next_segment_id=int(doc["next_segment_id"]),
                tables={name: TableMeta.from_dict(name, t) for name, t in doc["tables"].items()},
            )
        except StoreError:
            raise
        except (ValueError, KeyError, TypeError, pa.ArrowException) as exc:
            raise StoreError(f"{source}: corrupted manifest ({exc})") from exc


def load(root: Path) -> Manifest:
    """The committed manifest of the store at ``root``."""
    path = root / MANIFEST_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"{root}: store has no manifest") from None
    return Manifest.from_json(data, source=str(path))


def save(root: Path, manifest: Manifest, *, sync: bool = True) -> None:
    """Commit ``manifest`` atomically and durably."""
    write_atomic(root / MANIFEST_FILE, manifest.to_json(), sync=sync)
