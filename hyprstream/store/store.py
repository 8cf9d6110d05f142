"""The local store: named Arrow tables with durable appends, bounded by retention.

On disk a store is a directory::

    STORE            marker: format, whether encrypted, a key check (and those of retired keys)
    LOCK             held (flock) by the one writer process; holds its PID
    manifest.json    committed state: tables, schemas, retention, segments (see manifest.py)
    segments/*.arrow immutable Arrow IPC files (see segments.py)
    wal/*.wal        the current write-ahead log (see wal.py)
    ROTATION         only during a key rotation, once it is committed (see :meth:`Store.rotate_key`)

An append is acknowledged once it is durable: either its record is fsynced in the write-ahead log
(small appends, buffered in memory until a table has a segment's worth), or it went straight into a
new segment committed by the manifest (large appends). Opening the store as the writer recovers:
it drops uncommitted files, truncates a torn log tail (with a warning) and replays the log. Readers
(``readonly=True``, any number of processes) see the committed segments plus the log records newer
than them, so every acknowledged row.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa

from hyprstream.errors import StoreError, ValidationError
from hyprstream.store import manifest as manifests
from hyprstream.store import segments, vector, wal
from hyprstream.store.config import StoreConfig
from hyprstream.store.crypto import Cipher
from hyprstream.store.files import fsync_dir, remove_temporaries, write_atomic
from hyprstream.store.manifest import Manifest, SegmentMeta, TableMeta
from hyprstream.store.retention import Retention, segments_to_drop
from hyprstream.store.schema import check_schema, check_table_name, conform

_log = logging.getLogger("hyprstream.store")

MARKER_FILE = "STORE"
MARKER_FORMAT = "hyprstream.store/1"
LOCK_FILE = "LOCK"
ROTATION_FILE = "ROTATION"
WAL_DIR = "wal"
_READER_ATTEMPTS = 100


def _wal_name(generation: int) -> str:
    return f"{generation:012d}.wal"


class _Buffered:
    """Rows of one table that are in the write-ahead log but not yet in a segment, with running totals."""

    def __init__(self) -> None:
        self.parts: list[tuple[int, pa.Table]] = []
        self.rows = 0
        self.nbytes = 0

    @property
    def last_seq(self) -> int:
        return self.parts[-1][0]

    def add(self, seq: int, table: pa.Table) -> None:
        self.parts.append((seq, table))
        self.rows += table.num_rows
        self.nbytes += table.nbytes

    def tables(self) -> list[pa.Table]:
        return [t for _, t in self.parts]

    def drop_through(self, seq: int) -> None:
        """Forget the rows of sequence numbers up to ``seq`` (now in segments)."""
        if self.parts and self.parts[0][0] <= seq:
            self.parts = [(s, t) for s, t in self.parts if s > seq]
            self.rows = sum(t.num_rows for _, t in self.parts)
            self.nbytes = sum(t.nbytes for _, t in self.parts)


@dataclass(frozen=True)
class TableInfo:
    """What :meth:`Store.info` reports about a table."""

    name: str
    schema: pa.Schema
    retention: Retention
    rows: int
    bytes: int
    segments: int
    buffered_rows: int


@dataclass(frozen=True)
class Compaction:
    """Outcome of :meth:`Store.compact`."""

    segments_before: int
    segments_after: int


class Store:
    """A directory of named Arrow tables. Open with :meth:`Store.open`; close or use as a context manager."""

    def __init__(
        self,
        root: Path,
        *,
        readonly: bool,
        config: StoreConfig,
        cipher: Cipher | None,
        lock_fd: int | None,
    ) -> None:
        self.root = root
        self.readonly = readonly
        self.config = config
        self._cipher = cipher
        self._lock_fd = lock_fd
        self._lock = threading.RLock()
        self._closed = False
        self._segdir = root / segments.SEGMENT_DIR
        self._waldir = root / WAL_DIR
        self._manifest = manifests.load(root)
        self._buffered: dict[str, _Buffered] = {}
        self._cache: dict[int, pa.Table] = {}
        self._vectors: dict[tuple[int, str], vector.Part] = {}
        self._last_seq = self._manifest.last_seq
        self._wal: wal.WalWriter | None = None
        # readers: (WAL file, offset up to which its records were read, highest sequence number read)
        self._wal_seen: tuple[str, int, int] = ("", 0, 0)

    # ------------------------------------------------------------------ opening and closing

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        create: bool = False,
        readonly: bool = False,
        key: bytes | None = None,
        config: StoreConfig | None = None,
    ) -> Store:
        """Open the store at directory ``path``.

        ``create`` makes a new store when there is none. ``readonly`` opens as a reader: no lock is
        taken and mutations raise StoreError. ``key`` (32 bytes, see :func:`~hyprstream.store.crypto.load_key`)
        is needed for an encrypted store; creating a store with a key makes it encrypted.
        Raises StoreError when the directory holds no store, another process is writing it, or the
        key is missing or wrong.
        """
        root = Path(path)
        config = config or StoreConfig()
        cipher = Cipher(key) if key is not None else None
        if readonly and create:
            raise StoreError(f"{root}: cannot create a store read-only")
        if not root.is_dir():
            if not create:
                raise StoreError(f"{root}: no store here (directory does not exist)")
            root.mkdir(parents=True, exist_ok=True)
        marker = root / MARKER_FILE
        if not marker.exists() and not create:
            raise StoreError(f"{root}: not a hyprstream store (no {MARKER_FILE} file)")
        lock_fd = None if readonly else _acquire_lock(root)
        try:
            if (root / ROTATION_FILE).exists():
                if readonly:
                    raise StoreError(f"{root}: a key rotation is being installed; open the store for writing "
                                     "to finish it, or retry")
                _finish_rotation(root, sync=config.sync)
            if not marker.exists():
                _initialise(root, cipher, config)
            _check_marker(root, cipher)
            store = cls(root, readonly=readonly, config=config, cipher=cipher, lock_fd=lock_fd)
            if not readonly:
                store._recover()
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        return store

    def close(self) -> None:
        """Checkpoint buffered rows into segments (writer), release the lock. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._wal is not None:
                    self._checkpoint()
                    self._wal.close()
                    self._wal = None
            finally:
                self._closed = True
                self._cache.clear()
                self._vectors.clear()
                self._buffered.clear()
                if self._lock_fd is not None:
                    os.close(self._lock_fd)
                    self._lock_fd = None

    def _abandon(self) -> None:
        """Close without a checkpoint (the state on disk is left for the next open to recover)."""
        self._closed = True
        if self._wal is not None:
            self._wal.close()
            self._wal = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "closed" if self._closed else ("read-only" if self.readonly else "writer")
        return f"Store({str(self.root)!r}, {mode})"

    # ------------------------------------------------------------------ tables

    def create_table(self, name: str, schema: pa.Schema, retention: Retention | None = None) -> None:
        """Create table ``name``; idempotent for the same schema (retention is then updated).

        StoreError if the table exists with a different schema; ValidationError for a bad name,
        schema or retention time column.
        """
        check_table_name(name)
        check_schema(schema, table=name)
        retention = retention or Retention()
        if retention.time_column is not None:
            idx = schema.get_field_index(retention.time_column)
            if idx < 0:
                raise ValidationError(f"table {name!r}: retention time column {retention.time_column!r} is not in the schema")
            segments.check_time_type(retention.time_column, schema.field(idx).type)
        with self._lock:
            self._check_writable()
            old = self._manifest.tables.get(name)
            if old is not None:
                if not old.schema.equals(schema, check_metadata=False):
                    raise StoreError(
                        f"table {name!r} exists with a different schema:\n{old.schema}\nnot\n{schema}"
                    )
                if old.retention != retention:
                    self._commit(self._manifest.with_table(replace(old, retention=retention)))
                    _log.info("table %s: retention set to %s", name, retention)
                    self._enforce_retention(name)
                return
            self._last_seq += 1
            meta = TableMeta(name=name, schema=schema, retention=retention, flushed_seq=self._last_seq)
            try:
                self._commit(self._manifest.with_table(meta))
            except BaseException:
                self._last_seq -= 1
                raise
            _log.info("table %s created", name)

    def drop_table(self, name: str) -> None:
        """Remove table ``name`` and its data."""
        with self._lock:
            self._check_writable()
            meta = self._meta(name)
            tables = {k: v for k, v in self._manifest.tables.items() if k != name}
            self._commit(replace(self._manifest, tables=tables))
            self._buffered.pop(name, None)
            self._remove_segment_files(meta.segments)
            _log.info("table %s dropped", name)

    def tables(self) -> list[str]:
        """Names of the tables, in creation order."""
        with self._lock:
            self._refresh(())
            return list(self._manifest.tables)

    def schema(self, name: str) -> pa.Schema:
        """The schema of table ``name``."""
        with self._lock:
            self._refresh(())
            return self._meta(name).schema

    def retention(self, name: str) -> Retention:
        """The retention limits of table ``name``."""
        with self._lock:
            self._refresh(())
            return self._meta(name).retention

    def info(self, name: str) -> TableInfo:
        """Sizes and settings of table ``name``."""
        with self._lock:
            self._refresh(())
            meta = self._meta(name)
            buf = self._buffered.get(name, _Buffered())
            return TableInfo(name=name, schema=meta.schema, retention=meta.retention,
                             rows=meta.rows + buf.rows, bytes=meta.bytes + buf.nbytes,
                             segments=len(meta.segments), buffered_rows=buf.rows)

    def num_rows(self, name: str) -> int:
        """Rows table ``name`` holds now."""
        return self.info(name).rows

    def nbytes(self, name: str) -> int:
        """Bytes table ``name`` takes: its segment files plus the Arrow size of its buffered rows."""
        return self.info(name).bytes

    # ------------------------------------------------------------------ writing

    def append(self, name: str, data: pa.Table | pa.RecordBatch) -> int:
        """Append rows to table ``name``; they are durable when this returns. Returns the row count.

        ValidationError (naming the column) when ``data`` does not match the table's schema.
        """
        with self._lock:
            self._check_writable()
            meta = self._meta(name)
            rows = conform(data, meta.schema, table=name)
            if rows.num_rows == 0:
                return 0
            assert self._wal is not None
            seq = self._last_seq + 1
            buf = self._buffered.setdefault(name, _Buffered())
            if buf.nbytes + rows.nbytes >= self.config.segment_bytes:
                self._last_seq = seq
                try:
                    self._write_segments({name: ([*buf.tables(), rows], seq)})
                except BaseException:
                    self._last_seq = seq - 1
                    raise
            else:
                payload = wal.ipc_payload(rows)
                self._wal.append(wal.encode_record(seq, name, payload, self._cipher))
                self._last_seq = seq
                buf.add(seq, wal.decode_payload(payload))
                if self._wal.size >= self.config.wal_max_bytes:
                    self._checkpoint()
            self._enforce_retention(name)
            return rows.num_rows

    def flush(self) -> None:
        """Write every buffered row into segments and start a fresh write-ahead log."""
        with self._lock:
            self._check_writable()
            self._checkpoint()

    def compact(self, name: str) -> Compaction:
        """Merge runs of small consecutive segments of ``name`` into segments of about ``segment_bytes``.

        Buffered rows are written out first, so afterwards the table is in as few segments as the
        segment size allows. Row order is kept.
        """
        with self._lock:
            self._check_writable()
            buf = self._buffered.get(name)
            if buf is not None and buf.parts:
                self._write_segments({name: (buf.tables(), buf.last_seq)})
            meta = self._meta(name)
            groups = _merge_groups(meta.segments, self.config.segment_bytes)
            new: list[SegmentMeta] = []
            old: list[SegmentMeta] = []
            next_id = self._manifest.next_segment_id
            for group in groups:
                if len(group) == 1:
                    new.append(group[0])
                    continue
                merged = pa.concat_tables([self._segment(s) for s in group])
                new.append(self._write_segment_file(next_id, merged, meta))
                next_id += 1
                old.extend(group)
            if old:
                m = replace(self._manifest, next_segment_id=next_id).with_table(replace(meta, segments=tuple(new)))
                self._commit(m)
                self._remove_segment_files(old)
                _log.info("table %s compacted: %d -> %d segments", name, len(meta.segments), len(new))
            return Compaction(segments_before=len(meta.segments), segments_after=len(new))

    # ------------------------------------------------------------------ key rotation

    def rotate_key(self, new_key: bytes) -> int:
        """Re-encrypt the whole store under ``new_key``; the current key is refused from then on.

        The store stays open and usable: appends wait while it runs and then go on under the new key.
        Steps: checkpoint (every acknowledged row into segments, an empty log), write every segment
        again under the new key as new files, commit by writing the ``ROTATION`` journal (the new
        manifest and marker) atomically, then install both and remove the old files and the journal.
        A crash before the commit leaves the store on the old key (the new files are uncommitted and
        dropped at the next open); after it, the next writer open finishes the installation. Readers
        in other processes must reopen with the new key. Returns the number of segments re-encrypted.
        """
        with self._lock:
            count = self._prepare_rotation(new_key)
            try:
                _finish_rotation(self.root, sync=self.config.sync)
            except BaseException:
                # committed but not installed: appends here would be lost when the next open installs it
                self._abandon()
                raise
            self._cipher = Cipher(new_key)
            self._manifest = manifests.load(self.root)
            self._cache.clear()
            self._vectors.clear()
            _log.info("store %s: key rotated, %d segments re-encrypted", self.root, count)
            return count

    def _prepare_rotation(self, new_key: bytes) -> int:
        """Steps up to the commit point of :meth:`rotate_key`; returns the segments written."""
        self._check_writable()
        if self._cipher is None:
            raise StoreError(f"{self.root}: store is not encrypted; there is no key to rotate")
        new = Cipher(new_key)
        marker = _read_marker(self.root)
        for token in [marker["key_check"], *marker.get("retired_key_checks", [])]:
            try:
                new.verify_key_check(base64.b64decode(token), store=str(self.root))
            except StoreError:
                continue
            what = "the store's current key" if token == marker["key_check"] else "retired by a key rotation"
            raise StoreError(f"{self.root}: the new key is {what}; give another key")
        assert self._wal is not None
        self._checkpoint()
        m = self._manifest
        next_id = m.next_segment_id
        for name, meta in m.tables.items():
            moved = []
            for seg in meta.segments:
                table = segments.read_segment(self._segdir, seg, cipher=self._cipher,
                                              verify=self.config.verify_segments)
                moved.append(segments.write_segment(self._segdir, next_id, table, cipher=new,
                                                    time_column=meta.retention.time_column, sync=self.config.sync))
                next_id += 1
            m = m.with_table(replace(meta, segments=tuple(moved)))
        m = replace(m, next_segment_id=next_id, last_seq=self._last_seq)
        if self.config.sync:
            fsync_dir(self._segdir)
        retired = [marker["key_check"], *marker.get("retired_key_checks", [])]
        new_marker = {**_marker(new), "retired_key_checks": retired}
        journal = {"manifest": json.loads(m.to_json()), "marker": new_marker}
        write_atomic(self.root / ROTATION_FILE, json.dumps(journal).encode(), sync=self.config.sync)
        return sum(len(t.segments) for t in m.tables.values())

    # ------------------------------------------------------------------ reading

    def read(self, name: str, columns: Sequence[str] | None = None) -> pa.Table:
        """Every acknowledged row of ``name`` still retained, in append order (zero-copy where possible)."""
        table = self._snapshot((name,))[name]
        if columns is not None:
            missing = [c for c in columns if c not in table.column_names]
            if missing:
                raise ValidationError(f"table {name!r} has no column {missing[0]!r}")
            table = table.select(list(columns))
        return table

    def sql(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> pa.Table:
        """Run a DuckDB SQL query in which every table of the store is visible by its name.

        The tables are one consistent snapshot, scanned in place (no copy into DuckDB).
        """
        from hyprstream.store import sql  # DuckDB loads on first use: agents and core start faster

        return sql.run(self._snapshot(None), query, params)

    def search(
        self,
        name: str,
        column: str,
        queries: np.ndarray,
        *,
        k: int = 10,
        metric: vector.Metric | str = vector.Metric.COSINE,
        where: Any = None,
        columns: Sequence[str] = (),
    ) -> pa.Table:
        """Exact top-``k`` rows of ``name`` by similarity of ``column`` to each query vector.

        ``queries`` is one vector ``(d,)`` or a batch ``(b, d)``; ``metric`` is cosine or inner
        product; ``where`` is an optional ``pyarrow.compute`` expression the rows must satisfy.
        Returns a table with ``query``, ``rank``, ``row`` (position in :meth:`read` order),
        ``score`` and the requested ``columns``, best first per query. Cosine search keeps a
        row-normalised copy of the column in memory (per segment, dropped with the segment).
        """
        try:
            metric = vector.Metric(metric)
        except ValueError:
            raise ValidationError(f"unknown metric {metric!r}; use one of {[m.value for m in vector.Metric]}") from None
        with self._lock:
            self._refresh((name,))
            meta = self._meta(name)
            field_ = meta.schema.field(column) if meta.schema.get_field_index(column) >= 0 else None
            if field_ is None:
                raise ValidationError(f"table {name!r} has no column {column!r}")
            vector.check_embedding_type(column, field_.type)
            seg_parts = [(s, self._segment(s)) for s in meta.segments]
            buf_tables = self._buffered.get(name, _Buffered()).tables()
            parts = [self._vector_part(s.id, column, t) for s, t in seg_parts]
            parts += [vector.Part.build(t.column(column)) for t in buf_tables]
            tables = [t for _, t in seg_parts] + buf_tables
        table = pa.concat_tables(tables) if tables else meta.schema.empty_table()
        mask = vector.filter_mask(table, where) if where is not None else None
        found = vector.top_k(parts, vector.as_queries(queries, field_.type.list_size), k, metric, mask=mask)
        return vector.result_table(found, table, columns)

    # ------------------------------------------------------------------ internals: state

    def _check_writable(self) -> None:
        self._check_open()
        if self.readonly:
            raise StoreError(f"{self.root}: store is open read-only")

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.root}: store is closed")

    def _meta(self, name: str) -> TableMeta:
        meta = self._manifest.tables.get(name)
        if meta is None:
            raise StoreError(f"{self.root}: no table {name!r}")
        return meta

    def _snapshot(self, names: Sequence[str] | None) -> dict[str, pa.Table]:
        """The current rows of tables ``names`` (None: all), from one consistent state of the store."""
        with self._lock:
            self._refresh(names)
            out = {}
            for name in names if names is not None else list(self._manifest.tables):
                meta = self._meta(name)
                parts = [self._segment(s) for s in meta.segments]
                parts += self._buffered[name].tables() if name in self._buffered else []
                out[name] = pa.concat_tables(parts) if parts else meta.schema.empty_table()
            return out

    def _segment(self, meta: SegmentMeta) -> pa.Table:
        table = self._cache.get(meta.id)
        if table is None:
            try:
                table = segments.read_segment(self._segdir, meta, cipher=self._cipher,
                                              verify=self.config.verify_segments)
            except FileNotFoundError:
                if self.readonly:
                    raise
                raise StoreError(f"{self._segdir / meta.file}: committed segment is missing") from None
            self._cache[meta.id] = table
        return table

    def _vector_part(self, seg_id: int, column: str, table: pa.Table) -> vector.Part:
        key = (seg_id, column)
        part = self._vectors.get(key)
        if part is None:
            part = self._vectors[key] = vector.Part.build(table.column(column))
        return part

    def _commit(self, manifest: Manifest) -> None:
        manifest = replace(manifest, last_seq=self._last_seq)
        manifests.save(self.root, manifest, sync=self.config.sync)
        self._manifest = manifest

    def _write_segment_file(self, seg_id: int, table: pa.Table, meta: TableMeta) -> SegmentMeta:
        return segments.write_segment(self._segdir, seg_id, table, cipher=self._cipher,
                                      time_column=meta.retention.time_column, sync=self.config.sync)

    def _write_segments(self, parts: Mapping[str, tuple[list[pa.Table], int]], *, wal_generation: int | None = None) -> None:
        """Write ``{table: (rows, highest seq they include)}`` as new segments and commit them."""
        m = self._manifest
        next_id = m.next_segment_id
        for name, (tables, seq) in parts.items():
            meta = m.tables[name]
            new = []
            for piece in segments.split_rows(pa.concat_tables(tables), self.config.segment_bytes):
                new.append(self._write_segment_file(next_id, piece, meta))
                next_id += 1
            m = m.with_table(replace(meta, segments=meta.segments + tuple(new), flushed_seq=seq))
        m = replace(m, next_segment_id=next_id)
        if wal_generation is not None:
            m = replace(m, wal=_wal_name(wal_generation), wal_generation=wal_generation)
        self._commit(m)
        for name, (_, seq) in parts.items():
            if name in self._buffered:
                self._buffered[name].drop_through(seq)

    def _checkpoint(self) -> None:
        """Write all buffered rows to segments and switch to a new, empty write-ahead log."""
        assert self._wal is not None
        pending = {n: (b.tables(), b.last_seq) for n, b in self._buffered.items() if b.parts}
        if not pending and self._wal.size == 0:
            return
        gen = self._manifest.wal_generation + 1
        new_wal = wal.WalWriter(self._waldir / _wal_name(gen), sync=self.config.sync)
        if self.config.sync:
            fsync_dir(self._waldir)
        self._write_segments(pending, wal_generation=gen)
        old = self._wal
        self._wal = new_wal
        old.close()
        old.path.unlink(missing_ok=True)
        if self.config.sync:
            fsync_dir(self._waldir)

    def _enforce_retention(self, name: str) -> None:
        meta = self._manifest.tables[name]
        drop = set(segments_to_drop(meta.segments, meta.retention, self.config.clock()))
        if not drop:
            return
        gone = [s for s in meta.segments if s.id in drop]
        kept = tuple(s for s in meta.segments if s.id not in drop)
        self._commit(self._manifest.with_table(replace(meta, segments=kept)))
        self._remove_segment_files(gone)
        _log.info("table %s: retention removed %d segments (%d rows, %d bytes)", name, len(gone),
                  sum(s.rows for s in gone), sum(s.bytes for s in gone))

    def _remove_segment_files(self, metas: Iterable[SegmentMeta]) -> None:
        for s in metas:
            self._cache.pop(s.id, None)
            for key in [k for k in self._vectors if k[0] == s.id]:
                del self._vectors[key]
            (self._segdir / s.file).unlink(missing_ok=True)
        if self.config.sync:
            fsync_dir(self._segdir)

    # ------------------------------------------------------------------ internals: recovery, readers

    def _recover(self) -> None:
        """Writer start-up: drop uncommitted files, repair a torn log tail, replay the log."""
        m = self._manifest
        for directory in (self.root, self._segdir, self._waldir):
            remove_temporaries(directory)
        committed = {s.file for t in m.tables.values() for s in t.segments}
        for p in self._segdir.iterdir():
            if p.name not in committed:
                _log.info("removing uncommitted segment %s", p)
                p.unlink()
        for p in self._waldir.iterdir():
            if p.name != m.wal:
                _log.info("removing superseded write-ahead log %s", p)
                p.unlink()
        path = self._waldir / m.wal
        data = path.read_bytes() if path.exists() else b""
        scan = wal.scan(data, cipher=self._cipher, source=str(path))
        self._wal = wal.WalWriter(path, sync=self.config.sync)
        if scan.torn_bytes:
            _log.warning("%s: discarding a torn tail of %d bytes after %d intact records (an interrupted, "
                         "unacknowledged append)", path, scan.torn_bytes, len(scan.entries))
            self._wal.truncate(scan.end)
        self._replay(scan.entries)
        if self.config.sync:
            fsync_dir(self._waldir)
            fsync_dir(self._segdir)
        for name in m.tables:
            self._enforce_retention(name)

    def _replay(self, entries: Iterable[wal.WalEntry]) -> None:
        for e in entries:
            self._last_seq = max(self._last_seq, e.seq)
            meta = self._manifest.tables.get(e.table)
            if meta is not None and e.seq > meta.flushed_seq:
                self._buffered.setdefault(e.table, _Buffered()).add(e.seq, e.rows)

    def _refresh(self, names: Iterable[str] | None) -> None:
        """Readers: pick up the latest manifest, the segments of ``names`` (None: all) and new log records."""
        self._check_open()
        if not self.readonly:
            return
        wanted = tuple(names) if names is not None else None
        last_error = ""
        for attempt in range(_READER_ATTEMPTS):
            m = manifests.load(self.root)
            wal_file, offset, seen = self._wal_seen
            fresh = wal_file != m.wal
            if fresh:
                wal_file, offset, seen = m.wal, 0, 0
            try:
                for n in wanted if wanted is not None else m.tables:
                    if n in m.tables:
                        for s in m.tables[n].segments:
                            self._segment(s)
                data = wal.read_from(self._waldir / wal_file, offset)
            except FileNotFoundError as exc:  # the writer moved on meanwhile: look again
                last_error = str(exc)
                time.sleep(min(0.05, 1e-4 * 2**attempt))
                continue
            scan = wal.scan(data, offset=offset, cipher=self._cipher, source=str(self._waldir / wal_file))
            if not _follows(scan.entries, max(m.last_seq, seen)):
                last_error = "the log holds appends newer than the manifest read"
                time.sleep(min(0.05, 1e-4 * 2**attempt))
                continue
            if fresh:
                self._buffered.clear()
            self._manifest = m
            self._wal_seen = (wal_file, scan.end, max([seen, *(e.seq for e in scan.entries)]))
            self._replay(scan.entries)
            for name in list(self._buffered):
                meta = m.tables.get(name)
                if meta is None:
                    del self._buffered[name]
                else:
                    self._buffered[name].drop_through(meta.flushed_seq)
            live = {s.id for t in m.tables.values() for s in t.segments}
            for seg_id in [i for i in self._cache if i not in live]:
                del self._cache[seg_id]
            for key in [k for k in self._vectors if k[0] not in live]:
                del self._vectors[key]
            return
        raise StoreError(f"{self.root}: the store changed too fast to read a consistent state ({last_error})")


