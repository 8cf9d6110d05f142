"""hyprstream.fog.aggregate: weighted_mean, UpdateMatrix and UpdateSum (pure math, no I/O)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hyprstream.errors import ValidationError
from hyprstream.fog.aggregate import UpdateMatrix, UpdateSum, weighted_mean

pytestmark = pytest.mark.unit

EPS32 = float(np.finfo(np.float32).eps)


def reference_mean(rows: list[list[float]], weights: list[float]) -> list[float]:
    """Plain Python, float64: sum_k w_k x_k / sum_k w_k, column by column (the weights divided by the
    largest first, so that a subnormal weight's products do not underflow)."""
    top = max(weights)
    weights = [w / top for w in weights] if top > 0 else weights
    total = math.fsum(weights)
    return [math.fsum(w * row[j] for w, row in zip(weights, rows, strict=True)) / total for j in range(len(rows[0]))]


# --------------------------------------------------------------------------------------------
# weighted_mean


def test_weighted_mean_hand_computed() -> None:
    matrix = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    # (3 * [1, 2, 3] + 1 * [4, 5, 6] + 0 * [7, 8, 9]) / 4
    expected = np.array([1.75, 2.75, 3.75])
    np.testing.assert_array_equal(weighted_mean(matrix, np.array([3.0, 1.0, 0.0])), expected)
    got32 = weighted_mean(matrix.astype(np.float32), [3, 1, 0])
    assert got32.dtype == np.float32  # stays one float32 gemv
    np.testing.assert_array_equal(got32, expected.astype(np.float32))  # exact in binary


def test_weighted_mean_of_integers_is_not_truncated() -> None:
    got = weighted_mean(np.array([[1, 2], [3, 4]]), [1, 1])
    np.testing.assert_array_equal(got, [2.0, 3.0])


def test_weighted_mean_writes_into_out() -> None:
    out = np.empty(2, dtype=np.float32)
    res = weighted_mean(np.array([[0.0, 2.0], [4.0, 6.0]], dtype=np.float32), [1.0, 1.0], out=out)
    assert res is out
    np.testing.assert_array_equal(out, [2.0, 4.0])


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0], "do not match"),
        ([1.0, 2.0, 3.0], "do not match"),
        ([1.0, -0.5], "non-negative"),
        ([1.0, float("nan")], "finite"),
        ([1.0, float("inf")], "finite"),
        ([0.0, 0.0], "sum to zero"),
    ],
)
def test_weighted_mean_refuses_bad_weights(weights: list[float], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        weighted_mean(np.ones((2, 3)), np.array(weights))


def test_weighted_mean_refuses_a_non_matrix() -> None:
    with pytest.raises(ValidationError):
        weighted_mean(np.ones(3), np.ones(3))


@st.composite
def weighted_rows(draw: st.DrawFn) -> tuple[list[list[float]], list[float]]:
    k = draw(st.integers(1, 8))
    n = draw(st.integers(1, 16))
    value = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
    rows = draw(st.lists(st.lists(value, min_size=n, max_size=n), min_size=k, max_size=k))
    weights = draw(st.lists(st.floats(0.0, 1e4, allow_nan=False, allow_infinity=False), min_size=k, max_size=k))
    assume(math.fsum(weights) > 1e-6)
    return rows, weights


@settings(max_examples=150, deadline=None)
@given(weighted_rows())
def test_weighted_mean_matches_a_float64_reference(case: tuple[list[list[float]], list[float]]) -> None:
    rows, weights = case
    expected = np.array(reference_mean(rows, weights))
    scale = max(abs(v) for row in rows for v in row) + 1e-300
    k = len(rows)

    got64 = weighted_mean(np.array(rows, dtype=np.float64), np.array(weights))
    assert got64.dtype == np.float64
    np.testing.assert_allclose(got64, expected, rtol=0, atol=4 * k * np.finfo(np.float64).eps * scale)

    # float32 storage: compare with the exact mean of the float32 values, within K float32 roundings.
    rows32 = np.array(rows, dtype=np.float32)
    expected32 = np.array(reference_mean(rows32.astype(np.float64).tolist(), weights))
    got32 = weighted_mean(rows32, np.array(weights))
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, expected32, rtol=0, atol=4 * (k + 1) * EPS32 * scale)


