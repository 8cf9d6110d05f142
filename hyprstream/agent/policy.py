"""Adaptive compute policy: which strategy (``full``/``hybrid``/``minimal``) the readings allow.

Pure logic, no I/O: :class:`AdaptivePolicy` is a state machine driven by
:class:`~hyprstream.agent.monitor.ResourceSample` values (live or replayed from a trace) that returns
one :class:`Decision` per sample. :func:`plan_training` and :func:`plan_inference` turn a strategy
into what the trainer and the inference engine do.

The rule (thresholds from the device profile's ``[policy]`` section, see
:class:`~hyprstream.agent.profile.PolicyThresholds`):

* ``full`` needs CPU <= ``full_max_cpu_percent``, GPU <= ``full_max_gpu_percent`` (when a GPU is
  read) and battery >= ``min_battery_full_percent``;
* ``hybrid`` needs CPU <= ``hybrid_max_cpu_percent`` and battery >= ``min_battery_train_percent``;
* both need memory <= ``max_memory_percent`` and SoC temperature <= ``max_soc_temp_c``;
* otherwise ``minimal``.

Hysteresis: moving to a *more* demanding strategy needs every reading to clear its threshold by
``hysteresis_percent`` (percentage points; degrees Celsius for the temperature), while staying needs
only the plain threshold. Dwell: no switch happens within ``min_dwell_s`` of the previous switch (the
first switch after start-up is free). Together they stop a reading that hovers around a threshold
from flapping the strategy. Battery thresholds apply only to battery devices running on battery
(not on mains-powered devices, and not while the charger is plugged in); readings a device lacks
(temperature, GPU) impose nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from hyprstream.agent.monitor import ResourceSample
from hyprstream.agent.profile import (
    ExecutionProvider,
    InferenceSettings,
    ModelVariant,
    PolicyThresholds,
    Strategy,
    TrainingCaps,
)

__all__ = [
    "BUDGET_DECLINE",
    "AdaptivePolicy",
    "Decision",
    "InferencePlan",
    "TrainPlan",
    "allowed_strategy",
    "plan_inference",
    "plan_training",
    "rank",
    "within_budget",
]

_RANK = {Strategy.MINIMAL: 0, Strategy.HYBRID: 1, Strategy.FULL: 2}


def rank(strategy: Strategy) -> int:
    """0 for ``minimal``, 1 for ``hybrid``, 2 for ``full``."""
    return _RANK[strategy]


@dataclass(frozen=True)
class Decision:
    """The policy's answer to one sample.

    ``strategy`` is in force after this sample; ``target`` is what the readings asked for (it
    differs from ``strategy`` only while ``held`` by the dwell time); ``reason`` says why in words.
    """

    time: float
    strategy: Strategy
    previous: Strategy
    target: Strategy
    reason: str
    held: bool = False

    @property
    def changed(self) -> bool:
        return self.strategy is not self.previous


def _battery_applies(sample: ResourceSample, battery_powered: bool) -> bool:
    return battery_powered and sample.battery_percent is not None and sample.on_ac_power is not True


def allowed_strategy(sample: ResourceSample, limits: PolicyThresholds, *, battery_powered: bool,
                     margin: float = 0.0) -> tuple[Strategy, tuple[str, ...]]:
    """The most demanding strategy ``sample`` allows with every threshold tightened by ``margin``,
    and the readings that rule out the more demanding ones (empty for ``full``)."""
    m = margin
    common: list[str] = []
    if sample.memory_percent > limits.max_memory_percent - m:
        common.append(f"memory {sample.memory_percent:.1f}% > {limits.max_memory_percent - m:g}%")
    if sample.soc_temp_c is not None and sample.soc_temp_c > limits.max_soc_temp_c - m:
        common.append(f"SoC {sample.soc_temp_c:.1f} C > {limits.max_soc_temp_c - m:g} C")
    battery = _battery_applies(sample, battery_powered)
    hybrid = list(common)
    if sample.cpu_percent > limits.hybrid_max_cpu_percent - m:
        hybrid.append(f"CPU {sample.cpu_percent:.1f}% > {limits.hybrid_max_cpu_percent - m:g}%")
    if battery and sample.battery_percent < limits.min_battery_train_percent + m:
        hybrid.append(f"battery {sample.battery_percent:.1f}% < {limits.min_battery_train_percent + m:g}%")
    if hybrid:
        return Strategy.MINIMAL, tuple(hybrid)
    full: list[str] = []
    if sample.cpu_percent > limits.full_max_cpu_percent - m:
        full.append(f"CPU {sample.cpu_percent:.1f}% > {limits.full_max_cpu_percent - m:g}%")
    if sample.gpu is not None and sample.gpu.util_percent > limits.full_max_gpu_percent - m:
        full.append(f"GPU {sample.gpu.util_percent:.1f}% > {limits.full_max_gpu_percent - m:g}%")
    if battery and sample.battery_percent < limits.min_battery_full_percent + m:
        full.append(f"battery {sample.battery_percent:.1f}% < {limits.min_battery_full_percent + m:g}%")
    if full:
        return Strategy.HYBRID, tuple(full)
    return Strategy.FULL, ()


class AdaptivePolicy:
    """The strategy state machine with hysteresis and dwell; feed it samples in time order."""

    def __init__(self, limits: PolicyThresholds, *, battery_powered: bool,
                 initial: Strategy | None = None) -> None:
        self.limits = limits
        self.battery_powered = battery_powered
        self.strategy = initial if initial is not None else limits.initial_strategy
        self.since: float | None = None  # time of the last switch; None: none yet
        self.last: Decision | None = None

    def observe(self, sample: ResourceSample) -> Decision:
        current = self.strategy
        plain, why_plain = allowed_strategy(sample, self.limits, battery_powered=self.battery_powered)
        if rank(plain) < rank(current):
            target, reason = plain, "; ".join(why_plain)
        else:
            strict, why_strict = allowed_strategy(sample, self.limits, battery_powered=self.battery_powered,
                                                  margin=self.limits.hysteresis_percent)
            if rank(strict) > rank(current):
                target = strict
                reason = f"readings clear the {strict.value} thresholds by {self.limits.hysteresis_percent:g}"
            else:
                target = current
                reason = "; ".join(why_strict) if why_strict else "within thresholds"
                if current is not Strategy.FULL and rank(plain) > rank(current):
                    reason = f"within hysteresis: {reason}"
        held = False
        strategy = current
        if target is not current:
            if self.since is not None and sample.time - self.since < self.limits.min_dwell_s:
                held = True
                reason = (f"{reason} (switch to {target.value} held: "
                          f"{sample.time - self.since:.0f} s of {self.limits.min_dwell_s:g} s dwell)")
            else:
                strategy = target
                self.strategy = target
                self.since = sample.time
        decision = Decision(sample.time, strategy, current, target, reason or "within thresholds", held)
        self.last = decision
        return decision


@dataclass(frozen=True)
class TrainPlan:
    """What one local training round may do under the current strategy."""

    accept: bool
    reason: str
    layers: tuple[str, ...] = ()
    local_steps: int = 0
    batch_size: int = 0
    device: str = "cpu"
    max_seconds: float = 0.0


def plan_training(strategy: Strategy, caps: TrainingCaps, *, layers: tuple[str, ...], local_steps: int,
                  batch_size: int, gpu_usable: bool, privacy_left: float | None = None) -> TrainPlan:
    """How a train request for ``layers`` x ``local_steps`` at ``batch_size`` is served.

    ``minimal`` declines (the fog retries the device later). ``hybrid`` trains on the CPU only the
    last ``caps.max_layer_groups_hybrid`` of the requested layer groups (the request lists them in
    model order, so these are the ones nearest the output) with ``caps.batch_size_hybrid``.
    ``full`` trains every requested layer group with ``caps.batch_size_full``, on the GPU when
    ``caps.allow_gpu`` and ``gpu_usable``. Steps are capped at ``caps.max_local_steps`` and time at
    ``caps.max_train_s_per_round``. ``privacy_left`` <= 0 (budget spent) declines in any strategy.
    """
    if not layers:
        return TrainPlan(False, "the request names no layer groups")
    if privacy_left is not None and privacy_left <= 0:
        return TrainPlan(False, "privacy budget spent")
    if strategy is Strategy.MINIMAL:
        return TrainPlan(False, "strategy minimal: inference only, training deferred")
    steps = max(1, min(local_steps, caps.max_local_steps))
    if strategy is Strategy.HYBRID:
        keep = tuple(layers[-caps.max_layer_groups_hybrid:])
        return TrainPlan(True, f"strategy hybrid: {len(keep)} of {len(layers)} layer group(s) on the CPU",
                         keep, steps, max(1, min(batch_size, caps.batch_size_hybrid)), "cpu",
                         caps.max_train_s_per_round)
    device = "cuda" if caps.allow_gpu and gpu_usable else "cpu"
    return TrainPlan(True, f"strategy full: every requested layer group on {device}", tuple(layers), steps,
                     max(1, min(batch_size, caps.batch_size_full)), device, caps.max_train_s_per_round)


def within_budget(plan: TrainPlan, *, spent: float, would_be: float, budget: float) -> TrainPlan:
    """``plan`` when the device's sample-level epsilon after it (``would_be``, from its ledger's history
    plus the round's DP-SGD event) stays within ``budget``; otherwise a decline that says so
    (:data:`BUDGET_DECLINE`, without the epsilons). A plan already declined is returned unchanged."""
    if not plan.accept or would_be <= budget:
        return plan
    return TrainPlan(False, BUDGET_DECLINE)


BUDGET_DECLINE = "privacy budget: this round would take the device's epsilon over its budget"
"""The reason a device gives its fog for a round its budget cannot pay for: no epsilon in it, since an
epsilon is a function of the device's data size (its sampling rate), which the fog is not told."""


