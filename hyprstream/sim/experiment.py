"""Experiment definitions (TOML files with ``kind = "experiment"``), parsed once into frozen objects."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from hyprstream.config import Checked, load, read_toml, setting
from hyprstream.consistency import ConsistencyPolicy
from hyprstream.errors import ConfigError
from hyprstream.fog.selection import SelectionRules, SelectionWeights
from hyprstream.privacy.config import PrivacyConfig


class PartitionScheme(enum.Enum):
    IID = "iid"
    DIRICHLET = "dirichlet"  # label skew: each class split across devices by Dirichlet(alpha)
    NATURAL = "natural"  # one source of the data set per device (sensor: one mote per device)
    SAMPLED = "sampled"  # each device draws its share from passes over the data: fleets larger than the data set


class Engine(enum.Enum):
    FLOWER = "flower"  # every device the agent's real ClientApp, on Flower's simulation runtime
    BATCHED = "batched"  # the devices' local training in one vmapped pass (hyprstream.sim.batched)


class UpdateEncoding(enum.Enum):
    FP32 = "fp32"  # deltas as float32
    INT8 = "int8"  # per-tensor symmetric int8 with a float32 scale, stochastic rounding (hyprstream.codec)


class TrainingMode(enum.Enum):
    SYNC = "sync"  # global steps: every fog runs one round per step, the step waits for the slowest fog
    BUFFERED = "buffered"  # FedBuff: each fog pushes every buffer_k updates (hyprstream.sim.buffered)


@dataclass(frozen=True)
class TaskSection:
    name: str = setting("digits", doc="task plugin name (hyprstream.learning.task.get_task)")


@dataclass(frozen=True)
class PartitionSection(Checked):
    scheme: PartitionScheme = setting(PartitionScheme.DIRICHLET)
    alpha: float = setting(0.5, gt=0.0, le=1000.0, doc="Dirichlet concentration: smaller is more skewed")
    min_samples: int = setting(10, ge=1, doc="every device gets at least this many samples")
    max_samples: int = setting(0, ge=0, doc="sampled: each device draws between min_samples and max_samples "
                               "(uniformly; 0: exactly min_samples)")

    def check(self):
        if self.max_samples and self.max_samples < self.min_samples:
            yield "max_samples", f"{self.max_samples} is below min_samples ({self.min_samples})"


@dataclass(frozen=True)
class FleetSection(Checked):
    fogs: int = setting(2, ge=1, le=1000)
    agents_per_fog: int = setting(5, ge=1, le=10000)
    # device profiles (firmware-configs/<name>.toml) and the share of agents that has each
    profiles: Mapping[str, float] = setting(MappingProxyType({"x86-gateway": 1.0}))
    # telemetry-driven selection, as a deployed fog's [fleet] (hyprstream.sim.fleet.SimulatedFleetView)
    clients_per_round: int = setting(0, ge=0, doc="agents each fog chooses per step by the selection rules on the "
                                     "simulated telemetry; 0: every online agent not in minimal")
    min_battery_percent: float = setting(20.0, ge=0.0, le=100.0, doc="with clients_per_round: a device on battery "
                                         "below this is not chosen")
    fairness_window: int = setting(10, ge=1, doc="steps over which participation is counted")
    weights: SelectionWeights = field(default_factory=SelectionWeights)
    # device availability from a trace of online intervals (hyprstream.sim.traces) instead of the profiles'
    availability_trace: str = setting("", doc="a Parquet, Arrow or CSV file of (device, start_s, "
                                      "end_s) online intervals on the simulated clock; empty: each profile's "
                                      "availability, drawn per step")
    availability_period_s: float = setting(0.0, ge=0.0, doc="the trace repeats with this period; 0: its latest "
                                           "end_s")

    def rules(self) -> SelectionRules:
        return SelectionRules(self.weights, min_battery_percent=self.min_battery_percent)

    def check(self):
        if self.clients_per_round > self.agents_per_fog:
            yield "clients_per_round", f"{self.clients_per_round} is larger than agents_per_fog ({self.agents_per_fog})"
        if not self.profiles:
            yield "profiles", "name at least one device profile"
        for name, share in self.profiles.items():
            if not share >= 0:
                yield f"profiles.{name}", f"share must be >= 0, got {share}"
        if sum(self.profiles.values()) <= 0:
            yield "profiles", "shares must sum to more than 0"


@dataclass(frozen=True)
class NetworkSection:
    """The fog-to-core link (agent-to-fog links come from each device profile)."""

    fog_core_mbps: float = setting(1000.0, gt=0.0)
    fog_core_latency_ms: float = setting(10.0, ge=0.0)


@dataclass(frozen=True)
class TrainingSection:
    global_steps: int = setting(5, ge=1, le=100000)
    layers: tuple[str, ...] = setting((), doc="layer groups trained each step; empty: all")
    local_steps: int = setting(40, ge=1, le=100000)
    batch_size: int = setting(32, ge=1, le=65536)
    lr: float = setting(0.005, gt=0.0, lt=10.0)
    min_replies: int = setting(1, ge=1, doc="a fog pushes only with at least this many usable updates")
    update_encoding: UpdateEncoding = setting(UpdateEncoding.FP32, doc="how agents encode their deltas")
    aggregation: str = setting("mean", doc="the fogs' rule: mean (FedAvg), trimmed_mean or median (robust, "
                               "coordinate-wise), or an installed rule (as the fog's rounds.aggregation)")
    trim_fraction: float = setting(0.1, ge=0.0, lt=0.5, doc="trimmed_mean: share dropped at each end")
    mode: TrainingMode = setting(TrainingMode.SYNC, doc="sync rounds, or buffered asynchronous ([buffered])")


@dataclass(frozen=True)
class BufferedSection:
    """FedBuff settings of ``training.mode = "buffered"`` (hyprstream.fog.buffered.BufferedFog)."""

    buffer_k: int = setting(3, ge=1, doc="a fog pushes every buffer_k usable updates")
    max_staleness: int = setting(8, ge=0, doc="updates from more versions ago are refused")
    concurrency: int | None = setting(None, ge=1, doc="agents training at once per fog; default: all")
    sim_seconds: float | None = setting(None, gt=0.0, doc="stop at this simulated time; default: after as many "
                                        "agent updates as the sync mode's global steps ask for")


@dataclass(frozen=True)
class PretrainSection:
    """The shared model's start (hyprstream.sim.pretrain): trained centrally on a public slice no device holds."""

    public_samples: int = setting(0, ge=0, doc="samples set aside as public data; 0: start from the seeded "
                                  "random initialisation")
    steps: int = setting(500, ge=1, le=1000000, doc="minibatch steps of central training on the public slice")
    batch_size: int = setting(64, ge=1, le=65536)
    lr: float = setting(0.002, gt=0.0, lt=10.0)


