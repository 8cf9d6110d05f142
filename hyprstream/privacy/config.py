"""The ``[privacy]`` configuration sections, parsed once at start-up into frozen objects.

A fog's TOML may hold ``[privacy.secagg]`` (secure aggregation of the layer-wise deltas) and
``[privacy.client_dp]`` (client-level DP of the model, which needs secure aggregation: clients clip
and, for distributed noise, noise their own deltas); a device profile may hold ``[privacy.dpsgd]``
(sample-level DP-SGD with a budget). A missing section means that mechanism is off::

    [privacy.secagg]
    clip = 1.0                 # L2 bound of one client's delta (and client-level DP's sensitivity)
    field_bits = 32            # 16, 32 or 64; the grid is sized from clip and the round's client count
    threshold_fraction = 0.5   # Shamir threshold t = floor(fraction * degree) + 1: >= 0.5, a strict majority
    expected_dropout = 0.1     # sizes the neighbour graph's degree (unless degree > 0)
    degree = 0
    weighting = "uniform"      # or "examples": num_examples ride masked; only their sum is revealed
    max_weight = 1000.0        # examples weighting: num_examples is capped here
    stage_timeout_s = 30.0     # each stage after the first (which trains: the round plan's timeout)
    min_clients = 2

    [privacy.client_dp]
    noise_multiplier = 1.0
    placement = "central"      # or "distributed" (clients noise before masking)
    client_sampling_rate = 1.0 # Poisson selection of the fog's agents each round (amplification)
    epsilon_budget = 10.0
    delta = 1e-5
    min_clients = 2            # distributed: the noise is split over this many clients

    [privacy.dpsgd]
    noise_multiplier = 1.1
    max_grad_norm = 1.0
    epsilon_budget = 8.0       # optional: default the device profile's [training] privacy_epsilon
    delta = 1e-5               # optional: default the profile's privacy_delta
    secure = true              # OS-seeded noise and Opacus secure_mode; false only in simulations
    ledger_dir = ""            # default: "<store-dir>.privacy" beside the device store

A device profile may also hold ``[privacy.floor]``: the least privacy the device accepts, whatever its
fog asks (see :mod:`hyprstream.privacy.floor`; a missing section or key accepts anything)::

    [privacy.floor]
    secure_aggregation = true      # decline every train request that is not a secure round
    min_threshold_fraction = 0.6   # secure rounds: Shamir threshold >= this fraction of the neighbours
    min_cohort = 10                # secure rounds: the device and its neighbours, at least this many
    max_clip = 1.0                 # secure rounds: the L2 clip of the device's delta, at most this (0: any)
    min_noise_multiplier = 0.0     # secure rounds: the distributed noise the device adds, std / clip
    allow_offload = false          # never send raw feature rows to the fog's inference offload
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator
from dataclasses import dataclass

from hyprstream.config import Checked, setting
from hyprstream.privacy.client_dp import NoisePlacement
from hyprstream.privacy.ledger import Budget


class Weighting(enum.Enum):
    UNIFORM = "uniform"
    EXAMPLES = "examples"


@dataclass(frozen=True)
class SecAggConfig(Checked):
    clip: float = setting(1.0, gt=0, doc="L2 bound of one client's layer-wise delta")
    field_bits: int = setting(32, doc="width of the modular field of fp32 updates: 16, 32 or 64 (int8 updates: "
                                      "always 16)")
    threshold_fraction: float = setting(0.5, gt=0, le=1, doc="Shamir threshold t = floor(fraction * degree) + 1 "
                                        "(at least 0.5: a strict majority of the neighbours)")
    expected_dropout: float = setting(0.1, ge=0, lt=1, doc="client dropout the neighbour graph is sized for")
    degree: int = setting(0, ge=0, doc="neighbours per client; 0: planned from n and expected_dropout")
    weighting: Weighting = setting(Weighting.UNIFORM, doc="uniform mean or weighted by (masked) num_examples")
    max_weight: float = setting(1000.0, gt=0, doc="examples weighting: cap on num_examples")
    stage_timeout_s: float = setting(30.0, gt=0, doc="timeout of each stage after the training one")
    min_clients: int = setting(2, ge=2, doc="fewest clients whose sum may be released")

    def check(self) -> Iterator[tuple[str, str]]:
        if self.field_bits not in (16, 32, 64):
            yield "field_bits", f"must be 16, 32 or 64, got {self.field_bits}"
        if self.threshold_fraction < 0.5:
            yield "threshold_fraction", (f"must be at least 0.5, got {self.threshold_fraction}: the threshold must be "
                                         "a strict majority of a client's neighbours, or a fog that tells some of "
                                         "them the client survived and the others that it dropped collects both "
                                         "its self-mask seed and its mask key")


@dataclass(frozen=True)
class ClientDpConfig(Checked):
    noise_multiplier: float = setting(gt=0, doc="noise std / clip bound")
    placement: NoisePlacement = setting(NoisePlacement.CENTRAL, doc="central (fog) or distributed (clients)")
    client_sampling_rate: float = setting(1.0, gt=0, le=1, doc="Poisson rate of agent selection per round")
    epsilon_budget: float = setting(math.inf, gt=0, doc="the model's client-level epsilon budget at delta")
    delta: float = setting(1e-5, gt=0, lt=1)
    min_clients: int = setting(2, ge=1, doc="distributed: fewest inputs the noise is split over")
    clip: float | None = setting(None, gt=0, doc="without [privacy.secagg]: the L2 bound the fog clips each agent's "
                                 "delta to (with it, [privacy.secagg] clip applies)")

    @property
    def budget(self) -> Budget:
        return Budget(self.epsilon_budget, self.delta)


@dataclass(frozen=True)
class DpSgdConfig(Checked):
    noise_multiplier: float = setting(gt=0)
    max_grad_norm: float = setting(gt=0)
    epsilon_budget: float | None = setting(None, gt=0, doc="sample-level epsilon budget; default: the "
                                           "device profile's [training] privacy_epsilon")
    delta: float | None = setting(None, gt=0, lt=1, doc="default: the profile's privacy_delta")
    secure: bool = setting(True, doc="OS-seeded noise and Opacus secure_mode (false: simulation only)")
    ledger_dir: str = setting("", doc="privacy ledger store; default '<store-dir>.privacy'")

    def budget(self, profile_epsilon: float | None = None, profile_delta: float | None = None) -> Budget:
        """The device's budget: this section's values, else the device profile's [training] ones."""
        eps = self.epsilon_budget if self.epsilon_budget is not None else profile_epsilon
        delta = self.delta if self.delta is not None else profile_delta
        if eps is None or delta is None:
            raise ValueError("[privacy.dpsgd] has no budget and the device profile gives none")
        return Budget(eps, delta)

    def settings(self, profile_epsilon: float | None = None, profile_delta: float | None = None):
        """The :class:`~hyprstream.privacy.dpsgd.DpSgd` settings of this device."""
        from hyprstream.privacy.dpsgd import DpSgd

        return DpSgd(self.noise_multiplier, self.max_grad_norm, self.budget(profile_epsilon, profile_delta), self.secure)


