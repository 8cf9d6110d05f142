"""``hyprstream store``: inspect, fill, query and compact a local store from the shell.

:func:`add_parser` registers the ``store`` subcommand and its subcommands on the main CLI's
subparsers; each subcommand sets ``func``, a handler taking the parsed ``argparse.Namespace`` and
returning the exit status. Handlers raise :class:`~hyprstream.errors.HyprstreamError` subclasses on
failure, for the main CLI to print as one line. Read-only commands (``info``, ``query``,
``search``) open the store as a reader, so they work while an agent is writing to it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from hyprstream.errors import StoreError, ValidationError
from hyprstream.store.crypto import KEY_ENV_VAR, load_key
from hyprstream.store.store import Store
from hyprstream.store.vector import Metric

FORMATS = ("csv", "json")


def _open(args: argparse.Namespace, *, readonly: bool, create: bool = False) -> Store:
    return Store.open(args.path, readonly=readonly, create=create, key=load_key(args.key_file))


def write_table(table: pa.Table, fmt: str, out: TextIO) -> None:
    """``table`` to ``out`` as CSV (with a header) or JSON Lines (one object per row)."""
    if fmt == "csv":
        sink = pa.BufferOutputStream()
        pacsv.write_csv(table, sink)
        out.write(sink.getvalue().to_pybytes().decode())
    else:
        for row in table.to_pylist():
            out.write(json.dumps(row, default=str) + "\n")


def read_input(path: Path) -> pa.Table:
    """The rows of a Parquet, Arrow IPC (file or stream), CSV or JSON Lines file, chosen by its suffix."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pq.read_table(path)
        if suffix in (".arrow", ".feather", ".ipc"):
            try:
                return pa.ipc.open_file(path).read_all()
            except pa.ArrowInvalid:
                return pa.ipc.open_stream(path).read_all()
        if suffix == ".csv":
            return pacsv.read_csv(path)
        if suffix in (".jsonl", ".ndjson", ".json"):
            return pajson.read_json(path)
    except (OSError, pa.ArrowException) as exc:
        raise ValidationError(f"{path}: cannot read input ({exc})") from exc
    raise ValidationError(f"{path}: unknown input format {suffix!r} (use .parquet, .arrow, .csv or .jsonl)")


def cmd_info(args: argparse.Namespace) -> int:
    """Print each table's rows, bytes, segments, retention and (with --schema) schema."""
    with _open(args, readonly=True) as store:
        names = [args.table] if args.table else store.tables()
        for name in names:
            info = store.info(name)
            r = info.retention
            limits = ", ".join(
                f"{k}={v}" for k, v in (("max_bytes", r.max_bytes), ("max_age_s", r.max_age_s),
                                        ("time_column", r.time_column)) if v is not None
            ) or "none"
            print(f"{name}: {info.rows} rows, {info.bytes} bytes, {info.segments} segments, "
                  f"{info.buffered_rows} rows in the log; retention: {limits}")
            if args.schema:
                for field in info.schema:
                    print(f"  {field.name}: {field.type}{'' if field.nullable else ' not null'}")
        if not names:
            print("no tables")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    """Append the rows of a file to a table (created from the file's schema with --create)."""
    table = read_input(Path(args.file))
    with _open(args, readonly=False, create=args.create) as store:
        if args.table not in store.tables():
            if not args.create:
                raise StoreError(f"{args.path}: no table {args.table!r} (pass --create to make it)")
            store.create_table(args.table, table.schema.remove_metadata())
        n = store.append(args.table, table)
    print(f"{n} rows appended to {args.table}")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    """Run one SQL query (DuckDB dialect; tables by name) and print the result."""
    with _open(args, readonly=True) as store:
        result = store.sql(args.sql)
    if args.out is not None:
        pq.write_table(result, args.out)
        print(f"{result.num_rows} rows written to {args.out}")
    else:
        write_table(result, args.format, sys.stdout)
    return 0