def _follows(entries: Sequence[wal.WalEntry], known: int) -> bool:
    """Whether log ``entries`` leave no sequence number after ``known`` unaccounted for.

    Every sequence number is used by one log record or by a manifest commit (a large append
    written straight to a segment, a table creation). A reader that combines a manifest with the
    log must therefore see the records after the manifest's ``last_seq`` without gaps; a gap means
    a newer manifest was committed meanwhile, and the reader must read that one.
    """
    expected = known + 1
    for e in entries:
        if e.seq <= known:
            continue
        if e.seq != expected:
            return False
        expected += 1
    return True


def _merge_groups(segs: Sequence[SegmentMeta], target: int) -> list[list[SegmentMeta]]:
    """Consecutive segments grouped greedily so that each group's bytes stay within ``target``."""
    groups: list[list[SegmentMeta]] = []
    size = 0
    for s in segs:
        if groups and size + s.bytes <= target:
            groups[-1].append(s)
            size += s.bytes
        else:
            groups.append([s])
            size = s.bytes
    return groups


def _acquire_lock(root: Path) -> int:
    """Take the writer lock of ``root`` (flock on LOCK) and record our PID in it."""
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise StoreError(f"{root}: store is open for writing by another process (pid {holder}); "
                             "open it with readonly=True to read") from None
        raise StoreError(f"{root}: cannot lock the store: {exc.strerror}") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _initialise(root: Path, cipher: Cipher | None, config: StoreConfig) -> None:
    """Lay out a new store in ``root`` (the writer lock is held); the marker is written last.

    A manifest without a marker is the trace of an interrupted creation, redone here, unless it
    lists tables: then the marker was removed from a store in use, and nothing is overwritten.
    """
    if (root / manifests.MANIFEST_FILE).exists():
        try:
            tables = manifests.load(root).tables
        except StoreError:
            tables = {}
        if tables:
            raise StoreError(f"{root}: holds a manifest with tables but no {MARKER_FILE} file; not overwriting it")
    (root / segments.SEGMENT_DIR).mkdir(exist_ok=True)
    (root / WAL_DIR).mkdir(exist_ok=True)
    manifests.save(root, Manifest(wal=_wal_name(1)), sync=config.sync)
    write_atomic(root / MARKER_FILE, json.dumps(_marker(cipher)).encode(), sync=config.sync)
    _log.info("created store %s%s", root, " (encrypted)" if cipher is not None else "")