@dataclass(frozen=True)
class FloorConfig(Checked):
    """A device's privacy floor: the least it accepts from its fog (the defaults accept anything)."""

    secure_aggregation: bool = setting(False, doc="decline every train request that is not a secure round")
    min_threshold_fraction: float = setting(0.0, ge=0, le=1, doc="fewest Shamir shares t as a fraction of "
                                            "the device's neighbours")
    min_cohort: int = setting(0, ge=0, doc="fewest clients of the device's neighbourhood, itself included")
    max_clip: float = setting(0.0, ge=0, doc="largest L2 clip of the device's delta (0: any)")
    min_noise_multiplier: float = setting(0.0, ge=0, doc="least distributed noise the device adds, as "
                                          "(its noise std) / clip; > 0 declines rounds without it")
    allow_offload: bool = setting(True, doc="send raw feature rows to the fog's inference offload")

    def check(self) -> Iterator[tuple[str, str]]:
        if self.secure_aggregation:
            return
        for key in ("min_threshold_fraction", "min_cohort", "max_clip", "min_noise_multiplier"):
            if getattr(self, key) > 0:
                yield key, "needs secure_aggregation = true (a plain round has no such parameter to hold it to)"


CLIENT_DP_DISTRIBUTED_NEEDS_SECAGG = ("distributed noise is added by the clients inside SecAgg+ (the fog never sees an "
                                     "un-noised sum): it needs [privacy.secagg]; without it use placement = "
                                     "\"central\"")
