"""Device profiles: what one class of edge device can do, and how the agent may use it.

A profile is a TOML file in ``firmware-configs/`` whose top level says ``kind = "device"``. It is
parsed once, at start-up, into a frozen :class:`DeviceProfile`; the agent (resource policy, trainer,
inference engine, store, telemetry) and the simulator read their numbers from that object, never
from the raw file. Every number carries bounds and the rules that tie fields together are checked
as the file is read, so a bad profile fails with ``<file>: <key.path>: <reason>``.

Layout (``resources``, ``training``, ``store`` and ``simulation`` are required; the other sections
and every key that has a default may be left out)::

    kind = "device"
    name = "Raspberry Pi 4 (4 GB)"
    device_class = "raspberry-pi-4"

    [resources]   # the hardware: cores, clocks, memory, storage, accelerator, battery, power
    [policy]      # thresholds of the adaptive compute strategy full / hybrid / minimal
    [training]    # caps on one local training round and the device's privacy budget
    [inference]   # model variant, execution provider, micro-batching, threads
    [store]       # retention of the local Arrow store
    [telemetry]   # MQTT telemetry cadence, QoS, offline buffer, reconnect backoff
    [simulation]  # speed and network factors the simulator uses for this device class
    [privacy.dpsgd]  # optional: sample-level DP-SGD of local training (see docs/privacy.md)
    [privacy.floor]  # optional: the least privacy the device accepts from its fog (see docs/privacy.md)
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hyprstream.config import Checked, parse, read_toml, setting
from hyprstream.errors import ConfigError
from hyprstream.privacy.config import DpSgdConfig, FloorConfig
from hyprstream.telemetry.records import ExecutionProvider, ModelVariant, Strategy

__all__ = [
    "PROFILE_KIND",
    "Accelerator",
    "DevicePrivacy",
    "DeviceProfile",
    "ExecutionProvider",
    "InferenceSettings",
    "ModelVariant",
    "PolicyThresholds",
    "Resources",
    "SimulationFactors",
    "StoreRetention",
    "Strategy",
    "TelemetrySettings",
    "TrainingCaps",
    "load_profile",
]

PROFILE_KIND = "device"
"""The value of the top-level ``kind`` key of every device profile."""

_DEVICE_CLASS = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


class Accelerator(enum.Enum):
    """The compute accelerator a device has besides its CPU."""

    NONE = "none"
    CUDA = "cuda"


@dataclass(frozen=True)
class Resources(Checked):
    """The device's hardware, as the resource monitor and the fog's selection see it."""

    cpu_cores: int = setting(ge=1, le=256, doc="logical CPUs the OS schedules on")
    cpu_max_mhz: int = setting(ge=100, le=6_000, doc="rated maximum CPU clock, MHz")
    memory_mb: int = setting(ge=64, le=1_048_576, doc="RAM, MB (shared with the GPU on SoCs)")
    storage_mb: int = setting(ge=64, le=16_777_216, doc="storage usable by the agent, MB")
    tdp_watts: float = setting(gt=0, le=1_000, doc="sustained power of the whole device, W")
    accelerator: Accelerator = setting(Accelerator.NONE)
    gpu_memory_mb: int = setting(0, ge=0, le=262_144, doc="memory the GPU may use, MB; 0 without")
    battery: bool = setting(False, doc="runs from a battery (otherwise mains powered)")
    battery_capacity_wh: float = setting(0.0, ge=0, le=10_000, doc="capacity, Wh; 0 without")

    @property
    def has_gpu(self) -> bool:
        return self.accelerator is not Accelerator.NONE

    def check(self) -> Iterator[tuple[str, str]]:
        if self.has_gpu and self.gpu_memory_mb == 0:
            yield "gpu_memory_mb", f"must be above 0 with accelerator {self.accelerator.value!r}"
        if not self.has_gpu and self.gpu_memory_mb != 0:
            yield "gpu_memory_mb", f"must be 0 without an accelerator, got {self.gpu_memory_mb}"
        if self.battery and self.battery_capacity_wh == 0:
            yield "battery_capacity_wh", "must be above 0 when battery = true"
        if not self.battery and self.battery_capacity_wh != 0:
            yield "battery_capacity_wh", (
                f"must be 0 when battery = false, got {self.battery_capacity_wh}"
            )


@dataclass(frozen=True)
class PolicyThresholds(Checked):
    """Thresholds of the adaptive compute strategy (percentages are 0..100).

    ``full`` needs CPU <= ``full_max_cpu_percent``, GPU <= ``full_max_gpu_percent`` and battery >=
    ``min_battery_full_percent``; ``hybrid`` needs CPU <= ``hybrid_max_cpu_percent`` and battery >=
    ``min_battery_train_percent``; both need memory <= ``max_memory_percent`` and SoC temperature <=
    ``max_soc_temp_c``; otherwise the agent runs ``minimal``. To move to a more demanding strategy a
    reading must clear its threshold by ``hysteresis_percent``, and no switch happens within
    ``min_dwell_s`` of the previous one. Battery thresholds are ignored on mains-powered devices.
    """

    full_max_cpu_percent: float = setting(50.0, gt=0, le=100)
    hybrid_max_cpu_percent: float = setting(80.0, gt=0, le=100)
    max_memory_percent: float = setting(85.0, gt=0, le=100)
    min_battery_train_percent: float = setting(30.0, ge=0, le=100)
    min_battery_full_percent: float = setting(60.0, ge=0, le=100)
    max_soc_temp_c: float = setting(80.0, ge=30, le=125)
    full_max_gpu_percent: float = setting(60.0, gt=0, le=100)
    hysteresis_percent: float = setting(5.0, ge=0, lt=50, doc="percentage points")
    min_dwell_s: float = setting(30.0, ge=0, le=3_600)
    initial_strategy: Strategy = setting(
        Strategy.MINIMAL, doc="strategy before the first resource readings arrive"
    )

    def check(self) -> Iterator[tuple[str, str]]:
        cpu_gap = self.hybrid_max_cpu_percent - self.full_max_cpu_percent
        if cpu_gap <= 0:
            yield "hybrid_max_cpu_percent", (
                f"must be above full_max_cpu_percent ({self.full_max_cpu_percent}), "
                f"got {self.hybrid_max_cpu_percent}"
            )
        elif self.hysteresis_percent >= cpu_gap:
            yield "hysteresis_percent", (
                f"must be smaller than the gap between hybrid_max_cpu_percent and "
                f"full_max_cpu_percent ({cpu_gap:g}), got {self.hysteresis_percent}"
            )
        battery_gap = self.min_battery_full_percent - self.min_battery_train_percent
        if battery_gap < 0:
            yield "min_battery_full_percent", (
                f"must be at least min_battery_train_percent ({self.min_battery_train_percent}), "
                f"got {self.min_battery_full_percent}"
            )
        elif battery_gap > 0 and self.hysteresis_percent >= battery_gap:
            yield "hysteresis_percent", (
                f"must be smaller than the gap between min_battery_full_percent and "
                f"min_battery_train_percent ({battery_gap:g}), got {self.hysteresis_percent}"
            )


@dataclass(frozen=True)
class TrainingCaps(Checked):
    """Caps on one local training round, and the device's own differential-privacy budget."""

    privacy_epsilon: float = setting(gt=0, le=100, doc="total (epsilon, delta)-DP budget: epsilon")
    privacy_delta: float = setting(gt=0, lt=1, doc="total (epsilon, delta)-DP budget: delta")
    max_local_steps: int = setting(50, ge=1, le=100_000, doc="optimizer steps per round")
    batch_size_full: int = setting(32, ge=1, le=4_096)
    batch_size_hybrid: int = setting(16, ge=1, le=4_096)
    max_layer_groups_hybrid: int = setting(1, ge=1, le=64)
    allow_gpu: bool = setting(False, doc="train on the GPU (needs resources.accelerator)")
    max_train_s_per_round: float = setting(300.0, gt=0, le=86_400)
    holdout_share: float = setting(0.0, ge=0.0, le=0.5, doc="share of the local examples never trained on, for "
                                   "federated evaluation of each global version (0: none; evaluation requests "
                                   "are then declined)")

    def check(self) -> Iterator[tuple[str, str]]:
        if self.batch_size_hybrid > self.batch_size_full:
            yield "batch_size_hybrid", (
                f"must be at most batch_size_full ({self.batch_size_full}), "
                f"got {self.batch_size_hybrid}"
            )