@dataclass(frozen=True)
class CoreSection:
    consistency: ConsistencyPolicy = setting(ConsistencyPolicy())
    max_update_norm: float | None = setting(None, gt=0.0)


@dataclass(frozen=True)
class RuntimeSection(Checked):
    client_cpus: float = setting(1.0, gt=0.0, le=64.0, doc="Ray CPUs per simulated agent")
    torch_threads: int = setting(1, ge=1, le=64)
    round_timeout_s: float = setting(300.0, gt=0.0)
    ray_address: str = setting("", doc="host:port of an existing Ray cluster's head to run the simulated agents on "
                               "(RAY_ADDRESS too); empty: a Ray instance of this process on this host")
    engine: Engine = setting(Engine.FLOWER, doc="flower: every device runs the agent's ClientApp on Flower's "
                             "simulation runtime; batched: the devices' local training in one vmapped pass, "
                             "everything above them as in a deployment (docs/simulation.md)")
    device: str = setting("auto", doc="batched engine: the torch device of the training pass (cpu, cuda, "
                          "cuda:N; auto: cuda when torch sees one, else cpu)")
    batch_devices: int = setting(0, ge=0, le=10_000_000, doc="batched engine: devices per vmapped pass (0: 4,096 "
                                 "on the CPU, where smaller passes stay in cache; 100,000 on a GPU)")

    def check(self):
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            yield "device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}"