@dataclass(frozen=True)
class InferencePlan:
    """Execution provider and numeric format of the inference model under a strategy."""

    provider: ExecutionProvider  # CPU or CUDA, never AUTO
    variant: ModelVariant
    offload: bool = False  # send rows to the fog's inference endpoint (the local model is the fallback)


def plan_inference(strategy: Strategy, settings: InferenceSettings, *, cuda_usable: bool,
                   offload: bool = False) -> InferencePlan:
    """``full``: the profile's provider (CUDA when ``auto``/``cuda`` and usable) and variant;
    ``hybrid``: the CPU and the profile's variant (fp32 unless the profile picks int8);
    ``minimal``: the CPU and int8, and with a fog offload endpoint (``offload``) inference goes there."""
    if strategy is Strategy.MINIMAL:
        return InferencePlan(ExecutionProvider.CPU, ModelVariant.INT8, offload=offload)
    if strategy is Strategy.HYBRID:
        return InferencePlan(ExecutionProvider.CPU, settings.model_variant)
    wants_cuda = settings.execution_provider in (ExecutionProvider.AUTO, ExecutionProvider.CUDA)
    provider = ExecutionProvider.CUDA if wants_cuda and cuda_usable else ExecutionProvider.CPU
    return InferencePlan(provider, settings.model_variant)