@dataclass(frozen=True)
class InferenceSettings:
    """How the inference engine runs the model."""

    model_variant: ModelVariant = setting(ModelVariant.FP32)
    execution_provider: ExecutionProvider = setting(ExecutionProvider.AUTO)
    max_batch_size: int = setting(8, ge=1, le=1_024)
    max_batch_wait_ms: float = setting(20.0, ge=0, le=10_000)
    intra_op_threads: int = setting(0, ge=0, le=256, doc="0 lets ONNX Runtime choose")


@dataclass(frozen=True)
class StoreRetention(Checked):
    """Retention of the local Arrow store; the oldest segments go first."""

    max_mb: int = setting(ge=1, le=16_777_216, doc="store size limit, MB")
    max_age_days: int = setting(30, ge=1, le=3_650)
    segment_target_mb: int = setting(64, ge=1, le=4_096)
    encrypt_at_rest: bool = setting(True)

    def check(self) -> Iterator[tuple[str, str]]:
        if self.segment_target_mb > self.max_mb:
            yield "segment_target_mb", (
                f"must be at most max_mb ({self.max_mb}), got {self.segment_target_mb}"
            )


@dataclass(frozen=True)
class TelemetrySettings(Checked):
    """MQTT telemetry of the agent."""

    interval_s: float = setting(10.0, ge=0.5, le=3_600)
    qos: int = setting(1, ge=0, le=2, doc="MQTT QoS of telemetry messages")
    offline_buffer_max_messages: int = setting(10_000, ge=0, le=1_000_000)
    reconnect_backoff_min_s: float = setting(1.0, gt=0, le=3_600)
    reconnect_backoff_max_s: float = setting(120.0, gt=0, le=86_400)

    def check(self) -> Iterator[tuple[str, str]]:
        if self.reconnect_backoff_min_s > self.reconnect_backoff_max_s:
            yield "reconnect_backoff_min_s", (
                f"must be at most reconnect_backoff_max_s ({self.reconnect_backoff_max_s}), "
                f"got {self.reconnect_backoff_min_s}"
            )