def _marker(cipher: Cipher | None) -> dict[str, Any]:
    return {
        "format": MARKER_FORMAT,
        "encrypted": cipher is not None,
        "key_check": base64.b64encode(cipher.key_check()).decode() if cipher is not None else None,
    }


def _read_marker(root: Path) -> dict[str, Any]:
    try:
        marker = json.loads((root / MARKER_FILE).read_bytes())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{root}: unreadable {MARKER_FILE} file ({exc})") from exc
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        raise StoreError(f"{root}: unknown store format {marker.get('format') if isinstance(marker, dict) else None!r}")
    return marker


def _check_marker(root: Path, cipher: Cipher | None) -> None:
    """StoreError unless ``root`` is a store of a known format and ``cipher`` fits its encryption."""
    marker = _read_marker(root)
    if marker.get("encrypted"):
        if cipher is None:
            raise StoreError(f"{root}: store is encrypted; open it with its key")
        try:
            cipher.verify_key_check(base64.b64decode(marker["key_check"]), store=str(root))
        except StoreError:
            for token in marker.get("retired_key_checks", []):
                try:
                    cipher.verify_key_check(base64.b64decode(token), store=str(root))
                except StoreError:
                    continue
                raise StoreError(f"{root}: this key was retired by a key rotation; open the store with "
                                 "its new key") from None
            raise
    elif cipher is not None:
        raise StoreError(f"{root}: store is not encrypted, but a key was given")


def _finish_rotation(root: Path, *, sync: bool) -> None:
    """Install a committed key rotation (the ``ROTATION`` journal): its manifest and marker, then
    remove the segment files it replaced and the journal. Idempotent, so a crash in here is harmless."""
    path = root / ROTATION_FILE
    try:
        journal = json.loads(path.read_bytes())
        manifest = Manifest.from_json(json.dumps(journal["manifest"]).encode(), source=str(path))
        marker = journal["marker"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"{path}: unreadable key rotation journal ({exc})") from exc
    manifests.save(root, manifest, sync=sync)
    write_atomic(root / MARKER_FILE, json.dumps(marker).encode(), sync=sync)
    segdir = root / segments.SEGMENT_DIR
    committed = {s.file for t in manifest.tables.values() for s in t.segments}
    for p in segdir.iterdir():
        if p.name not in committed:
            p.unlink()
    if sync:
        fsync_dir(segdir)
    path.unlink()
    if sync:
        fsync_dir(root)
    _log.info("store %s: key rotation installed", root)
