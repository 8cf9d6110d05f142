"""SQL over Arrow tables through DuckDB, without copying the data in.

DuckDB scans registered Arrow tables in place (its Arrow scan reads the buffers directly), so a
query over a store table reads the memory-mapped segments themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import duckdb
import pyarrow as pa

from hyprstream.errors import StoreError, ValidationError

_QUERY_ERRORS = (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException,
                 duckdb.InvalidInputException, duckdb.ConversionException)


def quote_identifier(name: str) -> str:
    """``name`` as a DuckDB identifier (double-quoted, inner quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


def run(
    tables: Mapping[str, pa.Table],
    query: str,
    params: Sequence[Any] | Mapping[str, Any] | None = None,
) -> pa.Table:
    """Run ``query`` with each of ``tables`` visible under its name; the result as an Arrow table.

    ValidationError for a query DuckDB rejects (syntax, unknown name, bad parameter); StoreError
    for a failure while running it.
    """
    con = duckdb.connect(":memory:")
    try:
        for name, table in tables.items():
            con.register(name, table)
        relation = con.sql(query, params=params)
        return relation.to_arrow_table() if relation is not None else pa.table({})
    except _QUERY_ERRORS as exc:
        raise ValidationError(f"SQL query refused: {exc}") from exc
    except duckdb.Error as exc:
        raise StoreError(f"SQL query failed: {exc}") from exc
    finally:
        con.close()
