"""Time-series queries over store tables: rolling statistics, time buckets, anomaly flags.

Each helper is a pure SQL builder (``*_query``: column names, window, bounds -> DuckDB SQL and its
parameters) plus a thin function that runs it with :meth:`Store.sql <hyprstream.store.Store.sql>`.

Time columns are timestamps (any unit, with or without time zone) or numbers of seconds. Windows
are time ranges, not row counts: the rolling window of a reading covers the readings of the same key
in ``[t - window_s, t]`` (a ``RANGE`` frame, both ends included). Standard deviations are sample
standard deviations (``NULL`` below two readings). ``start``/``end`` select readings with
``start <= t < end``; windows still see the readings before ``start``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import pyarrow as pa

from hyprstream.errors import ValidationError
from hyprstream.store.sql import quote_identifier as q

TimeBound = datetime | float | int | None


class SqlSource(Protocol):
    """What the helpers need of a store."""

    def sql(self, query: str, params: Any = None) -> pa.Table: ...

    def schema(self, name: str) -> pa.Schema: ...


@dataclass(frozen=True)
class Query:
    """SQL text and its positional parameters."""

    sql: str
    params: list[Any]


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValidationError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _time_type(schema: pa.Schema, table: str, column: str) -> pa.DataType:
    idx = schema.get_field_index(column)
    if idx < 0:
        raise ValidationError(f"table {table!r} has no column {column!r}")
    type_ = schema.field(idx).type
    if not (pa.types.is_timestamp(type_) or pa.types.is_integer(type_) or pa.types.is_floating(type_)):
        raise ValidationError(f"column {column!r} has type {type_}; expected a timestamp or numeric seconds")
    return type_


def _check_column(schema: pa.Schema, table: str, column: str | None) -> None:
    if column is not None and schema.get_field_index(column) < 0:
        raise ValidationError(f"table {table!r} has no column {column!r}")


def _span(time_type: pa.DataType, seconds: float) -> str:
    """A SQL literal for a duration, in the time column's terms."""
    if pa.types.is_timestamp(time_type):
        return f"INTERVAL {round(seconds * 1e6)} MICROSECONDS"
    return repr(float(seconds))


def _bound(time_type: pa.DataType, value: datetime | float | int, shift_s: float = 0.0) -> Any:
    """``value - shift_s`` as a parameter comparable with the time column (naive datetimes are UTC)."""
    if isinstance(value, datetime):
        seconds = (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).timestamp()
    else:
        seconds = float(value)
    seconds -= shift_s
    if not pa.types.is_timestamp(time_type):
        return seconds
    moment = datetime.fromtimestamp(seconds, tz=UTC)
    return moment if time_type.tz is not None else moment.replace(tzinfo=None)


def _where(time_type: pa.DataType, time: str, start: TimeBound, end: TimeBound, lookback_s: float) -> tuple[str, list[Any]]:
    conds, params = [], []
    if start is not None:
        conds.append(f"{q(time)} >= ?")
        params.append(_bound(time_type, start, lookback_s))
    if end is not None:
        conds.append(f"{q(time)} < ?")
        params.append(_bound(time_type, end))
    return (" WHERE " + " AND ".join(conds)) if conds else "", params


def rolling_query(
    schema: pa.Schema, table: str, *, value: str, time: str, key: str | None, window_s: float,
    start: TimeBound = None, end: TimeBound = None, exclude_current: bool = False,
) -> Query:
    """SQL for the rolling ``mean``, ``std`` and ``count`` of ``value`` per ``key`` over ``window_s``."""
    window_s = _positive("window_s", window_s)
    time_type = _time_type(schema, table, time)
    _check_column(schema, table, value)
    _check_column(schema, table, key)
    where, params = _where(time_type, time, start, end, window_s)
    keys = f"{q(key)}, " if key is not None else ""
    partition = f"PARTITION BY {q(key)} " if key is not None else ""
    exclude = " EXCLUDE CURRENT ROW" if exclude_current else ""
    sql = (
        f"WITH src AS (SELECT {keys}{q(time)}, {q(value)} FROM {q(table)}{where}), "
        f"win AS (SELECT {keys}{q(time)}, {q(value)}, "
        f"avg({q(value)}) OVER w AS mean, stddev_samp({q(value)}) OVER w AS std, "
        f"count({q(value)}) OVER w AS count FROM src "
        f"WINDOW w AS ({partition}ORDER BY {q(time)} "
        f"RANGE BETWEEN {_span(time_type, window_s)} PRECEDING AND CURRENT ROW{exclude}))"
        f" SELECT * FROM win"
    )
    if start is not None:
        sql += f" WHERE {q(time)} >= ?"
        params.append(_bound(time_type, start))
    sql += f" ORDER BY {keys}{q(time)}"
    return Query(sql, params)