@dataclass(frozen=True)
class Experiment(Checked):
    name: str
    description: str = ""
    seed: int = setting(0, ge=0)
    task: TaskSection = field(default_factory=TaskSection)
    partition: PartitionSection = field(default_factory=PartitionSection)
    fleet: FleetSection = field(default_factory=FleetSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    core: CoreSection = field(default_factory=CoreSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    buffered: BufferedSection = field(default_factory=BufferedSection)  # used when training.mode = "buffered"
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # [privacy.secagg|client_dp|dpsgd]

    @property
    def num_agents(self) -> int:
        return self.fleet.fogs * self.fleet.agents_per_fog

    def cells(self):
        """The feature combinations (:mod:`hyprstream.fog.composition`) this experiment asks for: for agents
        in the ``full`` strategy (a simulated device's strategy follows its battery, at run time) and every
        agent asked unless ``fleet.clients_per_round`` chooses; one cell per DP mechanism configured."""
        from hyprstream.codec import Encoding
        from hyprstream.fog.composition import Aggregate, Cell, Participants, dp_values
        from hyprstream.fog.config import RoundMode

        aggregation = Aggregate.SECAGG if self.privacy.secagg is not None else \
            Aggregate.MEAN if self.training.aggregation == "mean" else Aggregate.ROBUST
        encoding = Encoding(self.training.update_encoding.value)
        participants = Participants.SELECTED if self.fleet.clients_per_round else Participants.ALL
        return tuple(Cell(RoundMode(self.training.mode.value), aggregation, dp, participants, encoding=encoding)
                     for dp in dp_values(self.privacy, devices=True))

    def check(self):
        from hyprstream.errors import ValidationError
        from hyprstream.fog.aggregate import resolve_rule
        from hyprstream.fog.composition import ROBUST_WITH_SECAGG, Where, refusals
        from hyprstream.learning.task import task_names

        if self.task.name not in task_names():
            yield "task.name", f"unknown task {self.task.name!r} (known: {', '.join(task_names())})"
        try:
            resolve_rule(self.training.aggregation)
        except ValidationError as exc:
            yield "training.aggregation", str(exc)
            return
        if self.training.aggregation != "mean" and self.privacy.secagg is not None:
            yield "training.aggregation", ROBUST_WITH_SECAGG
            return
        yield from refusals(self.cells(), Where.SIM)
        secagg, chosen = self.privacy.secagg, self.fleet.clients_per_round
        if secagg is not None and 0 < chosen < secagg.min_clients:
            yield "fleet.clients_per_round", f"is below privacy.secagg.min_clients ({secagg.min_clients})"
        if self.training.min_replies > self.fleet.agents_per_fog:
            yield "training.min_replies", "is larger than fleet.agents_per_fog"
        if self.training.mode is TrainingMode.BUFFERED:
            yield from self._check_buffered()
        if self.fleet.availability_trace:
            yield from self._check_trace()
        if self.runtime.engine is Engine.BATCHED:
            yield from self._check_batched()
        elif self.partition.scheme is PartitionScheme.SAMPLED and self.num_agents > 10_000:
            yield "partition.scheme", (f"{self.num_agents} agents are more than the flower engine runs (one "
                                       "store and one ClientApp each): use [runtime] engine = \"batched\"")
        from hyprstream.sim.fleet import resolve_profile

        for name in self.fleet.profiles:
            try:
                resolve_profile(name)
            except ConfigError as exc:
                yield f"fleet.profiles.{name}", exc.reason

    def _check_batched(self):
        """What the batched engine does not run (yet): it is refused by name, never run as something else."""
        why = "the batched engine does not run it: use [runtime] engine = \"flower\""
        if self.training.mode is TrainingMode.BUFFERED:
            yield "training.mode", f"buffered: {why}"
        if self.runtime.ray_address:
            yield "runtime.ray_address", "the batched engine runs in this process, on its own device"

    def _check_trace(self):
        from hyprstream.sim.traces import AvailabilityTrace

        try:
            AvailabilityTrace.load(self.fleet.availability_trace, self.num_agents,
                                   period_s=self.fleet.availability_period_s)
        except ConfigError as exc:
            yield "fleet.availability_trace", f"{exc.source}: {exc.reason}"

    def _check_buffered(self):
        from hyprstream.privacy.client_dp import NoisePlacement

        for key in ("buffer_k", "concurrency"):
            value = getattr(self.buffered, key)
            if value is not None and value > self.fleet.agents_per_fog:
                yield f"buffered.{key}", f"{value} is larger than fleet.agents_per_fog ({self.fleet.agents_per_fog})"
        dp = self.privacy.client_dp
        if dp is not None and NoisePlacement(dp.placement) is NoisePlacement.DISTRIBUTED \
                and dp.min_clients > self.buffered.buffer_k:
            yield "buffered.buffer_k", (f"{self.buffered.buffer_k} is below privacy.client_dp.min_clients "
                                        f"({dp.min_clients}): a cohort could never carry the distributed noise")


def reduced(exp: Experiment) -> Experiment:
    """The same experiment at smoke-test size (CI): few steps, few agents and at most 10 fogs, short local training."""
    from dataclasses import replace

    # a natural partition has one device per data source: its fleet size is fixed
    natural = exp.partition.scheme is PartitionScheme.NATURAL
    agents = exp.fleet.agents_per_fog if natural else min(exp.fleet.agents_per_fog, 3)
    fogs = exp.fleet.fogs if natural else min(exp.fleet.fogs, 10)
    steps, local = min(exp.training.global_steps, 2), min(exp.training.local_steps, 10)
    note = (f"Reduced run (`--quick`): {fogs} fog(s) x {agents} agent(s), {steps} global step(s) of "
            f"{local} local step(s); the description above is of the full experiment "
            f"({exp.fleet.fogs} x {exp.fleet.agents_per_fog}, {exp.training.global_steps} x "
            f"{exp.training.local_steps}).")
    return replace(
        exp,
        description=f"{exp.description.rstrip()}\n\n{note}" if exp.description.strip() else note,
        fleet=replace(exp.fleet, fogs=fogs, agents_per_fog=agents,
                      clients_per_round=min(exp.fleet.clients_per_round, agents)),
        training=replace(exp.training, global_steps=steps, local_steps=local,
                         min_replies=min(exp.training.min_replies, agents)),
        pretrain=replace(exp.pretrain, steps=min(exp.pretrain.steps, 20)),
        buffered=replace(exp.buffered, buffer_k=min(exp.buffered.buffer_k, agents),
                         concurrency=min(exp.buffered.concurrency or agents, agents), sim_seconds=None),
    )


def load_experiment(path: str | Path) -> Experiment:
    data = read_toml(path)
    if data.get("kind") != "experiment":
        raise ConfigError(f"expected kind = \"experiment\", got {data.get('kind')!r}", source=str(path), key="kind")
    return load(Experiment, path, ignore=("kind",))
