"""Randomness for privacy mechanisms, passed in explicitly, and the noise samplers built on it.

Two sources implement :class:`RandomSource`:

* :class:`SecureRandom` -- a cryptographically secure generator: the AES-256-CTR keystream (from
  ``cryptography``) under a fresh 32-byte key from ``os.urandom``. For real noise, masks'
  stochastic rounding and anything an adversary must not predict.
* :class:`SeededRandom` -- numpy's PCG64 from a seed, for reproducible simulations and tests. It is
  *not* secure: never use it for a deployed device or fog.

Nothing here touches the global numpy or torch generators.

Samplers (pure functions of a source):

* :func:`gaussian` -- continuous N(0, std^2) (Box-Muller on 53-bit uniforms), for the fog's central
  noise on the unmasked sum.
* :func:`discrete_gaussian` -- the discrete Gaussian N_Z(0, sigma^2) over the integers, Canonne,
  Kamath & Steinke 2020, Algorithm 3 (rejection from a discrete Laplace), vectorised in floating
  point as TensorFlow Privacy does. Clients add it to their *quantized* input before masking when
  noise is distributed: sums of integers stay integers, so the secure sum is exact.

Known limit (documented in docs/privacy.md): floating-point samplers are subject to Mironov's (2012)
least-significant-bit attack on the continuous Laplace/Gaussian; the discrete sampler computes its
acceptance probabilities in float64 too, so both are "as TensorFlow Privacy / Opacus do", not exact.
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_TWO_POW_M53 = 2.0 ** -53


class RandomSource(Protocol):
    """Uniform randomness for the samplers below."""

    secure: bool

    def random_bytes(self, n: int) -> bytes:
        """``n`` uniformly random bytes."""

    def uniform(self, n: int) -> np.ndarray:
        """``n`` float64 values uniform on [0, 1) with 53 random bits each."""


class SecureRandom:
    """AES-256-CTR keystream under a key from the operating system's CSPRNG (re-keyed every 2**32 blocks)."""

    secure = True
    _REKEY_BYTES = 1 << 36

    def __init__(self) -> None:
        self._rekey()

    def _rekey(self) -> None:
        self._enc = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(bytes(16))).encryptor()
        self._used = 0

    def random_bytes(self, n: int) -> bytes:
        if n < 0:
            raise ValueError("n must be >= 0")
        if self._used + n > self._REKEY_BYTES:
            self._rekey()
        self._used += n
        return self._enc.update(bytes(n))

    def uniform(self, n: int) -> np.ndarray:
        words = np.frombuffer(self.random_bytes(8 * n), dtype=np.uint64)
        return (words >> np.uint64(11)).astype(np.float64) * _TWO_POW_M53


class SeededRandom:
    """Reproducible, NOT secure: numpy PCG64 from ``seed`` (simulation and tests only)."""

    secure = False

    def __init__(self, seed: int) -> None:
        self._gen = np.random.Generator(np.random.PCG64(seed))

    def random_bytes(self, n: int) -> bytes:
        return self._gen.bytes(n)

    def uniform(self, n: int) -> np.ndarray:
        return self._gen.random(n)


def gaussian(source: RandomSource, n: int, std: float) -> np.ndarray:
    """``n`` samples of N(0, std^2), float64 (Box-Muller)."""
    if not (std >= 0 and math.isfinite(std)):
        raise ValueError(f"std must be finite and >= 0, got {std}")
    if std == 0 or n == 0:
        return np.zeros(n)
    half = (n + 1) // 2
    u = source.uniform(2 * half)
    radius = np.sqrt(-2.0 * np.log1p(-u[:half]))  # 1 - u in (0, 1]: log is finite
    angle = (2.0 * math.pi) * u[half:]
    out = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
    out *= std
    return out


def discrete_gaussian(source: RandomSource, n: int, sigma: float) -> np.ndarray:
    """``n`` samples of the discrete Gaussian N_Z(0, sigma^2) (P(x) proportional to exp(-x^2 / 2 sigma^2)), int64.

    Canonne-Kamath-Steinke Algorithm 3: draw Y from the discrete Laplace with scale t = floor(sigma) + 1
    (difference of two geometric variables), accept with probability exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)).
    The acceptance rate is above 1/2 for every sigma >= 1, so a few vectorised passes fill ``n``.
    """
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    if sigma == 0 or n == 0:
        return np.zeros(n, dtype=np.int64)
    if sigma > 2.0 ** 40:
        raise ValueError(f"sigma {sigma:.3g} is too large for float64 rejection sampling")
    t = math.floor(sigma) + 1
    out = np.empty(n, dtype=np.int64)
    filled = 0
    while filled < n:
        m = max(64, int((n - filled) * 2.2))
        u = source.uniform(3 * m)
        # geometric (number of failures) with P(G = k) = (1 - e^{-1/t}) e^{-k/t}: G = floor(-t ln U), U in (0, 1]
        g1 = np.floor(-t * np.log1p(-u[:m]))
        g2 = np.floor(-t * np.log1p(-u[m:2 * m]))
        y = g1 - g2
        accept = u[2 * m:] < np.exp(-np.square(np.abs(y) - sigma * sigma / t) / (2.0 * sigma * sigma))
        good = y[accept]
        take = min(len(good), n - filled)
        out[filled:filled + take] = good[:take].astype(np.int64)
        filled += take
    return out


def discrete_sum_divergence(sigma: float, terms: int) -> float:
    """tau of Kairouz-Liu-Steinke 2021 (Prop. 14 / CKS Thm. 14) for ``terms`` summed N_Z(0, sigma^2).

    tau = 10 * sum_{k=1}^{terms-1} exp(-2 pi^2 sigma^2 k / (k + 1)). The sum of the discrete Gaussians
    satisfies the Gaussian mechanism's RDP bound up to an additive ``tau * dim`` term; for the integer
    scales used here (sigma ~ 1e4 or more) tau underflows to 0.
    """
    if terms <= 1:
        return 0.0
    return 10.0 * sum(math.exp(-2.0 * math.pi ** 2 * sigma * sigma * k / (k + 1)) for k in range(1, terms))


__all__ = [
    "RandomSource",
    "SecureRandom",
    "SeededRandom",
    "discrete_gaussian",
    "discrete_sum_divergence",
    "gaussian",
]
