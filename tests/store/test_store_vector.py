"""Exact vector search: against brute-force numpy rankings, across segments, with filters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from hyprstream.errors import ValidationError
from hyprstream.store import Metric, Store
from hyprstream.store import vector

DIM = 16
SCHEMA = pa.schema([("id", pa.int64()), ("kind", pa.string()), ("emb", pa.list_(pa.float32(), DIM))])


def embeddings(m: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), DIM)


def brute(matrix: np.ndarray, queries: np.ndarray, k: int, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    m = matrix.astype(np.float64)
    q = queries.astype(np.float64)
    if metric is Metric.COSINE:
        m = m / np.linalg.norm(m, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    s = q @ m.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, axis=1)


@pytest.mark.unit
@pytest.mark.parametrize("metric", list(Metric))
def test_top_k_matches_brute_force_across_parts(metric: Metric) -> None:
    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((1000, DIM)).astype(np.float32)
    queries = rng.standard_normal((37, DIM)).astype(np.float32)
    parts = [vector.Part(matrix[a:b]) for a, b in ((0, 300), (300, 301), (301, 1000))]
    found = vector.top_k(parts, queries, 10, metric, block=8)
    want_idx, want_scores = brute(matrix, queries, 10, metric)
    assert np.array_equal(found.indices, want_idx)
    assert np.allclose(found.scores, want_scores, atol=1e-4)


@pytest.mark.unit
def test_top_k_with_mask_and_fewer_candidates_than_k() -> None:
    matrix = np.eye(4, DIM, dtype=np.float32) * np.array([[1], [2], [3], [4]], dtype=np.float32)
    q = np.ones((1, DIM), np.float32)
    found = vector.top_k([vector.Part(matrix)], q, 10, Metric.INNER_PRODUCT,
                         mask=np.array([True, False, True, False]))
    assert found.indices.tolist() == [[2, 0]]
    assert found.scores.tolist() == [[3.0, 1.0]]
    assert vector.top_k([vector.Part(matrix)], q, 3, Metric.COSINE,
                        mask=np.zeros(4, bool)).indices.shape == (1, 0)


@pytest.mark.unit
def test_part_is_a_zero_copy_view_of_one_chunk() -> None:
    m = np.arange(3 * DIM, dtype=np.float32).reshape(3, DIM)
    col = embeddings(m)
    part = vector.Part.build(col)
    assert part.matrix.ctypes.data == col.values.buffers()[1].address
    assert np.array_equal(part.matrix, m)
    sliced = vector.Part.build(col.slice(1, 2))
    assert np.array_equal(sliced.matrix, m[1:])


@pytest.mark.unit
def test_bad_queries_and_types_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"shape \(16,\)"):
        vector.as_queries(np.ones(3), DIM)
    with pytest.raises(ValidationError, match="NaN"):
        vector.as_queries(np.full(DIM, np.nan), DIM)
    with pytest.raises(ValidationError, match="fixed_size_list<float32>"):
        vector.check_embedding_type("e", pa.list_(pa.float64(), 4))


@pytest.fixture
def store_with_vectors(tmp_path: Path):
    rng = np.random.default_rng(3)
    matrix = rng.standard_normal((600, DIM)).astype(np.float32)
    kinds = np.array(["even", "odd"])[np.arange(600) % 2]
    with Store.open(tmp_path / "s", create=True) as s:
        s.create_table("docs", SCHEMA)
        for lo in range(0, 600, 50):
            s.append("docs", pa.table({"id": np.arange(lo, lo + 50), "kind": kinds[lo:lo + 50],
                                       "emb": embeddings(matrix[lo:lo + 50])}, schema=SCHEMA))
            if lo in (200, 400):
                s.flush()
        assert s.info("docs").segments == 2 and s.info("docs").buffered_rows == 150
        yield s, matrix


@pytest.mark.integration
@pytest.mark.parametrize("metric", ["cosine", "inner_product"])
def test_store_search_matches_brute_force(store_with_vectors, metric: str) -> None:
    s, matrix = store_with_vectors
    queries = np.random.default_rng(4).standard_normal((5, DIM)).astype(np.float32)
    got = s.search("docs", "emb", queries, k=7, metric=metric, columns=["id"])
    want_idx, want_scores = brute(matrix, queries, 7, Metric(metric))
    assert got.column("query").to_pylist() == np.repeat(np.arange(5), 7).tolist()
    assert got.column("rank").to_pylist() == np.tile(np.arange(7), 5).tolist()
    assert got.column("row").to_pylist() == want_idx.reshape(-1).tolist()
    assert got.column("id").to_pylist() == want_idx.reshape(-1).tolist()
    assert np.allclose(got.column("score").to_numpy(), want_scores.reshape(-1), atol=1e-4)


@pytest.mark.integration
def test_store_search_single_query_with_filter(store_with_vectors) -> None:
    s, matrix = store_with_vectors
    q = matrix[11] + 0.01
    got = s.search("docs", "emb", q, k=5, where=pc.field("kind") == "odd", columns=["id", "kind"])
    odd = np.flatnonzero(np.arange(600) % 2 == 1)
    want_idx, _ = brute(matrix[odd], q[None, :], 5, Metric.COSINE)
    assert got.column("id").to_pylist() == odd[want_idx[0]].tolist()
    assert got.column("id").to_pylist()[0] == 11
    assert set(got.column("kind").to_pylist()) == {"odd"}


@pytest.mark.integration
def test_store_search_skips_null_embeddings_and_checks_column(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", create=True) as s:
        s.create_table("docs", SCHEMA)
        emb = pa.array([[1.0] * DIM, None, [0.5] * DIM], pa.list_(pa.float32(), DIM))
        s.append("docs", pa.table({"id": [0, 1, 2], "kind": ["a", "b", "c"], "emb": emb}, schema=SCHEMA))
        got = s.search("docs", "emb", np.ones(DIM), k=5, metric="inner_product")
        assert got.column("row").to_pylist() == [0, 2]
        assert got.column("score").to_pylist() == [16.0, 8.0]
        with pytest.raises(ValidationError, match="fixed_size_list<float32>"):
            s.search("docs", "kind", np.ones(DIM))
        with pytest.raises(ValidationError, match="unknown metric 'l2'"):
            s.search("docs", "emb", np.ones(DIM), metric="l2")
        with pytest.raises(ValidationError, match="filter"):
            s.search("docs", "emb", np.ones(DIM), where="kind = 'a'")


@pytest.mark.unit
@pytest.mark.parametrize(("n", "k", "chunk"), [(1, 1, 64), (5, 10, 64), (100, 3, 4), (1000, 10, 64), (1037, 7, 16),
                                               (5000, 1, 64), (4096, 16, 64)])
def test_largest_k_equals_a_full_sort(n: int, k: int, chunk: int) -> None:
    rng = np.random.default_rng(n + k)
    scores = rng.standard_normal((9, n)).astype(np.float32)
    scores[0] = np.round(scores[0])  # many ties
    values, idx = vector.largest_k(scores, k, chunk=chunk)
    kk = min(k, n)
    assert values.shape == idx.shape == (9, kk)
    assert np.array_equal(values, -np.sort(-scores, axis=1)[:, :kk])
    assert np.array_equal(np.take_along_axis(scores, idx, axis=1), values)
    assert all(len(set(row)) == kk for row in idx.tolist())


@pytest.mark.unit
def test_unit_rows_have_length_one_and_zero_rows_stay_zero() -> None:
    part = vector.Part(np.array([[3.0, 4.0], [0.0, 0.0]], np.float32))
    assert np.allclose(part.unit, [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)
    assert part.unit is part.unit  # built once
