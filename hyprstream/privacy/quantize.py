"""Fixed-point encoding of clipped deltas into the modular field of secure aggregation (pure math).

A :class:`Quantizer` is sized from the clip bound and the client count, never guessed:

* every client's encoded value lies in ``[-bound, bound]`` per coordinate (checked: a value outside
  raises :class:`~hyprstream.privacy.errors.RangeOverflow`, it is never clipped silently);
* ``bound * max_terms < 2**(bits-1)``, so the sum of up to ``max_terms`` inputs, taken modulo
  ``2**bits``, decodes to the true integer sum (two's complement) -- no silent wrap-around;
* ``scale = bound / (clip + tail * noise_std)``: a coordinate of an L2-clipped vector is at most
  ``clip`` in absolute value, and distributed noise is budgeted ``tail`` standard deviations.

Stochastic rounding (``floor(x * scale + U)``, U uniform from the source passed in) is unbiased. It
can move a vector by up to ``sqrt(dim) / scale`` in L2, so clients clip to :meth:`Quantizer.inner_clip`
(``clip - sqrt(dim) / scale``) first: the quantized vector's norm is then at most ``clip * scale``
exactly, which is what client-level DP's sensitivity needs.

The field is Z / 2**bits with bits in {32, 64}: numpy's unsigned arithmetic wraps modulo 2**bits
natively, and masks are uniform bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hyprstream.privacy.errors import RangeOverflow
from hyprstream.privacy.noise import RandomSource

FIELD_BITS = (16, 32, 64)
DEFAULT_TAIL = 10.0  # standard deviations of distributed noise budgeted per coordinate
_SIGNED = {16: np.int16, 32: np.int32, 64: np.int64}
_UNSIGNED = {16: np.uint16, 32: np.uint32, 64: np.uint64}


@dataclass(frozen=True)
class Quantizer:
    """Encoding of real vectors into Z / 2**bits for sums of at most ``max_terms`` inputs."""

    bits: int
    scale: float  # integer units per unit of value
    bound: int  # |encoded coordinate| <= bound for one input (clipped value plus any noise)
    max_terms: int

    def __post_init__(self) -> None:
        if self.bits not in FIELD_BITS:
            raise ValueError(f"field bits must be one of {FIELD_BITS}, got {self.bits}")
        if self.max_terms < 1 or self.bound < 1:
            raise ValueError("bound and max_terms must be >= 1")
        if self.bound * self.max_terms >= 2 ** (self.bits - 1):
            raise RangeOverflow(
                f"{self.max_terms} inputs bounded by {self.bound} can overflow a {self.bits}-bit field")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"scale must be positive and finite, got {self.scale}")

    @classmethod
    def for_clients(cls, *, clip: float, max_clients: int, bits: int = 32, noise_std: float = 0.0,
                    tail: float = DEFAULT_TAIL) -> Quantizer:
        """The finest quantizer whose sum of ``max_clients`` inputs cannot overflow.

        ``clip`` is the L2 bound of one client's vector; ``noise_std`` the standard deviation (in value
        units) of noise a client adds to each coordinate before masking, budgeted ``tail`` deviations.
        """
        if not (clip > 0 and math.isfinite(clip)):
            raise ValueError(f"clip must be positive and finite, got {clip}")
        if max_clients < 1:
            raise ValueError("max_clients must be >= 1")
        if bits not in FIELD_BITS:
            raise ValueError(f"field bits must be one of {FIELD_BITS}, got {bits}")
        # at most 2**52 so that every encoded integer is exact in float64 as well
        bound = min((2 ** (bits - 1) - 1) // max_clients, 2 ** 52)
        if bound < 1:
            raise RangeOverflow(f"{max_clients} clients do not fit a {bits}-bit field")
        value_range = clip + tail * noise_std
        return cls(bits=bits, scale=bound / value_range, bound=bound, max_terms=max_clients)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_UNSIGNED[self.bits])

    @property
    def modulus(self) -> int:
        return 2 ** self.bits

    @property
    def resolution(self) -> float:
        """The value of one integer unit."""
        return 1.0 / self.scale

    def inner_clip(self, clip: float, dim: int) -> float:
        """The L2 bound to clip to before stochastic rounding so that the quantized norm is <= ``clip``."""
        inner = clip - math.sqrt(dim) / self.scale
        if inner < 0.5 * clip:
            raise RangeOverflow(
                f"quantization step {self.resolution:.3g} is too coarse for {dim} coordinates under clip "
                f"{clip:.3g}: use a wider field or fewer clients per fog")
        return inner

    def quantize(self, x: np.ndarray, source: RandomSource) -> np.ndarray:
        """Stochastically rounded ``x * scale`` as int64; raises RangeOverflow outside ``[-bound, bound]``."""
        scaled = np.asarray(x, dtype=np.float64) * self.scale
        _add_uniform(scaled, source)
        np.floor(scaled, out=scaled)
        self._check_floats(scaled)
        return scaled.astype(np.int64)

    def to_field(self, x: np.ndarray, source: RandomSource, *, overwrite: bool = False) -> np.ndarray:
        """``encode(quantize(x, source))`` in one pass over the data: the field elements of ``x``.

        The same values and the same draws from ``source``; with ``overwrite`` a float64 ``x`` is
        used as the working buffer (its values are lost), which saves the large temporaries.
        """
        x = np.asarray(x)
        if overwrite and x.dtype == np.float64 and x.flags.writeable and x.flags.c_contiguous:
            scaled = np.multiply(x, self.scale, out=x)
        else:
            scaled = np.asarray(x, dtype=np.float64) * self.scale
        _add_uniform(scaled, source)
        np.floor(scaled, out=scaled)
        self._check_floats(scaled)
        return scaled.astype(_SIGNED[self.bits]).view(self.dtype)  # |values| <= bound < 2**(bits-1): exact

    def _check_floats(self, scaled: np.ndarray) -> None:
        if scaled.size:
            # integers below 2**53 are exact in float64; min / max are NaN when any value is NaN
            lo, hi = float(scaled.min()), float(scaled.max())
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise RangeOverflow("cannot quantize NaN or Inf")
            if hi > self.bound or lo < -self.bound:
                raise RangeOverflow(
                    f"encoded value {max(hi, -lo):.0f} exceeds the field's per-client bound {self.bound}")

    def check(self, q: np.ndarray) -> None:
        """Raise RangeOverflow when any coordinate of an encoded input exceeds ``bound``."""
        if q.size and (int(q.max()) > self.bound or int(q.min()) < -self.bound):
            worst = max(int(q.max()), -int(q.min()))
            raise RangeOverflow(f"encoded value {worst} exceeds the field's per-client bound {self.bound}")

    def encode(self, q: np.ndarray) -> np.ndarray:
        """Integers in ``[-bound, bound]`` to field elements (two's complement modulo 2**bits)."""
        self.check(q)
        return np.asarray(q, dtype=np.int64).astype(_SIGNED[self.bits]).view(self.dtype)

    def decode_sum(self, total: np.ndarray, terms: int) -> np.ndarray:
        """The integer sum of ``terms`` encoded inputs from their sum modulo 2**bits (int64)."""
        if not 0 <= terms <= self.max_terms:
            raise RangeOverflow(f"the field was sized for at most {self.max_terms} inputs, got {terms}")
        total = np.asarray(total)
        if total.dtype != self.dtype:
            raise ValueError(f"expected a {self.dtype} field vector, got {total.dtype}")
        return total.view(_SIGNED[self.bits]).astype(np.int64)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return np.asarray(q, dtype=np.float64) / self.scale


# Uniform draws are taken and added in blocks of this many values: the same draws, in the same order,
# as one ``source.uniform(size)`` call (both sources are streams), without a full-size temporary
# (on some hosts every fresh large allocation costs a page fault per 4 kB).
_UNIFORM_BLOCK = 8192


def _add_uniform(scaled: np.ndarray, source: RandomSource) -> None:
    """``scaled += U`` with U uniform on [0, 1) from ``source``, in place, in the order of ``scaled.flat``."""
    flat = scaled.reshape(-1)  # a view for the contiguous arrays used here; a copy would be written back
    for start in range(0, flat.size, _UNIFORM_BLOCK):
        end = min(start + _UNIFORM_BLOCK, flat.size)
        flat[start:end] += source.uniform(end - start)
    if not np.shares_memory(flat, scaled):
        scaled[...] = flat.reshape(scaled.shape)


def field_add(acc: np.ndarray, x: np.ndarray) -> None:
    """``acc += x`` modulo 2**bits, in place (unsigned numpy arithmetic wraps by definition)."""
    if acc.dtype != x.dtype or acc.shape != x.shape:
        raise ValueError(f"field vectors differ: {acc.dtype}{acc.shape} vs {x.dtype}{x.shape}")
    np.add(acc, x, out=acc)


def field_sub(acc: np.ndarray, x: np.ndarray) -> None:
    """``acc -= x`` modulo 2**bits, in place."""
    if acc.dtype != x.dtype or acc.shape != x.shape:
        raise ValueError(f"field vectors differ: {acc.dtype}{acc.shape} vs {x.dtype}{x.shape}")
    np.subtract(acc, x, out=acc)


__all__ = ["DEFAULT_TAIL", "FIELD_BITS", "Quantizer", "field_add", "field_sub"]