# --------------------------------------------------------------------------------------------
# UpdateMatrix (rows) and UpdateSum (a running sum): the same checks, the same mean

KINDS = pytest.mark.parametrize("kind", [UpdateMatrix, UpdateSum], ids=["rows", "sum"])

SHAPES = {"conv.weight": (2, 3), "fc.bias": (4,)}


def delta(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (scale * rng.standard_normal(shape)).astype(np.float32) for name, shape in SHAPES.items()}


def l2(d: dict[str, np.ndarray]) -> float:
    return math.sqrt(math.fsum(float(v) ** 2 for a in d.values() for v in a.astype(np.float64).ravel()))


@KINDS
def test_update_matrix_mean_norm_and_weights(kind) -> None:
    um = kind(SHAPES, capacity=3)
    deltas = [delta(1), delta(2), delta(3)]
    weights = [10.0, 30.0, 0.0]  # a zero weight is allowed: the delta counts, with no influence
    for d, w in zip(deltas, weights, strict=True):
        norm = um.add(d, w)
        assert norm == pytest.approx(l2(d), rel=1e-6)
    assert um.count == 3
    assert um.total_weight == 40.0
    mean = um.mean()
    assert set(mean) == set(SHAPES)
    for name, shape in SHAPES.items():
        assert mean[name].shape == shape and mean[name].dtype == np.float32
        rows = [d[name].astype(np.float64).ravel().tolist() for d in deltas]
        expected = np.array(reference_mean(rows, weights)).reshape(shape)
        np.testing.assert_allclose(mean[name], expected, rtol=0, atol=1e-6)


@KINDS
def test_update_matrix_keeps_its_own_copy(kind) -> None:
    um = kind({"w": (3,)}, capacity=1)
    d = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    um.add({"w": d}, 1.0)
    d[:] = 99.0  # the client's buffer is reused for the next message
    np.testing.assert_array_equal(um.mean()["w"], [1.0, 2.0, 3.0])


@KINDS
def test_update_matrix_accepts_other_float_dtypes_and_stores_its_own(kind) -> None:
    um = kind({"w": (2,)}, capacity=2)
    um.add({"w": np.array([1.0, 2.0], dtype=np.float64)}, 1.0)
    um.add({"w": np.array([3, 4], dtype=np.int64)}, 1.0)
    mean = um.mean()["w"]
    assert mean.dtype == np.float32
    np.testing.assert_array_equal(mean, [2.0, 3.0])


def nan_at(d: dict[str, np.ndarray], value: float) -> dict[str, np.ndarray]:
    bad = {k: v.copy() for k, v in d.items()}
    bad["fc.bias"][2] = value
    return bad


BAD_UPDATES = {
    "nan": (lambda: nan_at(delta(9), float("nan")), 1.0, None, "NaN or Inf"),
    "+inf": (lambda: nan_at(delta(9), float("inf")), 1.0, None, "NaN or Inf"),
    "-inf": (lambda: nan_at(delta(9), float("-inf")), 1.0, None, "NaN or Inf"),
    "wrong shape": (lambda: {**delta(9), "fc.bias": np.zeros(5, np.float32)}, 1.0, None, "shape"),
    "transposed": (lambda: {**delta(9), "conv.weight": np.zeros((3, 2), np.float32)}, 1.0, None, "shape"),
    "missing name": (lambda: {"conv.weight": delta(9)["conv.weight"]}, 1.0, None, r"missing \['fc.bias'\]"),
    "extra name": (lambda: {**delta(9), "head.weight": np.zeros(2, np.float32)}, 1.0, None, r"unexpected \['head.weight'\]"),
    "negative weight": (lambda: delta(9), -1.0, None, "weight"),
    "nan weight": (lambda: delta(9), float("nan"), None, "weight"),
    "inf weight": (lambda: delta(9), float("inf"), None, "weight"),
    "norm above bound": (lambda: delta(9, scale=10.0), 1.0, 1.0, "exceeds the bound"),
    "float64 beyond float32": (lambda: {**delta(9), "fc.bias": np.array([1e39, 0, 0, 0])}, 1.0, None, "NaN or Inf once stored"),
    "complex": (lambda: {**delta(9), "fc.bias": np.array([1, 2, 3, 4j])}, 1.0, None, "dtype"),
    "object": (lambda: {**delta(9), "fc.bias": np.array([1.0, None, 2.0, 3.0], dtype=object)}, 1.0, None, "dtype"),
}


