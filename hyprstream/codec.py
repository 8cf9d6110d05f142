"""Compact encodings of model updates (pure functions over arrays, no I/O).

``int8``: each tensor becomes int8 values and one float32 scale (symmetric, per tensor):
``scale = max|x| / 127`` and ``q = x / scale`` rounded *stochastically* to one of its two integer
neighbours (up with probability equal to the fractional part). Decoding is ``q * scale``. So:

* every element is off by less than one step: ``|x - decode(encode(x))| <= scale``;
* the rounding is unbiased: ``E[decode(encode(x))] = x`` (averaging many agents' updates averages
  the rounding error away, instead of accumulating a bias);
* the generator is passed in: seeded from the train request's seed, an update encodes the same way
  every time (reproducible simulations).

A tensor with NaN or infinite values is refused (:class:`~hyprstream.errors.ValidationError`), as
is a scale that is negative or not finite when decoding.
"""

from __future__ import annotations

import enum
import math

import numpy as np

from hyprstream.errors import ValidationError

INT8_MAX = 127


class Encoding(enum.Enum):
    FP32 = "fp32"
    INT8 = "int8"


def parse_encoding(value: object) -> Encoding:
    try:
        return Encoding(value)
    except ValueError:
        raise ValidationError(f"unknown update encoding {value!r} (known: "
                              f"{', '.join(e.value for e in Encoding)})") from None


def int8_scale(x: np.ndarray) -> np.float32:
    """The float32 step of ``x``'s int8 encoding: ``max|x| / 127``, rounded up so no value clips."""
    m = float(np.max(np.abs(x))) if x.size else 0.0
    scale = np.float32(m / INT8_MAX)
    # rounding to float32 may land just below m/127, or at 0 for the tiniest (subnormal) values
    if m > 0 and float(scale) * INT8_MAX < m:
        scale = np.nextafter(scale, np.float32(np.inf))
    return scale


def encode_int8(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.float32]:
    """``(q, scale)``: int8 values of the shape of ``x`` and their float32 step (stochastic rounding)."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValidationError(f"int8 encoding takes floating-point tensors, got {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValidationError("cannot encode a tensor with NaN or infinite values")
    scale = int8_scale(x)
    if scale == 0:
        return np.zeros(x.shape, np.int8), np.float32(0.0)
    y = x.astype(np.float64) / float(scale)
    low = np.floor(y)
    q = low + (rng.random(y.shape) < (y - low))
    return np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8), scale


def decode_int8(q: np.ndarray, scale: float) -> np.ndarray:
    """The float32 tensor that ``(q, scale)`` stands for."""
    q = np.asarray(q)
    if q.dtype != np.int8:
        raise ValidationError(f"int8-encoded values must be int8, got {q.dtype}")
    s = np.float32(scale)
    if not (np.isfinite(s) and s >= 0):
        raise ValidationError(f"int8 scale must be finite and >= 0, got {scale}")
    return q.astype(np.float32) * s


def encoded_nbytes(shape: tuple[int, ...], encoding: Encoding, itemsize: int = 4) -> int:
    """Payload bytes of one tensor of ``shape`` in ``encoding`` (int8: one byte per value plus its
    float32 scale; fp32: ``itemsize`` per value)."""
    n = math.prod(int(d) for d in shape)  # Python ints: no int64 wrap-around
    return n + 4 if encoding is Encoding.INT8 else n * itemsize


__all__ = ["Encoding", "decode_int8", "encode_int8", "encoded_nbytes", "int8_scale", "parse_encoding"]