@dataclass(frozen=True)
class SimulationFactors:
    """What the simulator needs to stand in for one device of this class.

    ``compute_speed_factor`` is local-training throughput relative to one core of a reference x86-64
    CPU (a ~3 GHz Skylake-class core with AVX2): 1.0 trains as fast, 0.25 takes four times as long.
    Link speeds are to the device's fog node, in Mbit/s.
    """

    compute_speed_factor: float = setting(gt=0, le=100, doc="speed vs one reference x86 core")
    uplink_mbps: float = setting(gt=0, le=100_000)
    downlink_mbps: float = setting(gt=0, le=100_000)
    latency_ms: float = setting(20.0, ge=0, le=60_000, doc="one-way latency to the fog")
    availability: float = setting(1.0, ge=0, le=1, doc="fraction of time online")
    battery_drain_percent_per_s: float = setting(
        0.0, ge=0, le=100, doc="battery percentage points used per training second"
    )
    battery_start_min_percent: float = setting(
        100.0, ge=0, le=100, doc="battery devices start at a seeded level between this and 100 percent"
    )
    battery_charge_percent_per_s: float = setting(
        0.0, ge=0, le=100, doc="net charge (solar panel, charger) in percentage points per simulated second"
    )


@dataclass(frozen=True)
class DevicePrivacy(Checked):
    """The device's ``[privacy]`` table: ``[privacy.dpsgd]`` turns on sample-level DP-SGD (off when absent);
    ``[privacy.floor]`` is the least privacy the device accepts from its fog (absent: anything)."""

    dpsgd: DpSgdConfig | None = setting(None)
    floor: FloorConfig = setting(FloorConfig())

    def ledger_dir(self, store_dir: str | Path) -> Path:
        """The device's privacy ledger: ``dpsgd.ledger_dir`` (relative to the store directory's parent),
        by default ``<store-dir>.privacy`` beside the data store."""
        store_dir = Path(store_dir)
        if self.dpsgd is not None and self.dpsgd.ledger_dir:
            return store_dir.parent / self.dpsgd.ledger_dir
        return store_dir.with_name(store_dir.name + ".privacy")

    def check(self) -> Iterator[tuple[str, str]]:
        if self.dpsgd is not None and not self.dpsgd.secure:
            yield "dpsgd.secure", "must be true on a device (seeded noise is for simulations only)"


