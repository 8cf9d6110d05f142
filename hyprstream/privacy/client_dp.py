"""Client-level differential privacy at the fog: Gaussian noise calibrated to the clip bound C (pure math).

Each client's delta is clipped to L2 norm C (by the client, before masking: the fog never sees one
delta), so adding or removing one client moves the sum by at most C. The released mean is::

    (sum_i x_i + N(0, (z C)^2 I)) / D

with noise multiplier z and a *fixed* denominator D (the expected number of clients per round, as in
McMahan et al. 2018's DP-FedAvg): dividing by the realised count would make the count itself a
non-private output.

Two placements (:class:`NoisePlacement`):

* ``central`` -- the fog adds N(0, (zC)^2) to the unmasked sum. Protects the released model against
  core and everyone downstream; the fog itself sees the exact sum (it is trusted with it).
* ``distributed`` -- every client adds discrete Gaussian noise of variance (zC)^2 / m_min (in
  quantized units) to its input before masking, and the fog refuses to release a sum of fewer than
  m_min inputs. The unmasked sum then already carries variance >= (zC)^2: no tier ever sees an
  un-noised sum. Assumes the m_min (or more) surviving clients follow the protocol (a client that
  colludes with the fog and skips its noise lowers the noise by its share).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from hyprstream.privacy.errors import PrivacyViolation
from hyprstream.privacy.noise import RandomSource, discrete_sum_divergence, gaussian
from hyprstream.privacy.quantize import Quantizer


class NoisePlacement(enum.Enum):
    CENTRAL = "central"
    DISTRIBUTED = "distributed"


@dataclass(frozen=True)
class ClientDP:
    """Client-level DP of one fog: clip bound, noise multiplier, placement and the mean's denominator."""

    clip: float
    noise_multiplier: float
    placement: NoisePlacement
    min_clients: int  # distributed: a sum of fewer inputs is never released
    denominator: float  # expected clients per round

    def __post_init__(self) -> None:
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError("clip must be positive")
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError("noise_multiplier must be positive")
        if self.min_clients < 1 or not self.denominator > 0:
            raise ValueError("min_clients must be >= 1 and denominator > 0")

    @property
    def sum_std(self) -> float:
        """Standard deviation of the noise on the sum, per coordinate (value units)."""
        return self.noise_multiplier * self.clip

    def local_std(self) -> float:
        """Distributed placement: the standard deviation each client adds (value units)."""
        return self.sum_std / math.sqrt(self.min_clients) if self.placement is NoisePlacement.DISTRIBUTED else 0.0

    def local_sigma(self, quantizer: Quantizer, dim: int) -> float:
        """Distributed placement: each client's discrete Gaussian std in the quantizer's integer units.

        Checks that the discrete noise behaves like the continuous one for accounting: the
        Kairouz-Liu-Steinke divergence term of the sum must be negligible.
        """
        if self.placement is not NoisePlacement.DISTRIBUTED:
            return 0.0
        sigma = self.local_std() * quantizer.scale
        if discrete_sum_divergence(sigma, quantizer.max_terms) * dim > 1e-12:
            raise PrivacyViolation(f"discrete noise of std {sigma:.3g} integer units is too coarse to be "
                                   "accounted as Gaussian: use a wider field")
        return sigma

    def noise_norm(self, dim: int) -> float:
        """The expected L2 norm of the noise on the released mean of ``dim`` coordinates, z C sqrt(d) / D
        (either placement: the unmasked sum carries variance >= (zC)^2 per coordinate)."""
        return self.sum_std * math.sqrt(dim) / self.denominator

    def check_bound(self, bound: float | None, dim: int, what: str) -> None:
        """Refuse (``PrivacyViolation``) a round whose release the receiver's norm bound would refuse: the
        noise alone has about ``noise_norm(dim)``. Checked before anything is drawn or charged."""
        norm = self.noise_norm(dim)
        if bound is not None and norm >= bound:
            raise PrivacyViolation(
                f"{what}: core's max_update_norm {bound:.6g} is below the noise of norm {norm:.4g} that the "
                f"client-level DP mean of {dim} values carries (z C sqrt(d) / D = {self.noise_multiplier:.4g} x "
                f"{self.clip:.4g} x {math.sqrt(dim):.4g} / {self.denominator:.4g}): core would refuse every "
                "release; raise the bound, train fewer layers or sample more agents")

    def release(self, total: np.ndarray, inputs: int, source: RandomSource) -> np.ndarray:
        """The DP mean from the unmasked sum of ``inputs`` clipped client vectors (float64)."""
        if self.placement is NoisePlacement.DISTRIBUTED:
            if inputs < self.min_clients:
                raise PrivacyViolation(f"{inputs} input(s) carry less noise than the target (needs "
                                       f"{self.min_clients}): the sum is not released")
            noised = np.asarray(total, dtype=np.float64)
        else:
            noised = np.asarray(total, dtype=np.float64) + gaussian(source, np.size(total), self.sum_std)
        return noised / self.denominator


__all__ = ["ClientDP", "NoisePlacement"]