"""Why ``placement = "distributed"`` is refused without ``[privacy.secagg]`` (also a rule of
:mod:`hyprstream.fog.composition`)."""

CLIENT_DP_NEEDS_THE_MEAN = ("client-level DP is calibrated to the mean: a robust rule's output can move by more than "
                            "the clip bound when one agent is added or removed (a median jumps to another order "
                            "statistic in every coordinate): use aggregation = \"mean\"")
"""Why client-level DP is refused with a robust rule (a rule of :mod:`hyprstream.fog.composition`)."""

CLIENT_DP_NEEDS_CLIP = ("client-level DP without [privacy.secagg] needs privacy.client_dp.clip: the L2 bound the "
                        "fog clips each agent's delta to")

BUFFERED_CLIENT_DP = ("a buffered cohort's client-level DP release is accounted as one device's update replaced "
                      "(sensitivity 2C, rate 1): its rounds must be set up for it (hyprstream.fog.engine."
                      "buffered_privacy)")
"""Why a secure runner refuses a buffered cohort whose client-level DP is accounted as sampled rounds."""


@dataclass(frozen=True)
class PrivacyConfig(Checked):
    """The ``[privacy]`` table: each mechanism on when its section is present."""

    secagg: SecAggConfig | None = setting(None)
    client_dp: ClientDpConfig | None = setting(None)
    dpsgd: DpSgdConfig | None = setting(None)

    def check(self) -> Iterator[tuple[str, str]]:
        if self.client_dp is not None and self.secagg is None:
            if self.client_dp.placement is NoisePlacement.DISTRIBUTED:
                yield "client_dp.placement", CLIENT_DP_DISTRIBUTED_NEEDS_SECAGG
            elif self.client_dp.clip is None:
                yield "client_dp.clip", CLIENT_DP_NEEDS_CLIP
        if self.client_dp is not None and self.secagg is not None and self.client_dp.clip is not None \
                and self.client_dp.clip != self.secagg.clip:
            yield "client_dp.clip", (f"with [privacy.secagg] the clients clip to its clip ({self.secagg.clip:g}); "
                                     "leave client_dp.clip unset or equal")
        if (self.client_dp is not None and self.secagg is not None
                and self.secagg.weighting is Weighting.EXAMPLES):
            yield "secagg.weighting", "client-level DP needs uniform weighting (a client's weight is sensitive too)"
        if (self.client_dp is not None and self.secagg is not None
                and self.client_dp.placement is NoisePlacement.DISTRIBUTED
                and self.client_dp.min_clients < self.secagg.min_clients):
            yield "client_dp.min_clients", "must be >= secagg.min_clients"


def parse_privacy(data: dict, *, source: str | None = None) -> PrivacyConfig:
    """``PrivacyConfig`` from the ``[privacy]`` table of a TOML document (missing table: everything off)."""
    from hyprstream.config import parse

    return parse(PrivacyConfig, data.get("privacy", {}), source=source, key="privacy")


__all__ = ["BUFFERED_CLIENT_DP", "CLIENT_DP_DISTRIBUTED_NEEDS_SECAGG", "CLIENT_DP_NEEDS_CLIP",
           "CLIENT_DP_NEEDS_THE_MEAN", "ClientDpConfig", "DpSgdConfig", "FloorConfig", "PrivacyConfig", "SecAggConfig",
           "Weighting", "parse_privacy"]