@dataclass(frozen=True)
class DeviceProfile(Checked):
    """One device class: its hardware and how the agent may use it (see :func:`load_profile`)."""

    name: str = setting()
    device_class: str = setting(doc="lower-case slug, e.g. raspberry-pi-4")
    resources: Resources = setting()
    training: TrainingCaps = setting()
    store: StoreRetention = setting()
    simulation: SimulationFactors = setting()
    description: str = setting("")
    policy: PolicyThresholds = setting(PolicyThresholds())
    inference: InferenceSettings = setting(InferenceSettings())
    telemetry: TelemetrySettings = setting(TelemetrySettings())
    privacy: DevicePrivacy = setting(DevicePrivacy())

    def dpsgd(self):
        """The device's :class:`~hyprstream.privacy.dpsgd.DpSgd` settings (the budget defaults to
        ``[training]`` ``privacy_epsilon`` / ``privacy_delta``), or None without ``[privacy.dpsgd]``."""
        cfg = self.privacy.dpsgd
        if cfg is None:
            return None
        return cfg.settings(self.training.privacy_epsilon, self.training.privacy_delta)

    def check(self) -> Iterator[tuple[str, str]]:
        res = self.resources
        if not self.name.strip():
            yield "name", "must not be empty"
        if not _DEVICE_CLASS.fullmatch(self.device_class):
            yield "device_class", (
                f"must be a lower-case slug such as 'raspberry-pi-4', got {self.device_class!r}"
            )
        if self.training.allow_gpu and not res.has_gpu:
            yield "training.allow_gpu", "needs a GPU, but resources.accelerator is 'none'"
        if self.inference.execution_provider is ExecutionProvider.CUDA and not res.has_gpu:
            yield "inference.execution_provider", (
                "'cuda' needs a GPU, but resources.accelerator is 'none'"
            )
        if self.inference.intra_op_threads > res.cpu_cores:
            yield "inference.intra_op_threads", (
                f"must be at most resources.cpu_cores ({res.cpu_cores}), "
                f"got {self.inference.intra_op_threads}"
            )
        if self.store.max_mb > res.storage_mb:
            yield "store.max_mb", (
                f"must be at most resources.storage_mb ({res.storage_mb}), got {self.store.max_mb}"
            )
        drain = self.simulation.battery_drain_percent_per_s
        if res.battery and drain == 0:
            yield "simulation.battery_drain_percent_per_s", (
                "must be above 0 when resources.battery = true"
            )
        if not res.battery and drain != 0:
            yield "simulation.battery_drain_percent_per_s", (
                f"must be 0 when resources.battery = false, got {drain}"
            )
        charge = self.simulation.battery_charge_percent_per_s
        if not res.battery and charge != 0:
            yield "simulation.battery_charge_percent_per_s", (
                f"must be 0 when resources.battery = false, got {charge}"
            )


def load_profile(path: str | Path) -> DeviceProfile:
    """Read and validate the device profile at ``path``.

    Raises :class:`~hyprstream.errors.ConfigError` naming the file, the key path and the reason,
    also when the file's top-level ``kind`` is missing or is not ``"device"``.
    """
    source = str(path)
    data = read_toml(path)
    if "kind" not in data:
        raise ConfigError(
            f'required key is missing (a device profile starts with kind = "{PROFILE_KIND}")',
            source=source,
            key="kind",
        )
    if data["kind"] != PROFILE_KIND:
        raise ConfigError(
            f"must be {PROFILE_KIND!r} for a device profile, got {data['kind']!r}",
            source=source,
            key="kind",
        )
    return parse(DeviceProfile, {k: v for k, v in data.items() if k != "kind"}, source=source)
