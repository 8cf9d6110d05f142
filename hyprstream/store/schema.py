"""Checks that appended rows match a table's schema, and table-name rules."""

from __future__ import annotations

import re

import pyarrow as pa

from hyprstream.errors import ValidationError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def check_table_name(name: object) -> str:
    """``name`` if it is a valid table name (an SQL identifier: letters, digits, underscore)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValidationError(
            f"invalid table name {name!r}: use letters, digits and '_' (not leading digit), at most 128"
        )
    return name


def check_schema(schema: object, *, table: str) -> pa.Schema:
    """``schema`` if it can define a table: a pyarrow schema with distinct, non-empty column names."""
    if not isinstance(schema, pa.Schema):
        raise ValidationError(f"table {table!r}: schema must be a pyarrow.Schema, got {type(schema).__name__}")
    if len(schema) == 0:
        raise ValidationError(f"table {table!r}: schema has no columns")
    seen: set[str] = set()
    for f in schema:
        if not f.name:
            raise ValidationError(f"table {table!r}: a column has an empty name")
        if f.name in seen:
            raise ValidationError(f"table {table!r}: column {f.name!r} appears twice")
        seen.add(f.name)
    return schema


def conform(data: object, schema: pa.Schema, *, table: str) -> pa.Table:
    """``data`` (a Table or RecordBatch) as a Table with exactly ``schema``'s columns, in its order.

    Column order may differ; names and types must match exactly; non-nullable columns must not hold
    nulls. Raises ValidationError naming the offending column.
    """
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if not isinstance(data, pa.Table):
        raise ValidationError(
            f"table {table!r}: append needs a pyarrow Table or RecordBatch, got {type(data).__name__}"
        )
    names = data.column_names
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValidationError(f"table {table!r}: column {dup!r} appears twice in the appended rows")
    extra = [n for n in names if schema.get_field_index(n) < 0]
    if extra:
        raise ValidationError(f"table {table!r}: column {extra[0]!r} is not in the table schema")
    columns = []
    for f in schema:
        if f.name not in names:
            raise ValidationError(f"table {table!r}: column {f.name!r} is missing")
        col = data.column(f.name)
        if not col.type.equals(f.type):
            raise ValidationError(f"table {table!r}: column {f.name!r} has type {col.type}, expected {f.type}")
        if not f.nullable and col.null_count:
            raise ValidationError(f"table {table!r}: column {f.name!r} is not nullable but holds {col.null_count} nulls")
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=schema)
