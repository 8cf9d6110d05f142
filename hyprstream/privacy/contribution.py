"""A client's contribution to a secure sum: clip, weight, (distributed noise), quantize; and its decoding.

The vector a client masks is, in field elements::

    [ q(w * clip_C'(delta)) + z | q_w(1) ... q_w(G) ]     (the weights only when the spec carries them)

* ``delta`` is the layer-wise delta flattened by the round's :class:`~hyprstream.privacy.clipping.Layout`,
  clipped in L2 to the quantizer's inner bound C' so that the quantized vector's norm is at most C.
  A device that trained only some of the round's G layer groups (the ``hybrid`` strategy) sends zeros
  for the others.
* ``w = min(num_examples, max_weight) / max_weight`` in [0, 1] when the round weights by examples, else 1.
  When the spec carries weights (:attr:`InputSpec.carries_weights`: weighted rounds, and rounds over
  several layer groups without noise) the device's weight for each group rides along, masked like the
  rest: ``q_w(g) = round(w * bound)`` for a group it trained, 0 for one it did not. The fog learns only
  each group's sum of weights, never one client's ``num_examples`` or which groups it trained.
* A buffered cohort's input carries a public factor ``s`` in (0, 1] (its staleness weight): the clipped
  delta and the carried weights are multiplied by it, and the fog divides by the survivors' sum of them.
* ``z`` is the discrete Gaussian noise of distributed DP (integer units), when configured. Rounds under
  client-level DP (central or distributed) carry no weights (a weight's sensitivity would need noise
  too): the fixed denominator divides every group, and a group a device skipped counts its zeros.

The sum of the survivors' vectors decodes (:func:`decode`) to ``sum_i w_i x_i`` (+ noise) and, per group,
``sum_i w_i(g)``. Everything here is pure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from hyprstream.errors import ValidationError
from hyprstream.privacy.clipping import Layout, clip_l2
from hyprstream.privacy.noise import RandomSource, discrete_gaussian
from hyprstream.privacy.quantize import Quantizer


@dataclass(frozen=True)
class InputSpec:
    """How every client of a round encodes its delta (sent to clients in the setup stage)."""

    layout: Layout
    clip: float
    quantizer: Quantizer
    noise_sigma: float = 0.0  # std of the discrete Gaussian each client adds, integer units
    weighted: bool = False
    max_weight: float = 1.0
    groups: tuple[int, ...] = ()  # per layout parameter, the index of its layer group; () one group
    fixed_denominator: bool = False  # client-level DP: the mean divides by a fixed count, no weight is sent

    def __post_init__(self) -> None:
        if self.groups and (len(self.groups) != len(self.layout.names)
                            or sorted(set(self.groups)) != list(range(max(self.groups) + 1))):
            raise ValueError("groups must give every layout parameter a group index, numbering the groups 0..G-1")
        if self.weighted and (self.noise_sigma > 0 or self.fixed_denominator):
            raise ValueError("example-weighted sums cannot carry client-level DP noise (sensitivity of the "
                             "weights); use uniform weighting with DP")
        if not (self.max_weight > 0 and math.isfinite(self.max_weight)):
            raise ValueError("max_weight must be positive")
        if self.noise_sigma > 0:
            tail = self.quantizer.bound - self.clip * self.quantizer.scale
            if tail < 4 * self.noise_sigma:
                raise ValueError("the quantizer leaves no headroom for the distributed noise")
        self.quantizer.inner_clip(self.clip, self.layout.size)  # raises when the grid is too coarse

    @property
    def n_groups(self) -> int:
        return max(self.groups) + 1 if self.groups else 1

    @property
    def carries_weights(self) -> bool:
        """Whether each device's per-group weights ride along: weighted rounds, and noiseless rounds over
        several layer groups (a group's mean is over the devices that trained it)."""
        return not self.fixed_denominator and self.noise_sigma <= 0 and (self.weighted or self.n_groups > 1)

    @property
    def dim(self) -> int:
        return self.layout.size + (self.n_groups if self.carries_weights else 0)

    def group_of(self, name: str) -> int:
        return self.groups[self.layout.names.index(name)] if self.groups else 0

    def complete(self, delta: Mapping[str, np.ndarray], trained: Sequence[int]) -> dict[str, np.ndarray]:
        """``delta`` of a device that trained the groups ``trained``, with zeros for the parameters of the
        others; ValidationError when it is not exactly the trained groups' parameters."""
        trained = set(trained)
        if not trained or not trained <= set(range(self.n_groups)):
            raise ValidationError(f"trained layer groups {sorted(trained)} are not among the round's {self.n_groups}")
        expected = {n for n in self.layout.names if self.group_of(n) in trained}
        if set(delta) != expected:
            missing, extra = sorted(expected - set(delta)), sorted(set(delta) - expected)
            raise ValidationError(f"delta parameters differ from the trained groups': missing {missing}, "
                                  f"unexpected {extra}")
        full = dict(delta)
        for name, shape in zip(self.layout.names, self.layout.shapes, strict=True):
            if name not in full:
                full[name] = np.zeros(shape, dtype=np.float32)
        return full


@dataclass(frozen=True)
class Encoded:
    vector: np.ndarray = field(repr=False)  # field elements, length spec.dim
    norm: float  # L2 norm of the delta before clipping
    clipped: bool


def encode(delta: Mapping[str, np.ndarray], num_examples: int, spec: InputSpec, source: RandomSource,
           trained: Sequence[int] | None = None, scale: float = 1.0) -> Encoded:
    """The field vector client-side code masks; ``trained``: the layer groups the device trained (default
    all; ``delta`` then holds exactly their parameters). ``scale``: a public factor in (0, 1] of the input
    and of its carried weights (a buffered cohort's staleness weight; the fog divides by the survivors'
    sum of them). Raises ValidationError / RangeOverflow, never clips silently beyond C."""
    if not 0 < scale <= 1:
        raise ValidationError(f"an input's scale must be in (0, 1], got {scale}")
    trained = tuple(range(spec.n_groups)) if trained is None else tuple(trained)
    if len(trained) < spec.n_groups:
        delta = spec.complete(delta, trained)
    x = spec.layout.flatten(delta)  # a fresh float64 vector: clipped and quantized in place below
    c = clip_l2(x, spec.quantizer.inner_clip(spec.clip, spec.layout.size), copy=False)
    v = c.vector
    if scale != 1.0:
        v *= scale  # after clipping: the input's norm is at most scale * C
    if not spec.carries_weights and spec.noise_sigma <= 0:
        return Encoded(spec.quantizer.to_field(v, source, overwrite=True), c.norm, c.factor < 1.0)
    q_w = None
    if spec.carries_weights:
        w = min(float(num_examples), spec.max_weight) / spec.max_weight if spec.weighted else 1.0
        if spec.weighted:
            v = v * w
        w *= scale
        q_w = np.zeros(spec.n_groups, dtype=np.int64)
        q_w[list(trained)] = round(w * spec.quantizer.bound)
    q = spec.quantizer.quantize(v, source)
    if spec.noise_sigma > 0:
        q = q + discrete_gaussian(source, q.size, spec.noise_sigma)
    if q_w is not None:
        q = np.concatenate([q, q_w])
    return Encoded(spec.quantizer.encode(q), c.norm, c.factor < 1.0)


@dataclass(frozen=True)
class Decoded:
    total: np.ndarray = field(repr=False)  # float64, sum_i w_i x_i (+ noise), length layout.size
    weights: np.ndarray | None = field(default=None, repr=False)  # per layer group, sum_i w_i(g), when carried

    @property
    def weight(self) -> float | None:
        """The summed weight of a round over one layer group (None when no weights were carried)."""
        return None if self.weights is None else float(self.weights.sum())


def decode(total: np.ndarray, terms: int, spec: InputSpec) -> Decoded:
    ints = spec.quantizer.decode_sum(total, terms)
    d = spec.layout.size
    weights = ints[d:].astype(np.float64) / spec.quantizer.bound if spec.carries_weights else None
    return Decoded(spec.quantizer.dequantize(ints[:d]), weights)


def group_means(dec: Decoded, spec: InputSpec) -> tuple[np.ndarray, tuple[int, ...]]:
    """Each parameter's sum divided by its group's summed weight, and the groups with a positive weight
    (a group no survivor trained has no mean: its values are left at 0)."""
    assert dec.weights is not None
    kept = tuple(int(g) for g in np.flatnonzero(dec.weights > 0))
    mean = np.zeros_like(dec.total)
    start = 0
    for name, size in zip(spec.layout.names, spec.layout.sizes, strict=True):
        g = spec.group_of(name)
        if dec.weights[g] > 0:
            mean[start:start + size] = dec.total[start:start + size] / dec.weights[g]
        start += size
    return mean, kept


__all__ = ["Decoded", "Encoded", "InputSpec", "decode", "encode", "group_means"]
