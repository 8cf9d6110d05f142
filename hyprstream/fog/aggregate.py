"""Layer-wise aggregation math: pure functions over arrays, no I/O.

For the weighted mean (FedAvg) each client's delta is checked and added to a running weighted sum as
its reply arrives (:class:`UpdateSum`: one BLAS ``axpy`` per parameter while the delta is still in
cache from its check), so a round reads each delta once more after its check and holds one model's
worth of sums whatever the number of clients. A robust rule needs every delta of a coordinate: its
deltas are written row by row into a preallocated ``(K, n)`` matrix (:class:`UpdateMatrix`), combined
at the end. No per-client Python loop does arithmetic over the values.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from hyprstream import plugins
from hyprstream.errors import ValidationError


def weighted_mean(matrix: np.ndarray, weights: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Weighted mean of the rows of ``matrix`` (shape ``(K, n)``) with non-negative ``weights`` (K,).

    Computed as one BLAS ``gemv``: ``(w / sum(w)) @ matrix``.
    """
    w = np.asarray(weights, dtype=np.float64)
    if matrix.ndim != 2 or w.shape != (matrix.shape[0],):
        raise ValidationError(f"weights of shape {w.shape} do not match a matrix of shape {matrix.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValidationError("weights must be finite and non-negative")
    total = w.sum()
    if total <= 0:
        raise ValidationError("weights sum to zero: nothing to aggregate")
    # Coefficients in the matrix's own float dtype (float32 stays a single sgemv); a matrix of
    # integers is averaged in float64, not with coefficients truncated to 0.
    dtype = matrix.dtype if np.issubdtype(matrix.dtype, np.floating) else np.dtype(np.float64)
    coef = (w / total).astype(dtype, copy=False)
    return np.matmul(coef, matrix, out=out)


class Aggregation(enum.Enum):
    """How a fog combines its agents' deltas (robust rules only where it sees each delta, i.e. without
    secure aggregation)."""

    MEAN = "mean"  # weighted by num_examples (FedAvg)
    TRIMMED_MEAN = "trimmed_mean"  # per coordinate: drop the trim fraction of smallest and largest values
    MEDIAN = "median"  # per coordinate


AGGREGATOR_GROUP = "hyprstream.aggregators"
"""Installed packages offer aggregation rules under this entry-point group: ``name = "package.module:rule"``
(docs/fog.md, "Your own aggregation rule")."""


@dataclass(frozen=True)
class PluginRule:
    """An aggregation rule from outside the package. ``combine(rows, weights)`` gets one layer group's
    deltas, each parameter as the rows of a read-only ``(K, n)`` float32 matrix (``rows`` maps the
    parameter's name to it; row i of every matrix is client i), and the clients' weights (their example
    counts, float64, ``(K,)``), and returns each parameter's combined ``n`` values by name. It sees every
    delta, like the robust rules, so it runs where those do (plain synchronous rounds)."""

    value: str  # as the config names it: an entry-point name or ``package.module:attribute``
    combine: Callable[[Mapping[str, np.ndarray], np.ndarray], Mapping[str, np.ndarray]] = \
        field(repr=False, compare=False)

    def __call__(self, rows: Mapping[str, np.ndarray], weights: np.ndarray) -> dict[str, np.ndarray]:
        shown = {}
        for name, matrix in rows.items():
            shown[name] = matrix.view()
            shown[name].flags.writeable = False  # the rule must not change the deltas it is shown
        try:
            out = self.combine(shown, weights.copy())
        except Exception as exc:  # noqa: BLE001 -- the rule's own failure, named
            raise ValidationError(f"aggregation rule {self.value!r} failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(out, Mapping) or set(out) != set(rows):
            got = sorted(out) if isinstance(out, Mapping) else type(out).__name__
            raise ValidationError(f"aggregation rule {self.value!r} returned {got}, expected {sorted(rows)}")
        combined = {}
        for name, matrix in rows.items():
            try:
                arr = np.asarray(out[name], dtype=matrix.dtype)
            except (TypeError, ValueError) as exc:
                raise ValidationError(f"aggregation rule {self.value!r}, {name}: {exc}") from None
            if arr.shape != (matrix.shape[1],):
                raise ValidationError(f"aggregation rule {self.value!r}, {name}: shape {arr.shape}, "
                                      f"expected ({matrix.shape[1]},)")
            if not np.isfinite(arr).all():
                raise ValidationError(f"aggregation rule {self.value!r}, {name}: NaN or Inf")
            combined[name] = arr
        return combined


Rule = Aggregation | PluginRule


def resolve_rule(name: str | Aggregation | PluginRule) -> Rule:
    """The rule called ``name``: a built-in one (:class:`Aggregation`), one an installed package offers
    (entry-point group ``hyprstream.aggregators``), or ``package.module:attribute``. A built-in name is
    never replaced by a plugin's. Raises ValidationError naming what is wrong."""
    if isinstance(name, Aggregation | PluginRule):
        return name
    if name in {a.value for a in Aggregation}:
        return Aggregation(name)
    if plugins.is_reference(name):
        combine, where = plugins.load_reference("aggregation rule", name)
    else:
        installed = plugins.entry_points(AGGREGATOR_GROUP)
        if name not in installed:
            known = [a.value for a in Aggregation] + sorted(installed)
            raise ValidationError(f"unknown aggregation rule {name!r} (known: {', '.join(known)}; or "
                                  "package.module:attribute)")
        combine, where = plugins.load_entry_point("aggregation rule", name, installed[name])
    if not callable(combine):
        raise ValidationError(f"{where} is {combine!r}, not a callable combine(rows, weights)")
    return PluginRule(name, combine)


def needs_rows(rule: Rule) -> bool:
    """Whether ``rule`` needs every client's delta (a robust or plugin rule), not only their weighted sum."""
    return rule is not Aggregation.MEAN


def trimmed_mean(matrix: np.ndarray, trim: float) -> np.ndarray:
    """Coordinate-wise trimmed mean of the rows of ``matrix`` (``(K, n)``): the ``floor(trim * K)``
    smallest and largest values of each coordinate are dropped (Yin et al. 2018); unweighted."""
    if not 0 <= trim < 0.5:
        raise ValidationError(f"trim fraction must be in [0, 0.5), got {trim}")
    k = matrix.shape[0]
    cut = int(np.floor(trim * k))
    if cut == 0:
        return matrix.mean(axis=0, dtype=np.float64).astype(matrix.dtype, copy=False)
    part = np.partition(matrix, (cut, k - cut - 1), axis=0)
    return part[cut:k - cut].mean(axis=0, dtype=np.float64).astype(matrix.dtype, copy=False)


class _Updates(abc.ABC):
    """Up to ``capacity`` client deltas of a set of parameters: ``add`` validates one client's delta
    (names, shapes, dtype, finiteness, norm) and keeps it; a refused delta leaves everything unchanged.
    Subclasses say how a checked delta is kept (:meth:`_keep`) and combined."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], capacity: int, dtype: np.dtype = np.float32) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        self.dtype = np.dtype(dtype)
        self.capacity = capacity
        self._sizes = {k: int(np.prod(s, dtype=np.int64)) for k, s in self.shapes.items()}
        self.count = 0

    def add(self, delta: Mapping[str, np.ndarray], weight: float, *, max_norm: float | None = None) -> float:
        """Check one client's delta and keep it; returns its L2 norm. Raises ValidationError."""
        norm, checked = self.check(delta, weight, max_norm=max_norm)
        self.store(checked, weight)
        return norm

    def check(self, delta: Mapping[str, np.ndarray], weight: float, *,
              max_norm: float | None = None) -> tuple[float, dict[str, np.ndarray]]:
        """Validate one client's delta without storing it: its L2 norm and the flat arrays to
        :meth:`store`. Raises ValidationError."""
        if self.count >= self.capacity:
            raise ValidationError(f"more than {self.capacity} updates for this round")
        if set(delta) != set(self.shapes):
            missing = sorted(set(self.shapes) - set(delta))
            extra = sorted(set(delta) - set(self.shapes))
            raise ValidationError(f"update parameters differ from the request: missing {missing}, unexpected {extra}")
        if not np.isfinite(weight) or weight < 0:
            raise ValidationError(f"update weight must be finite and >= 0, got {weight}")
        sq = 0.0
        flats: dict[str, np.ndarray] = {}
        for name, shape in self.shapes.items():
            arr = np.asarray(delta[name])
            if arr.shape != shape:
                raise ValidationError(f"{name}: shape {arr.shape} differs from the model's {shape}")
            if not np.can_cast(arr.dtype, self.dtype, casting="same_kind"):
                raise ValidationError(f"{name}: dtype {arr.dtype} cannot be stored as {self.dtype}")
            flat = arr.reshape(-1)
            if flat.dtype != self.dtype:
                # Check the values as they will be stored: finite float64 can overflow float32.
                with np.errstate(over="ignore", invalid="ignore"):
                    flat = flat.astype(self.dtype)
            with np.errstate(over="ignore"):  # an overflowing sum of squares is handled below
                part = float(np.dot(flat, flat))
            if not np.isfinite(part):
                if not np.isfinite(flat).all():
                    cast = "" if arr.dtype == self.dtype else f" once stored as {self.dtype}"
                    raise ValidationError(f"{name}: update contains NaN or Inf{cast}")
                # Finite values whose squares overflow the storage dtype: sum them in float64.
                wide = flat.astype(np.float64)
                with np.errstate(over="ignore"):  # inf beyond float64: refused by any max_norm
                    part = float(np.dot(wide, wide))
            sq += part
            flats[name] = flat
        norm = float(np.sqrt(sq))
        if max_norm is not None and not norm <= max_norm:
            raise ValidationError(f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}")
        return norm, flats

    def store(self, checked: Mapping[str, np.ndarray], weight: float) -> None:
        """Keep arrays returned by :meth:`check` as the next delta, with ``weight``."""
        if self.count >= self.capacity:
            raise ValidationError(f"more than {self.capacity} updates for this round")
        self._keep(checked, float(weight))
        self.count += 1

    def store_rows(self, rows: Mapping[str, np.ndarray], weights: np.ndarray) -> None:
        """Keep ``k`` checked deltas at once: ``rows[name]`` is a ``(k, size)`` matrix (row i: client i's
        flat values of ``name``, already checked as :meth:`check` checks one delta), ``weights`` their ``k``
        weights. The same outcome as ``k`` :meth:`store` calls, without one Python object per client."""
        weights = np.asarray(weights, dtype=np.float64).reshape(-1)
        k = len(weights)
        if self.count + k > self.capacity:
            raise ValidationError(f"more than {self.capacity} updates for this round")
        if set(rows) != set(self.shapes):
            raise ValidationError(f"rows of {sorted(rows)}, expected {sorted(self.shapes)}")
        for name, size in self._sizes.items():
            if np.shape(rows[name]) != (k, size):
                raise ValidationError(f"{name}: rows of shape {np.shape(rows[name])}, expected {(k, size)}")
        if not (np.isfinite(weights).all() and (weights >= 0).all()):
            raise ValidationError("update weights must be finite and >= 0")
        if k:
            self._keep_rows(rows, weights)
            self.count += k

    @abc.abstractmethod
    def _keep(self, checked: Mapping[str, np.ndarray], weight: float) -> None:
        """Keep one checked delta (its index is ``count``)."""

    @abc.abstractmethod
    def _keep_rows(self, rows: Mapping[str, np.ndarray], weights: np.ndarray) -> None:
        """Keep checked deltas as rows (the first at index ``count``)."""


class UpdateMatrix(_Updates):
    """Preallocated rows for up to ``capacity`` client deltas: every rule (the weighted mean and the
    robust ones, which need every delta of a coordinate) can combine them."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], capacity: int, dtype: np.dtype = np.float32) -> None:
        super().__init__(shapes, capacity, dtype)
        self._rows = {k: np.empty((capacity, n), dtype=self.dtype) for k, n in self._sizes.items()}
        self._weights = np.zeros(capacity, dtype=np.float64)

    def _keep(self, checked: Mapping[str, np.ndarray], weight: float) -> None:
        for name, flat in checked.items():
            np.copyto(self._rows[name][self.count], flat)
        self._weights[self.count] = weight

    def _keep_rows(self, rows: Mapping[str, np.ndarray], weights: np.ndarray) -> None:
        k, at = len(weights), self.count
        for name, m in rows.items():
            self._rows[name][at:at + k] = m
        self._weights[at:at + k] = weights

    def mean(self) -> dict[str, np.ndarray]:
        """Weighted mean per parameter over the rows added so far."""
        if self.count == 0:
            raise ValidationError("no updates to aggregate")
        k = self.count
        return {
            name: weighted_mean(rows[:k], self._weights[:k]).reshape(self.shapes[name])
            for name, rows in self._rows.items()
        }

    def aggregate(self, rule: Rule = Aggregation.MEAN, trim: float = 0.1) -> dict[str, np.ndarray]:
        """The rows added so far combined by ``rule`` (the weighted mean, an unweighted robust rule, or a
        plugin's rule, which gets the weights too)."""
        if rule is Aggregation.MEAN:
            return self.mean()
        if self.count == 0:
            raise ValidationError("no updates to aggregate")
        k = self.count
        if isinstance(rule, PluginRule):
            combined = rule({name: rows[:k] for name, rows in self._rows.items()}, self._weights[:k])
            return {name: values.reshape(self.shapes[name]) for name, values in combined.items()}
        out = {}
        for name, rows in self._rows.items():
            if rule is Aggregation.MEDIAN:
                combined = np.median(rows[:k], axis=0).astype(self.dtype, copy=False)
            else:
                combined = trimmed_mean(rows[:k], trim)
            out[name] = combined.reshape(self.shapes[name])
        return out

    @property
    def total_weight(self) -> float:
        return float(self._weights[: self.count].sum())


class UpdateSum(_Updates):
    """The weighted mean of up to ``capacity`` client deltas kept as a running weighted sum: each delta
    is added (one BLAS ``axpy``, while it is still in cache from its check) and dropped, so memory stays
    at one model's size whatever the number of clients, and nothing is copied into rows. The mean only:
    a robust rule needs every delta of a coordinate (:class:`UpdateMatrix`)."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], capacity: int, dtype: np.dtype = np.float32) -> None:
        super().__init__(shapes, capacity, dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"a running sum is kept in float32 or float64, not {self.dtype}")
        from scipy.linalg import blas

        self._axpy = blas.saxpy if self.dtype == np.float32 else blas.daxpy
        # sums = sum_i (w_i / scale) * x_i with scale the largest weight so far: every coefficient is in
        # [0, 1] whatever the weights' magnitude (1e-200 or 1e30), so the sums neither overflow nor lose
        # a lone tiny weight; a larger weight rescales the sums once (a factor in (0, 1)).
        self._sums = {k: np.zeros(n, dtype=self.dtype) for k, n in self._sizes.items()}
        self._scale = 0.0
        self._relative = 0.0  # sum_i w_i / scale
        self._total = 0.0

    def _raise_scale(self, weight: float) -> None:
        """Keep ``scale`` the largest weight so far: a larger one rescales the sums once (a factor in (0, 1))."""
        if weight > self._scale:
            if self._relative:
                factor = self._scale / weight
                for acc in self._sums.values():
                    acc *= self.dtype.type(factor)
                self._relative *= factor
            self._scale = weight

    def _keep(self, checked: Mapping[str, np.ndarray], weight: float) -> None:
        self._raise_scale(weight)
        coef = weight / self._scale if weight else 0.0
        if coef:
            for name, flat in checked.items():
                self._axpy(np.ascontiguousarray(flat), self._sums[name], a=coef)
        self._relative += coef
        self._total += weight

    def _keep_rows(self, rows: Mapping[str, np.ndarray], weights: np.ndarray) -> None:
        # the running sum's invariant (coefficients w / scale in [0, 1]), the rows summed as one matrix product
        self._raise_scale(float(weights.max()))
        if self._scale > 0:
            coef = (weights / self._scale).astype(self.dtype)
            for name, m in rows.items():
                self._sums[name] += coef @ np.asarray(m, dtype=self.dtype)
            self._relative += float(weights.sum() / self._scale)
        self._total += float(weights.sum())

    def mean(self) -> dict[str, np.ndarray]:
        """The weighted mean per parameter over the deltas added so far."""
        if self.count == 0:
            raise ValidationError("no updates to aggregate")
        if self._total <= 0:
            raise ValidationError("weights sum to zero: nothing to aggregate")
        scale = self.dtype.type(1.0 / self._relative)  # relative >= 1: the largest weight counts 1
        return {name: (acc * scale).reshape(self.shapes[name]) for name, acc in self._sums.items()}

    def aggregate(self, rule: Rule = Aggregation.MEAN, trim: float = 0.1) -> dict[str, np.ndarray]:
        if needs_rows(rule):
            raise ValidationError(f"{rule.value} needs every delta of a coordinate: use UpdateMatrix")
        return self.mean()

    @property
    def total_weight(self) -> float:
        return self._total


def updates_for(rule: Rule, shapes: Mapping[str, Sequence[int]], capacity: int) -> UpdateMatrix | UpdateSum:
    """What a round keeps its deltas in: a running sum for the weighted mean, rows for any other rule."""
    return UpdateMatrix(shapes, capacity) if needs_rows(rule) else UpdateSum(shapes, capacity)
