"""Read-only SQL over the federation's history, served by core as Arrow Flight SQL.

Core's Flight server answers the Flight SQL commands a client such as the ADBC Flight SQL driver
(``adbc-driver-flightsql``) sends, beside its own JSON commands and on the same TLS, tokens and roles:
``CommandStatementQuery`` (``get_flight_info``) and its ``TicketStatementQuery`` (``do_get``),
``CommandGetSqlInfo``, ``CommandGetCatalogs``, ``CommandGetDbSchemas``, ``CommandGetTables`` and
``CommandGetTableTypes``. Prepared statements, transactions and updates are refused: the endpoint is
read-only.

The tables (:data:`TABLES`) are built from core's repository, audit log and metrics for each query, so
they are never stale, and only those the query names are built. ``audit`` needs the permission to read
the audit log (roles auditor and admin); every other table needs the permission to read models (roles
reader, fog and admin). DuckDB runs the query in a fresh in-memory database with no access to files,
extensions or the network, on one thread, under a memory limit, a time limit and a row limit; one
statement, and a ``SELECT`` (or ``WITH``/``VALUES``/``FROM``), per query.

The few protobuf messages of the protocol are written and read here (:func:`pack_any`,
:func:`unpack_any`): they are ``google.protobuf.Any`` values holding messages of one to four fields.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from hyprstream.core.audit import AuditLog, iter_entries
from hyprstream.core.repository import ModelRepository
from hyprstream.errors import ValidationError

TYPE_PREFIX = "type.googleapis.com/arrow.flight.protocol.sql."
MAX_QUERY_CHARS = 64 * 1024
SCHEMA = "main"  # tables are named bare or as main.<table>; there is no catalog


# --- protobuf, the part Flight SQL needs ---------------------------------------------------------------

def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValidationError("malformed protobuf: a varint runs past the message")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def encode(fields: Iterable[tuple[int, bytes | str | int | bool]]) -> bytes:
    """A protobuf message of ``(number, value)`` fields: bytes and str length-delimited, int and bool varint."""
    out = bytearray()
    for number, value in fields:
        if isinstance(value, (bytes, str)):
            raw = value.encode() if isinstance(value, str) else value
            out += _varint(number << 3 | 2) + _varint(len(raw)) + raw
        else:
            out += _varint(number << 3) + _varint(int(value) & 0xFFFFFFFFFFFFFFFF)
    return bytes(out)


def decode(data: bytes) -> dict[int, list[bytes | int]]:
    """The fields of a protobuf message, by number (varint and length-delimited wire types only)."""
    fields: dict[int, list[bytes | int]] = {}
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise ValidationError("malformed protobuf: a field runs past the message")
            value, pos = data[pos:pos + size], pos + size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = int.from_bytes(data[pos:pos + width], "little"), pos + width
        else:
            raise ValidationError(f"malformed protobuf: wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def pack_any(message: str, fields: Iterable[tuple[int, bytes | str | int | bool]] = ()) -> bytes:
    """``google.protobuf.Any`` holding the Flight SQL ``message`` made of ``fields``."""
    return encode([(1, TYPE_PREFIX + message), (2, encode(fields))])


def is_flight_sql(raw: bytes) -> bool:
    """Whether a descriptor command or ticket is a Flight SQL ``Any`` (core's own commands are JSON)."""
    return raw[:1] == b"\n" and TYPE_PREFIX.encode() in raw[:80]


def unpack_any(raw: bytes) -> tuple[str, dict[int, list[bytes | int]]]:
    """The Flight SQL message name and fields inside an ``Any``."""
    fields = decode(raw)
    url = fields.get(1, [b""])[0]
    if not isinstance(url, bytes) or not url.decode(errors="replace").startswith(TYPE_PREFIX):
        raise ValidationError("not a Flight SQL command")
    body = fields.get(2, [b""])[0]
    return url.decode()[len(TYPE_PREFIX):], decode(body if isinstance(body, bytes) else b"")


def text_field(fields: Mapping[int, list], number: int) -> str | None:
    values = fields.get(number)
    if not values or not isinstance(values[-1], bytes):
        return None
    try:
        return values[-1].decode()
    except UnicodeDecodeError:
        raise ValidationError(f"field {number} is not UTF-8") from None


def uint_list(fields: Mapping[int, list], number: int) -> list[int]:
    """A repeated integer field, packed (proto3's default) or not."""
    out: list[int] = []
    for value in fields.get(number, []):
        if isinstance(value, int):
            out.append(value)
            continue
        pos = 0
        while pos < len(value):
            item, pos = _read_varint(value, pos)
            out.append(item)
    return out


# --- the tables ------------------------------------------------------------------------------------------

TS = pa.timestamp("us", tz="UTC")
TABLES: dict[str, pa.Schema] = {
    "models": pa.schema([("model", pa.string()), ("version", pa.int64()), ("committed", TS),
                         ("layers", pa.int64()), ("accuracy", pa.float64()), ("loss", pa.float64())]),
    "versions": pa.schema([("model", pa.string()), ("version", pa.int64()), ("parent", pa.int64()),
                           ("created", TS), ("actor", pa.string()), ("fog", pa.string()), ("seq", pa.int64()),
                           ("participants", pa.int64()), ("layers", pa.list_(pa.string())),
                           ("weight", pa.float64()), ("update_norm", pa.float64()), ("accuracy", pa.float64()),
                           ("loss", pa.float64()), ("epsilon", pa.float64()), ("delta", pa.float64()),
                           ("update_sha256", pa.string()), ("update_bytes", pa.int64()),
                           ("federated_accuracy", pa.float64()), ("federated_loss", pa.float64()),
                           ("federated_devices", pa.int64())]),
    "layer_clocks": pa.schema([("model", pa.string()), ("version", pa.int64()), ("layer", pa.string()),
                               ("node", pa.string()), ("counter", pa.int64()), ("staleness", pa.int64())]),
    "fogs": pa.schema([("fog", pa.string()), ("model", pa.string()), ("pushes", pa.int64()),
                       ("last_seq", pa.int64()), ("last_version", pa.int64()), ("last_push", TS),
                       ("participants", pa.int64())]),
    "audit": pa.schema([("seq", pa.int64()), ("time", TS), ("actor", pa.string()), ("action", pa.string()),
                        ("subject", pa.string()), ("outcome", pa.string()), ("details", pa.string())]),
    "metrics": pa.schema([("name", pa.string()), ("labels", pa.string()), ("value", pa.float64()),
                          ("type", pa.string())]),
}
AUDIT_TABLE = "audit"


def _micros(t: float | None) -> int | None:
    """Unix seconds as the microseconds of a ``timestamp("us")`` column."""
    return None if t is None else int(round(t * 1e6))


def _federated(score: Mapping[str, float] | None) -> dict[str, float | int | None]:
    if score is None:
        return {"federated_accuracy": None, "federated_loss": None, "federated_devices": None}
    return {"federated_accuracy": score["accuracy"], "federated_loss": score["loss"],
            "federated_devices": int(score["devices"])}


@dataclass
class Sources:
    """What the tables are read from."""

    repository: ModelRepository
    audit: AuditLog | None = None
    metrics: Callable[[], Iterable] | None = None  # a prometheus_client registry's ``collect``

    def build(self, name: str) -> pa.Table:
        return pa.Table.from_pylist(getattr(self, f"_{name}")(), schema=TABLES[name])

    def _versions_of_all(self):
        for model in self.repository.models():
            yield model, self.repository.versions(model)

    def _models(self) -> list[dict]:
        return [{"model": m, "version": v[-1].version, "committed": _micros(v[-1].created),
                 "layers": len(v[-1].clocks), "accuracy": v[-1].accuracy, "loss": v[-1].loss}
                for m, v in self._versions_of_all()]

    def _versions(self) -> list[dict]:
        rows = []
        for model, versions in self._versions_of_all():
            for v in versions:
                privacy = v.privacy or {}
                rows.append({"model": model, "version": v.version, "parent": v.parent, "created": _micros(v.created),
                             "actor": v.actor, "fog": v.fog, "seq": v.seq, "participants": v.participants,
                             "layers": list(v.layers), "weight": v.weight, "update_norm": v.update_norm,
                             "accuracy": v.accuracy, "loss": v.loss, "epsilon": privacy.get("epsilon"),
                             "delta": privacy.get("delta"), "update_sha256": v.update_sha256,
                             "update_bytes": v.update_bytes, **_federated(v.federated_score)})
        return rows

    def _layer_clocks(self) -> list[dict]:
        return [{"model": model, "version": v.version, "layer": layer, "node": node, "counter": counter,
                 "staleness": v.staleness.get(layer)}
                for model, versions in self._versions_of_all() for v in versions
                for layer, clock in sorted(v.clocks.items()) for node, counter in sorted(clock.items())]

    def _fogs(self) -> list[dict]:
        per: dict[tuple[str, str], dict] = {}
        for model, versions in self._versions_of_all():
            for v in versions:
                if v.fog is None:
                    continue
                row = per.setdefault((v.fog, model), {"fog": v.fog, "model": model, "pushes": 0, "participants": 0})
                row.update(pushes=row["pushes"] + 1, participants=row["participants"] + v.participants,
                           last_seq=v.seq, last_version=v.version, last_push=_micros(v.created))
        return [per[k] for k in sorted(per)]

    def _audit(self) -> list[dict]:
        if self.audit is None:
            return []
        return [{"seq": e.seq, "time": _micros(e.timestamp.timestamp()), "actor": e.actor, "action": e.action,
                 "subject": e.subject, "outcome": e.outcome, "details": json.dumps(e.details, sort_keys=True)}
                for e in iter_entries(self.audit.path)]

    def _metrics(self) -> list[dict]:
        if self.metrics is None:
            return []
        return [{"name": s.name, "labels": json.dumps(s.labels, sort_keys=True), "value": float(s.value),
                 "type": family.type} for family in self.metrics() for s in family.samples]


# --- queries ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """Bounds on one query: a query that passes one is stopped with an error that names it."""

    timeout_s: float = 30.0
    max_rows: int = 1_000_000
    memory: str = "512MB"
    pending: int = 64  # per identity: results not yet read, prepared queries not yet closed
    pending_s: float = 300.0  # a result not read, or a prepared query not used, within this is dropped


def check_statement(query: str) -> None:
    """ValidationError unless ``query`` is one read-only statement of bounded length."""
    if len(query) > MAX_QUERY_CHARS:
        raise ValidationError(f"SQL query of {len(query)} characters refused (at most {MAX_QUERY_CHARS})")
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise ValidationError(f"SQL query refused: {str(exc).splitlines()[0]}") from None
    if len(statements) != 1:
        raise ValidationError(f"one SQL statement per query, got {len(statements)}")
    if statements[0].type != duckdb.StatementType.SELECT:
        raise ValidationError(f"read-only endpoint: only SELECT queries are served, not {statements[0].type.name}")


def execute(query: str, visible: Iterable[str], build: Callable[[set[str]], Mapping[str, pa.Table]],
            limits: Limits) -> pa.Table:
    """``query`` in a fresh DuckDB database that reaches nothing else, over the tables it names.

    ``visible`` are the tables of :data:`TABLES` the caller may read; ``build(names)`` gives the tables
    the query names (it may refuse, with ValidationError or an error of its own).
    """
    check_statement(query)
    con = duckdb.connect(":memory:", config={
        "enable_external_access": False, "autoload_known_extensions": False,
        "autoinstall_known_extensions": False, "threads": 1, "memory_limit": limits.memory})
    timer = threading.Timer(limits.timeout_s, con.interrupt)
    try:
        con.execute("SET lock_configuration = true")
        visible = set(visible)
        for name, table in build(_named(con, query) & set(TABLES)).items():
            con.register(name, table)
        for name in visible - set(tables_registered(con)):  # the rest as empty tables: the query binds
            con.register(name, TABLES[name].empty_table())
        timer.start()
        reader = con.sql(query).to_arrow_reader(65536)
        batches, rows = [], 0
        for batch in reader:
            rows += batch.num_rows
            if rows > limits.max_rows:
                raise ValidationError(f"the result has more than {limits.max_rows:,} rows: add a LIMIT or an "
                                      f"aggregate")
            batches.append(batch)
        return pa.Table.from_batches(batches, schema=reader.schema)
    except duckdb.InterruptException:
        raise ValidationError(f"SQL query stopped after {limits.timeout_s:g} s (the time limit)") from None
    except duckdb.Error as exc:
        raise ValidationError(f"SQL query refused: {str(exc).splitlines()[0]}") from None
    finally:
        timer.cancel()
        con.close()


def _named(con: duckdb.DuckDBPyConnection, query: str) -> set[str]:
    """The table names in ``query``, lower-cased, from DuckDB's parse tree (nothing bound, nothing read)."""
    tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [query]).fetchall()[0][0])
    if tree.get("error"):
        raise ValidationError(f"SQL query refused: {tree.get('error_message', 'cannot parse it')}")
    names: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "BASE_TABLE" and isinstance(node.get("table_name"), str):
                names.add(node["table_name"].lower())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return names


