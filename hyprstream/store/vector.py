"""Exact nearest-neighbour search over an embedding column (``fixed_size_list<float32>``).

The math is plain linear algebra on arrays: the scores of a block of queries against each part's
matrix are one BLAS matrix product each, written side by side into one buffer, and the best ``k``
per query come from one vectorised two-pass selection over it (:func:`largest_k`). No Python loop
runs per row or per query (only per part and block of queries).

A :class:`Part` views an embedding column as an ``(n, d)`` float32 matrix without copying (one
Arrow chunk) and, once a cosine search asks for it, keeps a row-normalised copy; it is cached per
immutable segment.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hyprstream.errors import ValidationError

QUERY_BLOCK = 256
CHUNK = 64
MAX_SCORES = 1 << 24
_ROW = "__hyprstream_row__"


class Metric(enum.StrEnum):
    """Similarity of two vectors; larger is closer."""

    COSINE = "cosine"
    INNER_PRODUCT = "inner_product"


def check_embedding_type(name: str, type_: pa.DataType) -> None:
    """ValidationError unless ``type_`` is ``fixed_size_list<float32>``."""
    if not (pa.types.is_fixed_size_list(type_) and type_.value_type == pa.float32()):
        raise ValidationError(f"column {name!r} has type {type_}; search needs fixed_size_list<float32>")


@dataclass(frozen=True)
class Part:
    """Embeddings of consecutive rows: ``matrix`` (n, d) and the ``valid`` rows (None: all).

    ``unit`` (built on first use, then kept) is the matrix with every row scaled to length 1 (zero
    rows stay zero): cosine scores are its inner products with unit queries, so a cosine search
    costs what an inner-product search does, for one float32 copy of the embeddings.
    """

    matrix: np.ndarray
    valid: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return self.matrix.shape[0]

    @functools.cached_property
    def unit(self) -> np.ndarray:
        norms = np.sqrt(np.einsum("ij,ij->i", self.matrix, self.matrix, dtype=np.float32))
        with np.errstate(divide="ignore"):
            inv = np.where(norms > 0, 1.0 / norms, 0.0).astype(np.float32)
        return self.matrix * inv[:, None]

    @classmethod
    def build(cls, column: pa.ChunkedArray | pa.Array) -> Part:
        """A part over an embedding column; zero-copy when the column is one chunk."""
        matrix, valid = embedding_matrix(column)
        return cls(matrix=matrix, valid=valid)


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
        rows_valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        if values.null_count:
            component_valid = values.is_valid().to_numpy(zero_copy_only=False).reshape(len(chunk), d)
            if not component_valid[rows_valid].all():
                raise ValidationError("an embedding vector holds a null component")
            values = values.fill_null(0.0)
        mats.append(values.to_numpy(zero_copy_only=True).reshape(len(chunk), d))
        any_null = any_null or bool(chunk.null_count)
        valids.append(rows_valid)
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


def largest_k(scores: np.ndarray, k: int, *, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest values of each row of ``scores`` (b, n), best first: ``(values, column indices)``.

    Exact, in two vectorised passes. The first ``w * chunk`` columns (``w = n // chunk``) are split
    into ``w`` groups, group ``j`` holding columns ``j, j + w, j + 2w, ...``, and each group's maximum
    is taken (an element-wise maximum of ``chunk`` contiguous slices). The ``k`` largest values lie
    in the ``k`` groups with the largest maxima (a group outside them is beaten by ``k`` group
    maxima, so its values are beaten by ``k`` values), so only those groups' ``k * chunk`` columns,
    plus the ``n - w * chunk`` left over, are partitioned.
    """
    b, n = scores.shape
    k = min(k, n)
    width = n // chunk
    if k * chunk * 4 >= n:
        idx = np.argpartition(scores, n - k, axis=1)[:, n - k :] if k < n else np.broadcast_to(np.arange(n), (b, n))
    else:
        maxima = scores[:, : width * chunk].reshape(b, chunk, width).max(axis=1)
        best = np.argpartition(maxima, width - k, axis=1)[:, width - k :]
        cand = (best[:, :, None] + np.arange(chunk) * width).reshape(b, k * chunk)
        if width * chunk < n:
            rest = np.broadcast_to(np.arange(width * chunk, n), (b, n - width * chunk))
            cand = np.concatenate([cand, rest], axis=1)
        values = np.take_along_axis(scores, cand, axis=1)
        pick = np.argpartition(values, values.shape[1] - k, axis=1)[:, values.shape[1] - k :]
        idx = np.take_along_axis(cand, pick, axis=1)
    values = np.take_along_axis(scores, idx, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    return np.take_along_axis(values, order, axis=1), np.take_along_axis(idx, order, axis=1)


def top_k(
    parts: Sequence[Part],
    queries: np.ndarray,
    k: int,
    metric: Metric,
    *,
    mask: np.ndarray | None = None,
    block: int = QUERY_BLOCK,
    max_scores: int = MAX_SCORES,
) -> TopK:
    """Exact top-``k`` rows over the concatenation of ``parts`` for each row of ``queries`` (b, d).

    ``mask`` (bool over all rows) restricts the candidates. For a block of queries, the scores
    against every candidate row go into one reused ``(block, candidates)`` buffer (at most
    ``max_scores`` floats), one matrix product per part, and one :func:`largest_k` picks the winners.
    """
    if k <= 0:
        raise ValidationError(f"k must be positive, got {k}")
    b = queries.shape[0]
    if metric is Metric.COSINE:
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        queries = queries / np.where(norms > 0, norms, 1.0).astype(np.float32)
    pieces: list[tuple[np.ndarray, int]] = []  # (matrix, first column)
    spans: list[tuple[np.ndarray | None, int, int]] = []  # (rows kept or None: all, offset, part rows)
    offset = columns = 0
    for part in parts:
        n = part.rows
        keep = part.valid
        if mask is not None:
            sel = mask[offset : offset + n]
            keep = sel if keep is None else keep & sel
        matrix = part.unit if metric is Metric.COSINE else part.matrix
        rows = None
        if keep is not None and not keep.all():
            rows = np.flatnonzero(keep)
            matrix = matrix[rows]
        if len(matrix):
            pieces.append((matrix, columns))
            spans.append((rows, offset, n))
            columns += len(matrix)
        offset += n
    if columns == 0:
        return TopK(indices=np.empty((b, 0), np.int64), scores=np.empty((b, 0), np.float32))
    # with every row a candidate, score column i is row i: no mapping needed
    rows_of = None
    if columns < offset:
        rows_of = np.concatenate([r + o if r is not None else np.arange(o, o + n) for r, o, n in spans])
    k = min(k, columns)
    step = max(1, min(block, max_scores // columns))
    buffer = np.empty((min(b, step), columns), np.float32)
    indices = np.empty((b, k), np.int64)
    scores = np.empty((b, k), np.float32)
    for start in range(0, b, step):
        q = queries[start : start + step]
        s = buffer[: len(q)]
        for matrix, first in pieces:
            np.matmul(q, matrix.T, out=s[:, first : first + len(matrix)])
        values, idx = largest_k(s, k)
        scores[start : start + step] = values
        indices[start : start + step] = rows_of[idx] if rows_of is not None else idx
    return TopK(indices=indices, scores=scores)


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
