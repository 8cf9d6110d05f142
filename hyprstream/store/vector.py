"""Exact nearest-neighbour search over an embedding column (``fixed_size_list<float32>``).

The math is plain linear algebra on arrays: scores of a block of queries against a part's matrix
are one BLAS matrix product, the best ``k`` per query one vectorised top-k, and the per-part winners
are merged the same way. No Python loop runs per row or per query (only per block of queries).

A :class:`Part` views an embedding column as an ``(n, d)`` float32 matrix without copying (one
Arrow chunk) and keeps the inverse row norms for cosine scores, so that it can be cached per
immutable segment.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hyprstream.errors import ValidationError

QUERY_BLOCK = 256
_ROW = "__hyprstream_row__"


class Metric(str, enum.Enum):
    """Similarity of two vectors; larger is closer."""

    COSINE = "cosine"
    INNER_PRODUCT = "inner_product"


def check_embedding_type(name: str, type_: pa.DataType) -> None:
    """ValidationError unless ``type_`` is ``fixed_size_list<float32>``."""
    if not (pa.types.is_fixed_size_list(type_) and type_.value_type == pa.float32()):
        raise ValidationError(f"column {name!r} has type {type_}; search needs fixed_size_list<float32>")


@dataclass(frozen=True)
class Part:
    """Embeddings of consecutive rows: ``matrix`` (n, d), ``inv_norm`` (n,), ``valid`` rows (or None: all)."""

    matrix: np.ndarray
    inv_norm: np.ndarray
    valid: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return self.matrix.shape[0]

    @classmethod
    def from_matrix(cls, matrix: np.ndarray, valid: np.ndarray | None = None) -> Part:
        """A part over ``matrix`` (not copied); zero rows get inverse norm 0."""
        norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix, dtype=np.float32))
        with np.errstate(divide="ignore"):
            inv = np.where(norms > 0, 1.0 / norms, 0.0).astype(np.float32)
        return cls(matrix=matrix, inv_norm=inv, valid=valid)

    @classmethod
    def build(cls, column: pa.ChunkedArray | pa.Array) -> Part:
        """A part over an embedding column; zero-copy when the column is one chunk."""
        matrix, valid = embedding_matrix(column)
        return cls.from_matrix(matrix, valid)


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
    """``(matrix (n, d) float32, valid rows or None)`` of an embedding column.

    A view onto the Arrow buffer for one chunk, a concatenated copy for several. Null embeddings
    are zero rows marked invalid; a null inside a vector is a ValidationError.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    check_embedding_type("embedding", column.type)
    d = column.type.list_size
    mats: list[np.ndarray] = []
    valids: list[np.ndarray] = []
    any_null = False
    for chunk in chunks:
        values = chunk.values.slice(chunk.offset * d, len(chunk) * d)
        if values.null_count:
            raise ValidationError("an embedding vector holds a null component")
        mats.append(values.to_numpy(zero_copy_only=True).reshape(len(chunk), d))
        if chunk.null_count:
            any_null = True
            valids.append(chunk.is_valid().to_numpy(zero_copy_only=False))
        else:
            valids.append(np.ones(len(chunk), dtype=bool))
    if not mats:
        return np.empty((0, d), np.float32), None
    matrix = mats[0] if len(mats) == 1 else np.concatenate(mats)
    if not any_null:
        return matrix, None
    valid = np.concatenate(valids)
    matrix = matrix.copy()
    matrix[~valid] = 0.0
    return matrix, valid


def as_queries(queries: Any, dim: int) -> np.ndarray:
    """Queries as a C-contiguous ``(b, dim)`` float32 matrix; ValidationError on a bad shape or value."""
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q.reshape(1, -1)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValidationError(f"queries must have shape ({dim},) or (b, {dim}), got {np.shape(queries)}")
    if not np.isfinite(q).all():
        raise ValidationError("queries hold NaN or infinite values")
    return np.ascontiguousarray(q)