def anomaly_query(
    schema: pa.Schema, table: str, *, value: str, time: str, key: str | None, window_s: float, k: float,
    min_count: int = 2, start: TimeBound = None, end: TimeBound = None,
) -> Query:
    """SQL for readings more than ``k`` standard deviations from the mean of their window.

    The window of a reading is the ``window_s`` before it, the reading itself excluded; readings
    whose window holds fewer than ``min_count`` values (or has zero spread) are never flagged.
    """
    k = _positive("k", k)
    if min_count < 2:
        raise ValidationError(f"min_count must be at least 2, got {min_count}")
    base = rolling_query(schema, table, value=value, time=time, key=key, window_s=window_s,
                         start=start, end=end, exclude_current=True)
    sql = (
        f"SELECT *, ({q(value)} - mean) / std AS z FROM ({base.sql}) "
        f"WHERE count >= {int(min_count)} AND std > 0 AND abs({q(value)} - mean) > {k!r} * std"
    )
    keys = f"{q(key)}, " if key is not None else ""
    return Query(sql + f" ORDER BY {keys}{q(time)}", base.params)


def bucket_query(
    schema: pa.Schema, table: str, *, value: str, time: str, bucket_s: float, key: str | None = None,
    start: TimeBound = None, end: TimeBound = None,
) -> Query:
    """SQL for ``count``, ``mean``, ``std``, ``min``, ``max`` of ``value`` per ``key`` and time bucket.

    Buckets are aligned to the epoch: ``bucket`` is the start of each ``bucket_s``-long interval.
    """
    bucket_s = _positive("bucket_s", bucket_s)
    time_type = _time_type(schema, table, time)
    _check_column(schema, table, value)
    _check_column(schema, table, key)
    where, params = _where(time_type, time, start, end, 0.0)
    if pa.types.is_timestamp(time_type):
        origin = "TIMESTAMPTZ '1970-01-01 00:00:00+00'" if time_type.tz is not None else "TIMESTAMP '1970-01-01'"
        bucket = f"time_bucket({_span(time_type, bucket_s)}, {q(time)}, {origin})"
    else:
        bucket = f"floor({q(time)} / {bucket_s!r}) * {bucket_s!r}"
    keys = f"{q(key)}, " if key is not None else ""
    sql = (
        f"SELECT {keys}{bucket} AS bucket, count({q(value)}) AS count, avg({q(value)}) AS mean, "
        f"stddev_samp({q(value)}) AS std, min({q(value)}) AS min, max({q(value)}) AS max "
        f"FROM {q(table)}{where} GROUP BY ALL ORDER BY {keys}bucket"
    )
    return Query(sql, params)


def rolling_stats(
    store: SqlSource, table: str, *, value: str, time: str = "ts", key: str | None = "sensor",
    window_s: float, start: TimeBound = None, end: TimeBound = None,
) -> pa.Table:
    """Each reading in ``[start, end)`` with the rolling ``mean``, ``std``, ``count`` of its key's window."""
    query = rolling_query(store.schema(table), table, value=value, time=time, key=key,
                          window_s=window_s, start=start, end=end)
    return store.sql(query.sql, query.params)


def anomalies(
    store: SqlSource, table: str, *, value: str, time: str = "ts", key: str | None = "sensor",
    window_s: float, k: float = 3.0, min_count: int = 2, start: TimeBound = None, end: TimeBound = None,
) -> pa.Table:
    """Readings more than ``k`` standard deviations from their rolling window mean (see :func:`anomaly_query`)."""
    query = anomaly_query(store.schema(table), table, value=value, time=time, key=key, window_s=window_s,
                          k=k, min_count=min_count, start=start, end=end)
    return store.sql(query.sql, query.params)


def time_buckets(
    store: SqlSource, table: str, *, value: str, time: str = "ts", bucket_s: float, key: str | None = None,
    start: TimeBound = None, end: TimeBound = None,
) -> pa.Table:
    """Aggregates of ``value`` per time bucket (and key): see :func:`bucket_query`."""
    query = bucket_query(store.schema(table), table, value=value, time=time, bucket_s=bucket_s, key=key,
                         start=start, end=end)
    return store.sql(query.sql, query.params)