@pytest.mark.parametrize("case", list(BAD_UPDATES), ids=list(BAD_UPDATES))
@KINDS
def test_a_refused_update_changes_nothing(kind, case: str) -> None:
    make, weight, max_norm, match = BAD_UPDATES[case]
    um = kind(SHAPES, capacity=3)
    good = [delta(1), delta(2)]
    for d in good:
        um.add(d, 2.0, max_norm=100.0)
    before = {k: v.copy() for k, v in um.mean().items()}

    with pytest.raises(ValidationError, match=match):
        um.add(make(), weight, max_norm=max_norm)

    assert um.count == 2
    assert um.total_weight == 4.0
    for name, value in um.mean().items():
        np.testing.assert_array_equal(value, before[name])
    # The next accepted update lands in the row the refused one would have taken, and the mean
    # is that of the accepted updates only.
    um.add(delta(3), 4.0, max_norm=100.0)
    accepted, weights = [*good, delta(3)], [2.0, 2.0, 4.0]
    for name, value in um.mean().items():
        rows = [d[name].astype(np.float64).ravel().tolist() for d in accepted]
        np.testing.assert_allclose(value.ravel(), reference_mean(rows, weights), rtol=0, atol=1e-6)


@KINDS
def test_capacity_overflow_is_refused_and_changes_nothing(kind) -> None:
    um = kind(SHAPES, capacity=2)
    um.add(delta(1), 1.0)
    um.add(delta(2), 3.0)
    before = um.mean()
    with pytest.raises(ValidationError, match="more than 2 updates"):
        um.add(delta(3), 1.0)
    assert um.count == 2 and um.total_weight == 4.0
    for name, value in um.mean().items():
        np.testing.assert_array_equal(value, before[name])


@KINDS
def test_huge_finite_values_are_refused_by_the_norm_bound_not_as_nan(kind) -> None:
    huge = {"conv.weight": np.full((2, 3), 1e30, np.float32), "fc.bias": np.full(4, -1e30, np.float32)}
    flat = huge["conv.weight"].ravel()
    with np.errstate(over="ignore"):
        assert np.isinf(np.dot(flat, flat))  # the float32 sum of squares overflows
    um = kind(SHAPES, capacity=2)
    um.add(delta(1), 1.0)
    with pytest.raises(ValidationError, match="exceeds the bound") as err:
        um.add(huge, 1.0, max_norm=1e3)
    assert "NaN" not in str(err.value) and "nan" not in str(err.value)
    assert um.count == 1
    # Without a bound the delta is finite, so it is accepted, and its norm is reported exactly.
    norm = um.add(huge, 1.0)
    assert norm == pytest.approx(1e30 * math.sqrt(10), rel=1e-6)
    assert all(np.isfinite(v).all() for v in um.mean().values())


@KINDS
def test_float64_storage_with_overflowing_squares_is_refused_by_the_bound(kind) -> None:
    um = kind({"w": (3,)}, capacity=1, dtype=np.float64)
    with pytest.raises(ValidationError, match="exceeds the bound"):
        um.add({"w": np.array([1e200, 1e200, 0.0])}, 1.0, max_norm=1e6)
    assert um.count == 0


@KINDS
def test_empty_and_all_zero_weight_matrices_have_no_mean(kind) -> None:
    um = kind(SHAPES, capacity=2)
    with pytest.raises(ValidationError, match="no updates"):
        um.mean()
    um.add(delta(1), 0.0)
    with pytest.raises(ValidationError, match="sum to zero"):
        um.mean()


