"""Client-level clipping of layer-wise deltas (pure math).

A delta is a mapping from parameter name to array, for exactly the parameters of the layers a round
trains. :class:`Layout` fixes the order and shapes in which it is flattened into one vector (sorted
by name: fog and agent derive the same layout from the names alone), and back. :func:`clip_l2`
scales the whole vector -- all trained layers together -- to an L2 norm of at most ``bound``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hyprstream.errors import ValidationError


@dataclass(frozen=True)
class Layout:
    """Names (sorted) and shapes of the parameters of a layer-wise delta."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shapes):
            raise ValueError("layout names and shapes differ in length")
        if list(self.names) != sorted(self.names) or len(set(self.names)) != len(self.names):
            raise ValueError("layout names must be unique and sorted")

    @classmethod
    def of(cls, shapes: Mapping[str, Sequence[int]]) -> Layout:
        names = tuple(sorted(shapes))
        return cls(names, tuple(tuple(int(d) for d in shapes[n]) for n in names))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.sizes)

    def flatten(self, delta: Mapping[str, np.ndarray]) -> np.ndarray:
        """One float64 vector; raises ValidationError on missing, extra, misshapen or non-finite parameters."""
        if set(delta) != set(self.names):
            missing = sorted(set(self.names) - set(delta))
            extra = sorted(set(delta) - set(self.names))
            raise ValidationError(f"delta parameters differ from the round's: missing {missing}, unexpected {extra}")
        out = np.empty(self.size, dtype=np.float64)
        start = 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes, strict=True):
            arr = np.asarray(delta[name])
            if arr.shape != shape:
                raise ValidationError(f"{name}: shape {arr.shape} differs from the round's {shape}")
            out[start:start + size] = arr.reshape(-1)
            start += size
        if not np.all(np.isfinite(out)):
            raise ValidationError("delta contains NaN or Inf")
        return out

    def unflatten(self, vector: np.ndarray, dtype: np.dtype = np.float32) -> dict[str, np.ndarray]:
        vector = np.asarray(vector)
        if vector.shape != (self.size,):
            raise ValidationError(f"vector of shape {vector.shape}, layout needs ({self.size},)")
        out: dict[str, np.ndarray] = {}
        start = 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes, strict=True):
            out[name] = vector[start:start + size].astype(dtype).reshape(shape)
            start += size
        return out

    @classmethod
    def from_wire(cls, names: Sequence[str], flat_shapes: Sequence[int], ranks: Sequence[int]) -> Layout:
        shapes, pos = [], 0
        for r in ranks:
            shapes.append(tuple(int(d) for d in flat_shapes[pos:pos + r]))
            pos += r
        if pos != len(flat_shapes):
            raise ValidationError("layout shapes do not match their ranks")
        return cls(tuple(names), tuple(shapes))

    def wire_shapes(self) -> tuple[list[int], list[int]]:
        """Shapes as (all dimensions concatenated, rank of each) for flat config records."""
        return [d for s in self.shapes for d in s], [len(s) for s in self.shapes]


@dataclass(frozen=True)
class Clipped:
    vector: np.ndarray
    norm: float  # L2 norm before clipping
    factor: float  # the scale applied (1.0 when the norm was within the bound)


def clip_l2(vector: np.ndarray, bound: float, *, copy: bool = True) -> Clipped:
    """Scale ``vector`` to L2 norm at most ``bound``: a new float64 array, or with ``copy=False`` the
    (float64) input itself when it is already within the bound."""
    if not (bound > 0 and math.isfinite(bound)):
        raise ValueError(f"clip bound must be positive and finite, got {bound}")
    v = np.asarray(vector, dtype=np.float64)
    norm = l2_norm(v)
    if not math.isfinite(norm):
        raise ValidationError("cannot clip a vector with NaN or Inf")
    if norm <= bound:
        return Clipped(v.copy() if copy else v, norm, 1.0)
    # 1e-9 of slack: any summation order (BLAS, pairwise, sequential) then agrees the norm is within
    factor = bound / norm * (1 - 1e-9)
    out = v * factor
    while l2_norm(out) > bound * (1 - 1e-10):
        factor = math.nextafter(factor, 0.0) * (1 - 1e-15)
        out = v * factor
    return Clipped(out, norm, factor)


def l2_norm(v: np.ndarray) -> float:
    """L2 norm of a float64 vector without BLAS (whose threads stall on a busy machine for one dot)."""
    return math.sqrt(float(np.einsum("i,i->", v, v)))


__all__ = ["Clipped", "Layout", "clip_l2", "l2_norm"]