@dataclass(frozen=True)
class TopK:
    """Best rows per query: ``indices`` (b, k') int64 row positions and ``scores`` (b, k') float32, best first.

    ``k'`` is ``k`` or the number of candidate rows, if smaller.
    """

    indices: np.ndarray
    scores: np.ndarray


def _topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Largest ``k`` of each row of ``scores``, sorted descending: ``(values, column indices)``."""
    import torch

    values, idx = torch.topk(torch.from_numpy(scores), k, dim=1, largest=True, sorted=True)
    return values.numpy(), idx.numpy()


def top_k(
    parts: Sequence[Part],
    queries: np.ndarray,
    k: int,
    metric: Metric,
    *,
    mask: np.ndarray | None = None,
    block: int = QUERY_BLOCK,
) -> TopK:
    """Exact top-``k`` rows over the concatenation of ``parts`` for each row of ``queries`` (b, d).

    ``mask`` (bool over all rows) restricts the candidates.
    """
    if k <= 0:
        raise ValidationError(f"k must be positive, got {k}")
    b = queries.shape[0]
    if metric is Metric.COSINE:
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        queries = queries / np.where(norms > 0, norms, 1.0).astype(np.float32)
    best_scores: list[np.ndarray] = []
    best_rows: list[np.ndarray] = []
    offset = 0
    for part in parts:
        n = part.rows
        keep = part.valid
        if mask is not None:
            sel = mask[offset : offset + n]
            keep = sel if keep is None else keep & sel
        matrix, inv, rows = part.matrix, part.inv_norm, None
        if keep is not None and not keep.all():
            rows = np.flatnonzero(keep)
            matrix, inv = matrix[rows], inv[rows]
        m = matrix.shape[0]
        if m:
            kk = min(k, m)
            scores = np.empty((b, kk), np.float32)
            found = np.empty((b, kk), np.int64)
            for start in range(0, b, block):
                s = queries[start : start + block] @ matrix.T
                if metric is Metric.COSINE:
                    s *= inv
                scores[start : start + block], found[start : start + block] = _topk(s, kk)
            best_scores.append(scores)
            best_rows.append((rows[found] if rows is not None else found) + offset)
        offset += n
    if not best_scores:
        return TopK(indices=np.empty((b, 0), np.int64), scores=np.empty((b, 0), np.float32))
    if len(best_scores) == 1:
        return TopK(indices=best_rows[0], scores=best_scores[0])
    scores = np.concatenate(best_scores, axis=1)
    rows = np.concatenate(best_rows, axis=1)
    values, idx = _topk(scores, min(k, scores.shape[1]))
    return TopK(indices=np.take_along_axis(rows, idx, axis=1), scores=values)


def filter_mask(table: pa.Table, expression: Any) -> np.ndarray:
    """Rows of ``table`` that satisfy a ``pyarrow.compute`` expression, as a bool array."""
    if not isinstance(expression, pc.Expression):
        raise ValidationError(f"filter must be a pyarrow.compute.Expression, got {type(expression).__name__}")
    numbered = table.append_column(_ROW, pa.array(np.arange(table.num_rows, dtype=np.int64)))
    try:
        hits = numbered.filter(expression).column(_ROW).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, KeyError) as exc:
        raise ValidationError(f"filter {expression} cannot be applied: {exc}") from exc
    mask = np.zeros(table.num_rows, dtype=bool)
    mask[hits] = True
    return mask


def result_table(found: TopK, table: pa.Table, columns: Sequence[str] = ()) -> pa.Table:
    """Search results as rows ``query, rank, row, score`` plus ``columns`` taken from ``table``."""
    b, kk = found.indices.shape
    rows = found.indices.reshape(-1)
    out = pa.table({
        "query": pa.array(np.repeat(np.arange(b, dtype=np.int32), kk)),
        "rank": pa.array(np.tile(np.arange(kk, dtype=np.int32), b)),
        "row": pa.array(rows),
        "score": pa.array(found.scores.reshape(-1)),
    })
    if columns:
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise ValidationError(f"no column {missing[0]!r} to return")
        taken = table.select(list(columns)).take(pa.array(rows))
        for name in columns:
            out = out.append_column(name, taken.column(name))
    return out