@KINDS
def test_capacity_must_be_positive(kind) -> None:
    with pytest.raises(ValueError):
        kind(SHAPES, capacity=0)


@KINDS
@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2**32 - 1),  # seed of the delta
            st.floats(0.0, 1e3, allow_nan=False),  # weight
            st.sampled_from(["ok", "ok", "nan", "shape", "norm"]),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_update_matrix_mean_is_that_of_the_accepted_updates(kind, updates: list[tuple[int, float, str]]) -> None:
    um = kind(SHAPES, capacity=len(updates))
    accepted: list[tuple[dict[str, np.ndarray], float]] = []
    for seed, weight, kind in updates:
        d = delta(seed)
        if kind == "nan":
            d = nan_at(d, float("nan"))
        elif kind == "shape":
            d["fc.bias"] = np.zeros(3, np.float32)
        elif kind == "norm":
            d = delta(seed, scale=1e3)
        try:
            um.add(d, weight, max_norm=50.0)
        except ValidationError:
            assert kind != "ok"
            continue
        assert kind == "ok"
        accepted.append((d, weight))
    assert um.count == len(accepted)
    if not accepted or math.fsum(w for _, w in accepted) == 0:
        return
    for name, value in um.mean().items():
        rows = [d[name].astype(np.float64).ravel().tolist() for d, _ in accepted]
        expected = reference_mean(rows, [w for _, w in accepted])
        np.testing.assert_allclose(value.ravel(), expected, rtol=0, atol=1e-5)


def test_a_running_sum_keeps_the_mean_only_and_agrees_with_the_rows() -> None:
    from hyprstream.fog.aggregate import Aggregation, updates_for

    rng = np.random.default_rng(5)
    k, n = 40, 1000
    rows = (1e-2 * rng.standard_normal((k, n))).astype(np.float32)
    weights = rng.integers(50, 5000, size=k).astype(float)
    um, us = UpdateMatrix({"w": (n,)}, capacity=k), UpdateSum({"w": (n,)}, capacity=k)
    for r, w in zip(rows, weights, strict=True):
        um.add({"w": r}, w)
        us.add({"w": r}, w)
    exact = (weights @ rows.astype(np.float64)) / weights.sum()
    atol = 2 * k * EPS32 * float(np.abs(rows).max())  # K float32 terms, each at most max|x|
    np.testing.assert_allclose(us.mean()["w"], exact, rtol=0, atol=atol)
    np.testing.assert_allclose(us.mean()["w"], um.mean()["w"], rtol=0, atol=atol)
    assert us.total_weight == um.total_weight == weights.sum()
    for rule in (Aggregation.MEDIAN, Aggregation.TRIMMED_MEAN):
        with pytest.raises(ValidationError, match="needs every delta"):
            us.aggregate(rule)
        assert isinstance(updates_for(rule, {"w": (n,)}, 2), UpdateMatrix)
    assert isinstance(updates_for(Aggregation.MEAN, {"w": (n,)}, 2), UpdateSum)
    with pytest.raises(ValueError, match="float32 or float64"):
        UpdateSum({"w": (n,)}, capacity=2, dtype=np.float16)


@settings(max_examples=80, deadline=None)
@given(exponents=st.lists(st.floats(-300, 300), min_size=1, max_size=10), seed=st.integers(0, 2**31 - 1),
       increasing=st.booleans())
def test_a_running_sum_holds_for_weights_of_any_magnitude(exponents, seed, increasing) -> None:
    """Weights from 1e-300 to 1e300, in any order (increasing ones rescale the sum at every add): the
    mean stays finite and matches a float64 reference that normalises the weights first."""
    weights = sorted(10.0 ** e for e in exponents) if increasing else [10.0 ** e for e in exponents]
    rows = np.random.default_rng(seed).standard_normal((len(weights), 16)).astype(np.float32)
    us = UpdateSum({"w": (16,)}, capacity=len(weights))
    for r, w in zip(rows, weights, strict=True):
        us.add({"w": r}, w)
    top = max(weights)
    rel = np.array([w / top for w in weights])
    expected = (rel @ rows.astype(np.float64)) / rel.sum()
    got = us.mean()["w"]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=0, atol=4 * len(weights) * EPS32 * float(np.abs(rows).max()))


