"""A client's contribution to a secure sum: clip, weight, (distributed noise), quantize; and its decoding.

The vector a client masks is, in field elements::

    [ q(w * clip_C'(delta)) + z | q_w ]     (q_w only when weighted)

* ``delta`` is the layer-wise delta flattened by the round's :class:`~hyprstream.privacy.clipping.Layout`,
  clipped in L2 to the quantizer's inner bound C' so that the quantized vector's norm is at most C.
* ``w = min(num_examples, max_weight) / max_weight`` in [0, 1] when the round weights by examples
  (then ``q_w = round(w * bound)`` rides along, masked like the rest: the fog learns only the sum of
  the weights, never one client's ``num_examples``). Uniform rounds send no weight at all.
* ``z`` is the discrete Gaussian noise of distributed DP (integer units), when configured.

The sum of the survivors' vectors decodes (:func:`decode`) to ``sum_i w_i x_i`` (+ noise) and
``sum_i w_i``. Everything here is pure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

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

    def __post_init__(self) -> None:
        if self.weighted and self.noise_sigma > 0:
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
    def dim(self) -> int:
        return self.layout.size + (1 if self.weighted else 0)


@dataclass(frozen=True)
class Encoded:
    vector: np.ndarray = field(repr=False)  # field elements, length spec.dim
    norm: float  # L2 norm of the delta before clipping
    clipped: bool


def encode(delta: Mapping[str, np.ndarray], num_examples: int, spec: InputSpec, source: RandomSource) -> Encoded:
    """The field vector client-side code masks. Raises ValidationError / RangeOverflow, never clips silently beyond C."""
    x = spec.layout.flatten(delta)  # a fresh float64 vector: clipped and quantized in place below
    c = clip_l2(x, spec.quantizer.inner_clip(spec.clip, spec.layout.size), copy=False)
    v = c.vector
    if not spec.weighted and spec.noise_sigma <= 0:
        return Encoded(spec.quantizer.to_field(v, source, overwrite=True), c.norm, c.factor < 1.0)
    q_w = None
    if spec.weighted:
        w = min(float(num_examples), spec.max_weight) / spec.max_weight
        v = v * w
        q_w = np.array([round(w * spec.quantizer.bound)], dtype=np.int64)
    q = spec.quantizer.quantize(v, source)
    if spec.noise_sigma > 0:
        q = q + discrete_gaussian(source, q.size, spec.noise_sigma)
    if q_w is not None:
        q = np.concatenate([q, q_w])
    return Encoded(spec.quantizer.encode(q), c.norm, c.factor < 1.0)


@dataclass(frozen=True)
class Decoded:
    total: np.ndarray = field(repr=False)  # float64, sum_i w_i x_i (+ noise), length layout.size
    weight: float | None  # sum_i w_i when weighted


def decode(total: np.ndarray, terms: int, spec: InputSpec) -> Decoded:
    ints = spec.quantizer.decode_sum(total, terms)
    d = spec.layout.size
    weight = float(ints[d]) / spec.quantizer.bound if spec.weighted else None
    return Decoded(spec.quantizer.dequantize(ints[:d]), weight)


__all__ = ["Decoded", "Encoded", "InputSpec", "decode", "encode"]