def tables_registered(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [row[0] for row in con.execute("SELECT view_name FROM duckdb_views() WHERE temporary").fetchall()]


class Handles:
    """Things held for a later call (results for their ``do_get``, prepared queries for their execution),
    each under a random handle that only the identity that made it may use, for ``limits.pending_s``.
    ``once``: a handle is dropped when it is used."""

    def __init__(self, limits: Limits, what: str, *, once: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.what = what
        self.once = once
        self._clock = clock
        self._lock = threading.Lock()
        self._held: dict[bytes, tuple[str, float, object]] = {}

    def put(self, identity: str, value: object) -> bytes:
        handle = secrets.token_bytes(16)
        now = self._clock()
        with self._lock:
            self._held = {h: p for h, p in self._held.items() if p[1] > now}
            if sum(1 for p in self._held.values() if p[0] == identity) >= self.limits.pending:
                raise ValidationError(f"{self.limits.pending} {self.what} are held for {identity!r}: "
                                      f"use or close them first")
            self._held[handle] = (identity, now + self.limits.pending_s, value)
        return handle

    def take(self, identity: str, handle: bytes) -> object:
        with self._lock:
            held = self._held.get(handle)
            now = self._clock()
            if held is None or held[1] <= now or held[0] != identity:
                raise ValidationError(f"unknown or expired handle (of {self.what}: each is used by the identity "
                                      f"that made it, within {self.limits.pending_s:g} s of its last use)")
            if self.once:
                del self._held[handle]
            else:
                self._held[handle] = (identity, now + self.limits.pending_s, held[2])
        return held[2]

    def close(self, identity: str, handle: bytes) -> None:
        with self._lock:
            if handle in self._held and self._held[handle][0] == identity:
                del self._held[handle]


def query_digest(query: str) -> str:
    return hashlib.sha256(query.encode()).hexdigest()


# --- catalog commands ------------------------------------------------------------------------------------

def _like(pattern: str | None, value: str) -> bool:
    """SQL ``LIKE`` (``%`` any run, ``_`` one character; no escape), as Flight SQL's filter patterns."""
    if pattern is None:
        return True
    regex = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.S) is not None


_TEXT = pa.string()


def catalogs() -> pa.Table:
    return pa.table({"catalog_name": pa.array([], _TEXT)},
                    schema=pa.schema([pa.field("catalog_name", _TEXT, nullable=False)]))


def db_schemas(fields: Mapping[int, list]) -> pa.Table:
    """CommandGetDbSchemas: catalog (1), db_schema_filter_pattern (2)."""
    keep = not text_field(fields, 1) and _like(text_field(fields, 2), SCHEMA)
    return pa.table([pa.array([None] * keep, _TEXT), pa.array([SCHEMA] * keep, _TEXT)],
                    schema=pa.schema([pa.field("catalog_name", _TEXT),
                                      pa.field("db_schema_name", _TEXT, nullable=False)]))


def table_types() -> pa.Table:
    return pa.table([pa.array(["TABLE"], _TEXT)], schema=pa.schema([pa.field("table_type", _TEXT, nullable=False)]))


def tables_listing(visible: Iterable[str], fields: Mapping[int, list]) -> pa.Table:
    """CommandGetTables: catalog (1), db_schema_filter_pattern (2), table_name_filter_pattern (3),
    table_types (4), include_schema (5)."""
    types = [t.decode() for t in fields.get(4, []) if isinstance(t, bytes)]
    names = [n for n in sorted(visible) if not text_field(fields, 1) and _like(text_field(fields, 2), SCHEMA)
             and _like(text_field(fields, 3), n) and (not types or "TABLE" in types)]
    columns = [pa.array([None] * len(names), _TEXT), pa.array([SCHEMA] * len(names), _TEXT),
               pa.array(names, _TEXT), pa.array(["TABLE"] * len(names), _TEXT)]
    fields_out = [pa.field("catalog_name", _TEXT), pa.field("db_schema_name", _TEXT),
                  pa.field("table_name", _TEXT, nullable=False), pa.field("table_type", _TEXT, nullable=False)]
    if fields.get(5, [0])[-1]:
        columns.append(pa.array([TABLES[n].serialize().to_pybytes() for n in names], pa.binary()))
        fields_out.append(pa.field("table_schema", pa.binary(), nullable=False))
    return pa.table(columns, schema=pa.schema(fields_out))


# SqlInfo ids (FlightSql.proto) and what core answers for them
SQL_INFO = {0: ("string", "hyprstream core"), 1: ("string", None), 2: ("string", None), 3: ("bool", True),
            500: ("bool", False)}  # server name, version, Arrow version, read-only, transactions (none)
_SQL_INFO_VALUE = pa.dense_union([pa.field("string_value", pa.string()), pa.field("bool_value", pa.bool_()),
                                  pa.field("bigint_value", pa.int64()), pa.field("int32_bitmask", pa.int32()),
                                  pa.field("string_list", pa.list_(pa.string())),
                                  pa.field("int32_to_int32_list_map",
                                           pa.map_(pa.int32(), pa.list_(pa.int32())))])


def sql_info(ids: list[int], version: str) -> pa.Table:
    """The ``CommandGetSqlInfo`` answer for ``ids`` (all known when empty); unknown ids are left out."""
    values = {**SQL_INFO, 1: ("string", version), 2: ("string", pa.__version__)}
    wanted = [i for i in (ids or sorted(values)) if i in values]
    kinds, offsets, strings, bools = [], [], [], []
    for i in wanted:
        kind, value = values[i]
        if kind == "string":
            kinds.append(0)
            offsets.append(len(strings))
            strings.append(value)
        else:
            kinds.append(1)
            offsets.append(len(bools))
            bools.append(value)
    children = [pa.array(strings, pa.string()), pa.array(bools, pa.bool_()), pa.array([], pa.int64()),
                pa.array([], pa.int32()), pa.array([], pa.list_(pa.string())),
                pa.array([], pa.map_(pa.int32(), pa.list_(pa.int32())))]
    union = pa.UnionArray.from_dense(pa.array(kinds, pa.int8()), pa.array(offsets, pa.int32()), children,
                                     [f.name for f in _SQL_INFO_VALUE], list(range(6)))
    return pa.table([pa.array(wanted, pa.uint32()), union],
                    schema=pa.schema([pa.field("info_name", pa.uint32(), nullable=False),
                                      pa.field("value", _SQL_INFO_VALUE, nullable=False)]))


__all__ = ["AUDIT_TABLE", "Handles", "Limits", "Sources", "TABLES", "check_statement", "execute",
           "is_flight_sql", "pack_any", "query_digest", "sql_info", "text_field", "uint_list",
           "unpack_any"]