def test_a_running_sum_reads_strided_deltas() -> None:
    us = UpdateSum({"w": (3,)}, capacity=1)
    us.add({"w": np.arange(6, dtype=np.float32)[::2]}, 2.0)  # a non-contiguous view
    np.testing.assert_array_equal(us.mean()["w"], [0.0, 2.0, 4.0])


# ------------------------------------------------------------------------------ robust aggregation

def test_robust_rules_by_hand():
    from hyprstream.fog.aggregate import Aggregation

    m = UpdateMatrix({"w": (3,)}, capacity=5)
    for row in ([1.0, 10.0, -1.0], [2.0, 20.0, -2.0], [3.0, 30.0, -3.0], [4.0, 40.0, -4.0], [1000.0, -1e6, 7.0]):
        m.add({"w": np.array(row, np.float32)}, 1.0)
    np.testing.assert_allclose(m.aggregate(Aggregation.MEDIAN)["w"], [3.0, 20.0, -2.0])
    # 5 rows, trim 0.2: one value dropped at each end of every coordinate
    np.testing.assert_allclose(m.aggregate(Aggregation.TRIMMED_MEAN, 0.2)["w"], [3.0, 20.0, -2.0])
    np.testing.assert_allclose(m.aggregate(Aggregation.TRIMMED_MEAN, 0.0)["w"], m.mean()["w"], rtol=1e-6)
    with pytest.raises(ValidationError, match="trim fraction"):
        m.aggregate(Aggregation.TRIMMED_MEAN, 0.5)


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 12), n=st.integers(1, 20), trim=st.floats(0.0, 0.49), seed=st.integers(0, 2**31 - 1))
def test_robust_rules_stay_within_the_updates_and_match_numpy(k, n, trim, seed):
    from hyprstream.fog.aggregate import Aggregation

    rows = np.random.default_rng(seed).normal(0, 1, (k, n)).astype(np.float32)
    m = UpdateMatrix({"w": (n,)}, capacity=k)
    for r in rows:
        m.add({"w": r}, 1.0)
    med = m.aggregate(Aggregation.MEDIAN)["w"]
    np.testing.assert_allclose(med, np.median(rows, axis=0), rtol=1e-6, atol=1e-6)
    tm = m.aggregate(Aggregation.TRIMMED_MEAN, trim)["w"]
    cut = int(np.floor(trim * k))
    ref = np.sort(rows, axis=0)[cut:k - cut].mean(axis=0)
    np.testing.assert_allclose(tm, ref, rtol=1e-5, atol=1e-6)
    lo, hi = rows.min(axis=0), rows.max(axis=0)
    assert np.all(tm >= lo - 1e-6) and np.all(tm <= hi + 1e-6)
    # one update, however large, moves the median by at most the spread of the others
    if k >= 3:
        bad = rows.copy()
        bad[0] = 1e6
        mb = UpdateMatrix({"w": (n,)}, capacity=k)
        for r in bad:
            mb.add({"w": r}, 1.0)
        got = mb.aggregate(Aggregation.MEDIAN)["w"]
        assert np.all(got <= rows.max(axis=0) + 1e-6)


def test_robust_aggregation_is_refused_with_secure_aggregation(tmp_path):
    from hyprstream.errors import ConfigError
    from hyprstream.fog.aggregate import Aggregation
    from hyprstream.fog.config import load_fog_config

    path = tmp_path / "fog.toml"
    path.write_text('kind = "fog"\nname = "f"\n[core]\nlocation = "grpc://127.0.0.1:1"\ntoken_file = "t"\n'
                    'model = "m"\n[rounds]\naggregation = "median"\n[privacy.secagg]\nclip = 1.0\n')
    with pytest.raises(ConfigError, match="robust aggregation needs each update"):
        load_fog_config(path)
    path.write_text(path.read_text().replace("[privacy.secagg]\nclip = 1.0\n", ""))
    assert load_fog_config(path).rounds.rule is Aggregation.MEDIAN
