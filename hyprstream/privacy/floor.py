"""A device's privacy floor, checked against what its fog asks (pure functions, no I/O).

The fog chooses every parameter of a round: whether it is secure-aggregated, the Shamir threshold and
the neighbourhood, the clip, the quantizer and the distributed noise. A device whose profile holds
``[privacy.floor]`` (:class:`~hyprstream.privacy.config.FloorConfig`) declines a round below it:

* ``secure_aggregation``: a plain train request (its delta would reach the fog in the clear);
* ``min_threshold_fraction``: a Shamir threshold t < fraction * k of its k neighbours (fewer colluding
  neighbours could rebuild its masks with the fog);
* ``min_cohort``: fewer than this many clients in its neighbourhood (itself and its k neighbours);
* ``max_clip``: a clip above the maximum (its delta would weigh more in the sum; 0: any clip);
* ``min_noise_multiplier``: distributed noise whose std, in units of the clip, is below the minimum
  (none at all included: with central noise the fog sees the exact sum).

What a device can check is what its setup message says about its own input and neighbourhood; it cannot
tell whether its neighbours are distinct devices (Sybils are not covered, see docs/privacy.md).
"""

from __future__ import annotations

from hyprstream.privacy.config import FloorConfig
from hyprstream.privacy.secagg_messages import Setup

KEY = "privacy.floor"


def plain_round_shortfall(floor: FloorConfig) -> str | None:
    """Why the device declines a plain (not secure-aggregated) train request; None: it may answer it."""
    if floor.secure_aggregation:
        return f"this device requires secure aggregation ({KEY}.secure_aggregation = true)"
    return None


def noise_multiplier(setup: Setup) -> float:
    """The distributed noise the device would add, as its standard deviation over the clip (value units)."""
    spec = setup.spec
    return spec.noise_sigma / (spec.quantizer.scale * spec.clip)


def secure_round_shortfall(floor: FloorConfig, setup: Setup) -> str | None:
    """Why the device declines the secure round ``setup`` describes; None: the round meets its floor."""
    k = len(setup.neighbours)
    reasons = []
    if setup.threshold < floor.min_threshold_fraction * k:
        reasons.append(f"threshold {setup.threshold} of {k} neighbours is below "
                       f"{KEY}.min_threshold_fraction = {floor.min_threshold_fraction:g}")
    if k + 1 < floor.min_cohort:
        reasons.append(f"a neighbourhood of {k + 1} clients is below {KEY}.min_cohort = {floor.min_cohort}")
    if floor.max_clip > 0 and setup.spec.clip > floor.max_clip:
        reasons.append(f"clip {setup.spec.clip:g} is above {KEY}.max_clip = {floor.max_clip:g}")
    if floor.min_noise_multiplier > 0:
        z = noise_multiplier(setup)
        if not z >= floor.min_noise_multiplier:
            reasons.append(f"distributed noise multiplier {z:.3g} is below "
                           f"{KEY}.min_noise_multiplier = {floor.min_noise_multiplier:g}")
    return "; ".join(reasons) or None


__all__ = ["KEY", "noise_multiplier", "plain_round_shortfall", "secure_round_shortfall"]