def _query_vectors(args: argparse.Namespace) -> np.ndarray:
    if args.vector is not None:
        try:
            return np.array([float(x) for x in args.vector.split(",")], dtype=np.float32)
        except ValueError as exc:
            raise ValidationError(f"--vector: expected comma-separated numbers ({exc})") from exc
    try:
        return np.load(args.vectors, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValidationError(f"{args.vectors}: cannot read a .npy array ({exc})") from exc


def cmd_search(args: argparse.Namespace) -> int:
    """Exact top-k rows by similarity of an embedding column to the query vector(s)."""
    queries = _query_vectors(args)
    columns = [c for c in args.columns.split(",") if c] if args.columns else []
    with _open(args, readonly=True) as store:
        result = store.search(args.table, args.column, queries, k=args.k, metric=args.metric, columns=columns)
    write_table(result, args.format, sys.stdout)
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    """Merge a table's small segments."""
    with _open(args, readonly=False) as store:
        done = store.compact(args.table)
    print(f"{args.table}: {done.segments_before} -> {done.segments_after} segments")
    return 0


def cmd_rotate_key(args: argparse.Namespace) -> int:
    """Re-encrypt an encrypted store under a new key; the current key is refused afterwards."""
    new_key = load_key(args.new_key_file)
    with _open(args, readonly=False) as store:
        count = store.rotate_key(new_key)
    print(f"{args.path}: {count} segments re-encrypted under the new key; the old key is retired")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``store`` and its subcommands on ``subparsers`` (from ``add_subparsers``)."""
    store = subparsers.add_parser(
        "store", help="inspect, fill, query and compact a local Arrow store",
        description="Work with a local Hyprstream store (a directory of durable Arrow tables).",
    )
    sub = store.add_subparsers(dest="store_command", required=True, metavar="COMMAND")

    def command(name: str, help_: str, func: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("path", help="store directory")
        p.add_argument("--key-file", default=None,
                       help=f"key of an encrypted store (default: the {KEY_ENV_VAR} environment variable)")
        p.set_defaults(func=func)
        return p

    p = command("info", "Show the tables of a store: rows, bytes, segments, retention.", cmd_info)
    p.add_argument("--table", default=None, help="only this table")
    p.add_argument("--schema", action="store_true", help="also print each table's columns and types")

    p = command("ingest", "Append the rows of a Parquet, Arrow IPC, CSV or JSON Lines file to a table.",
                cmd_ingest)
    p.add_argument("table", help="table name")
    p.add_argument("file", help="input file (.parquet, .arrow, .csv or .jsonl)")
    p.add_argument("--create", action="store_true",
                   help="create the store and the table (with the file's schema) if missing")

    p = command("query", "Run a SQL query (DuckDB dialect, tables by name) and print the result.", cmd_query)
    p.add_argument("sql", help="the query, e.g. \"SELECT count(*) FROM samples\"")
    p.add_argument("--format", choices=FORMATS, default="csv", help="output format (default: csv)")
    p.add_argument("--out", type=Path, default=None, help="write the result to this Parquet file instead")

    p = command("search", "Exact top-k rows by vector similarity of an embedding column.", cmd_search)
    p.add_argument("table", help="table name")
    p.add_argument("column", help="embedding column (fixed_size_list<float32>)")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--vector", help="one query vector as comma-separated numbers")
    q.add_argument("--vectors", help="a .npy file of one (d,) or several (b, d) query vectors")
    p.add_argument("-k", type=int, default=10, help="results per query (default: 10)")
    p.add_argument("--metric", choices=[m.value for m in Metric], default=Metric.COSINE.value,
                   help="similarity (default: cosine)")
    p.add_argument("--columns", default="", help="comma-separated columns to print with each hit")
    p.add_argument("--format", choices=FORMATS, default="csv", help="output format (default: csv)")

    p = command("compact", "Merge a table's small segments (needs the writer lock).", cmd_compact)
    p.add_argument("table", help="table name")

    p = command("rotate-key", "Re-encrypt an encrypted store under a new key (needs the writer lock; "
                "--key-file is the current key, refused afterwards).", cmd_rotate_key)
    p.add_argument("--new-key-file", required=True, type=Path,
                   help="the new key (32 bytes raw, 64 hex digits or base64)")
    return store
