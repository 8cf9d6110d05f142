"""The simulated fleet: which device profile each agent has, which agents are online each round, and
what each one's adaptive strategy lets it do.

Each simulated device runs the agent's own strategy state machine
(:class:`~hyprstream.agent.policy.AdaptivePolicy`, with its profile's thresholds, hysteresis and dwell)
on simulated readings at the simulated time of each step it is online. The simulator models the
battery (a device with ``resources.battery`` starts at a seeded level between its profile's
``battery_start_min_percent`` and 100, drains ``battery_drain_percent_per_s`` for every simulated
second it works in a round and charges ``battery_charge_percent_per_s`` for every simulated second
that passes); CPU, memory and temperature read as an idle device's, so a mains-powered device trains
in ``full``. A device in ``minimal`` is not asked to train; one in ``hybrid`` trains the last
``max_layer_groups_hybrid`` of the layer groups it is asked for (the experiment's local steps and
batch size apply in every strategy).

With ``fleet.clients_per_round`` above 0 each fog chooses its agents as a deployed fog does, by
:class:`~hyprstream.fog.selection.RoundSelector` over a fleet view; :class:`SimulatedFleetView` is that
view, the telemetry each device would send at the start of a step: its state (online or offline), its
strategy, and its battery, on the simulated clock (every record fresh). An idle device's CPU and memory
read 0 %, as above; the record does not carry the DP-SGD budget (a device whose budget is spent declines
the request itself).

The buffered mode has no steps: a device's state is brought to the simulated instant its fog offers it a
job (:meth:`VirtualFleet.observe_at`: online by the trace, else a draw with its availability fixed per
device and instant; the battery charged for the time passed and drained for the jobs it finished,
:meth:`VirtualFleet.worked`; its policy observing that battery when it is online).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hyprstream.agent.monitor import ResourceSample
from hyprstream.agent.policy import AdaptivePolicy
from hyprstream.agent.profile import DeviceProfile, Strategy, load_profile
from hyprstream.errors import ConfigError
from hyprstream.fog.aggregator import FogRound
from hyprstream.fog.fleet import DeviceView
from hyprstream.telemetry.records import (DeviceState, ExecutionProvider, ModelState, ModelVariant, PrivacyState,
                                          StrategyState, Telemetry)
from hyprstream.sim import clock
from hyprstream.sim.clock import Link
from hyprstream.sim.traces import AvailabilityTrace

PROFILE_DIR = "firmware-configs"


def resolve_profile(name: str) -> Path:
    """``firmware-configs/<name>.toml`` under the working directory or the source tree, or a path."""
    candidates = [Path(name)] if name.endswith(".toml") else []
    candidates += [Path(PROFILE_DIR) / f"{name}.toml",
                   Path(__file__).resolve().parents[2] / PROFILE_DIR / f"{name}.toml"]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"device profile {name!r} not found (looked for {', '.join(map(str, candidates))})")


def load_profiles(names: list[str]) -> dict[str, DeviceProfile]:
    return {name: load_profile(resolve_profile(name)) for name in names}


def assign_profiles(n: int, proportions: Mapping[str, float], rng: np.random.Generator) -> list[str]:
    """``n`` profile names in the given proportions (largest remainder), in a seeded random order."""
    names = sorted(proportions)
    weights = np.array([proportions[k] for k in names], dtype=np.float64)
    if n < 0 or not len(names) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError("need n >= 0 and non-negative proportions with a positive sum")
    exact = weights / weights.sum() * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    out = [name for name, c in zip(names, counts, strict=True) for _ in range(c)]
    return [out[i] for i in rng.permutation(n)]


def online(availability: np.ndarray, seed: int, step: int) -> np.ndarray:
    """Which devices are online in ``step``: independent draws with each device's availability."""
    rng = np.random.default_rng([seed, step, 0x5EED])
    return rng.random(len(availability)) < availability


@dataclass(frozen=True)
class StepPlan:
    """The fleet at the start of one step: who is online, each device's strategy, battery levels (percent;
    NaN for mains-powered devices)."""

    step: int
    online: np.ndarray
    strategies: tuple[Strategy, ...]
    battery: np.ndarray

    def trains(self, device: int) -> bool:
        """Whether ``device`` is asked to train this step: online and not in ``minimal``."""
        return bool(self.online[device]) and self.strategies[device] is not Strategy.MINIMAL


class VirtualFleet:
    """Device profiles of the simulated agents (by device index), their strategies and batteries, and the
    virtual time of their rounds."""

    def __init__(self, profiles: list[DeviceProfile], *, seed: int, local_samples: int,
                 fog_core: Link, names: list[str] | None = None, trace: AvailabilityTrace | None = None) -> None:
        if trace is not None and trace.devices != len(profiles):
            raise ValueError(f"the availability trace covers {trace.devices} devices, the fleet has {len(profiles)}")
        self.profiles = profiles
        self.trace = trace  # availability from a trace (hyprstream.sim.traces); None: the profiles' availability
        self.names = names if names is not None else [p.device_class for p in profiles]
        self.seed = seed
        self.local_samples = local_samples
        self.fog_core = fog_core
        self.availability = np.array([p.simulation.availability for p in profiles])
        self._policies = [AdaptivePolicy(p.policy, battery_powered=p.resources.battery) for p in profiles]
        rng = np.random.default_rng([seed, 0xBA77])
        self.battery = np.array([rng.uniform(p.simulation.battery_start_min_percent, 100.0)
                                 if p.resources.battery else np.nan for p in profiles])
        self._drain = np.array([p.simulation.battery_drain_percent_per_s for p in profiles])
        self._charge = np.array([p.simulation.battery_charge_percent_per_s for p in profiles])
        self._told: dict[int, Strategy] = {}  # the strategy file each device was last given
        # the buffered mode's continuous clock: when each battery level was last brought up to date, the
        # jobs (start, seconds) each device took since, and whether it was online when last offered a job
        self._battery_s = np.zeros(len(profiles))
        self._work: list[list[tuple[float, float]]] = [[] for _ in profiles]
        self._up = np.ones(len(profiles), dtype=bool)

    @classmethod
    def build(cls, exp) -> VirtualFleet:
        by_name = load_profiles(sorted(exp.fleet.profiles))
        names = assign_profiles(exp.num_agents, exp.fleet.profiles, np.random.default_rng([exp.seed, 0xF1EE7]))
        link = Link(exp.network.fog_core_mbps, exp.network.fog_core_mbps, exp.network.fog_core_latency_ms)
        trace = None
        if exp.fleet.availability_trace:
            # a reduced run (--quick) of a larger fleet keeps the trace of its first devices
            trace = AvailabilityTrace.load(exp.fleet.availability_trace, exp.num_agents,
                                           period_s=exp.fleet.availability_period_s, first=True)
        return cls([by_name[n] for n in names], seed=exp.seed,
                   local_samples=exp.training.local_steps * exp.training.batch_size, fog_core=link, names=names,
                   trace=trace)

    def online(self, step: int, sim_s: float = 0.0) -> np.ndarray:
        """Which devices are online in ``step``, starting at simulated time ``sim_s``: by the trace when the
        fleet has one, else independent draws with each profile's availability."""
        if self.trace is not None:
            return self.trace.online(sim_s)
        return online(self.availability, self.seed, step)

    def plan_step(self, step: int, sim_s: float) -> StepPlan:
        """Which devices are online in ``step`` and their strategies: each online device's policy observes
        its readings at simulated time ``sim_s`` (an offline device observes nothing and keeps its state)."""
        up = self.online(step, sim_s)
        for i in np.flatnonzero(up):
            self._observe(int(i), sim_s)
        return StepPlan(step, up, tuple(p.strategy for p in self._policies), self.battery.copy())

    def finish_step(self, busy_s: Mapping[int, float], step_s: float) -> None:
        """Drain each device's battery for its ``busy_s`` (device -> simulated seconds it worked), then
        charge every battery for the step's ``step_s``."""
        for device, seconds in busy_s.items():
            if not np.isnan(self.battery[device]):
                self.battery[device] = max(0.0, self.battery[device] - self._drain[device] * seconds)
        self.battery = np.minimum(self.battery + self._charge * step_s, 100.0)  # NaN (mains) stays NaN

    # -- the buffered mode: each device's state at the simulated instant its fog offers it a job

    def online_at(self, device: int, sim_s: float) -> bool:
        """Whether ``device`` is online at simulated time ``sim_s`` (buffered mode): by the trace when the fleet
        has one, else a draw with its profile's availability, fixed per device and instant (the same answer
        however often the instant is asked about; a later offer draws anew, as each sync step does)."""
        if self.trace is not None:
            return self.trace.online_device(device, sim_s)
        instant = int(np.float64(sim_s).view(np.uint64))
        return bool(np.random.default_rng([self.seed, device, instant, 0x0FFE]).random() < self.availability[device])

    def observe_at(self, device: int, sim_s: float) -> bool:
        """Bring ``device`` to simulated time ``sim_s`` (buffered mode): its battery charged for the time passed
        and drained for the jobs it finished by then; when it is online, its policy observes its readings
        (:meth:`plan_step`'s). Returns whether it is online; its strategy is :meth:`strategy`."""
        self._settle(device, sim_s)
        up = self.online_at(device, sim_s)
        self._up[device] = up
        if up:
            self._observe(device, sim_s)
        return up

    def strategy(self, device: int) -> Strategy:
        return self._policies[device].strategy

    def worked(self, device: int, start_s: float, seconds: float) -> None:
        """``device`` takes a job of ``seconds`` from ``start_s`` (buffered mode): its battery drains for it."""
        self._work[device].append((float(start_s), float(seconds)))

    def snapshot(self, step: int) -> StepPlan:
        """The fleet as last observed (buffered mode): who was online when last offered a job, the strategies
        and batteries now."""
        return StepPlan(step, self._up.copy(), tuple(p.strategy for p in self._policies), self.battery.copy())

    def _settle(self, device: int, sim_s: float) -> None:
        last = self._battery_s[device]
        if sim_s <= last:
            return
        self._battery_s[device] = sim_s
        done = [job for job in self._work[device] if job[0] + job[1] <= sim_s]
        self._work[device] = [job for job in self._work[device] if job[0] + job[1] > sim_s]
        if np.isnan(self.battery[device]):
            return
        level = self.battery[device] + self._charge[device] * (sim_s - last)
        level -= self._drain[device] * sum(seconds for _, seconds in done)
        self.battery[device] = min(100.0, max(0.0, level))

    def _observe(self, device: int, sim_s: float) -> None:
        battery = None if np.isnan(self.battery[device]) else float(self.battery[device])
        self._policies[device].observe(ResourceSample(
            time=sim_s, cpu_percent=0.0, memory_percent=0.0, memory_used_mb=0.0, disk_percent=0.0,
            battery_percent=battery, on_ac_power=None if battery is None else False))

    def write_strategies(self, devices: Path, plan: StepPlan) -> None:
        """Tell each simulated agent its strategy (:func:`~hyprstream.agent.client_app.strategy_file`, read by
        the agent's ClientApp), writing only the files of devices whose strategy changed."""
        for i, strategy in enumerate(plan.strategies):
            self.write_strategy(devices, i, strategy)

    def write_strategy(self, devices: Path, device: int, strategy: Strategy) -> None:
        """Tell one simulated agent its strategy (:meth:`write_strategies`), when it changed."""
        from hyprstream.agent.client_app import SIM_STRATEGY_SCHEMA, device_name, strategy_file
        from hyprstream.durable import write_bytes_atomic

        if self._told.get(device) is strategy:
            return
        data = json.dumps({"schema": SIM_STRATEGY_SCHEMA, "strategy": strategy.value,
                           "max_layer_groups_hybrid": self.profiles[device].training.max_layer_groups_hybrid})
        write_bytes_atomic(strategy_file(devices / device_name(device)), data.encode(), sync=False)
        self._told[device] = strategy

    def telemetry(self, i: int, plan: StepPlan, *, device_id: str, fleet: str, task: str, privacy: PrivacyState,
                  seq: int, now: float) -> Telemetry:
        """The telemetry record device ``i`` would send at simulated time ``now`` of step ``plan``."""
        battery = None if np.isnan(plan.battery[i]) else float(plan.battery[i])
        strategy, policy = plan.strategies[i], self._policies[i]
        return Telemetry(
            fleet=fleet, device_id=device_id, device_class=self.names[i], session="simulated", seq=seq, time=now,
            uptime_s=now,
            resources=ResourceSample(time=now, cpu_percent=0.0, memory_percent=0.0, memory_used_mb=0.0,
                                     disk_percent=0.0, battery_percent=battery,
                                     on_ac_power=None if battery is None else False),
            strategy=StrategyState(strategy, policy.since, policy.last.reason if policy.last else "initial",
                                   strategy is not Strategy.MINIMAL, ExecutionProvider.CPU, ModelVariant.FP32),
            model=ModelState(task, None), privacy=privacy)

    def agent_seconds(self, r: FogRound, device_of: Mapping[int, int], *, base_params: int,
                      trained_params: int | None = None) -> dict[int, float]:
        """Virtual seconds each contributor of ``r`` worked (download, train, upload), by device index."""
        per_node_down = r.bytes_down // max(1, len(r.nodes))
        trained = sum(int(d.size) for d in r.delta.values()) if trained_params is None else trained_params
        flops = clock.training_flops(base_params, trained, self.local_samples)
        out = {}
        for node in r.contributors:
            sim = self.profiles[device_of[node]].simulation
            out[device_of[node]] = clock.agent_round_s(
                Link(sim.uplink_mbps, sim.downlink_mbps, sim.latency_ms), sim.compute_speed_factor,
                down_bytes=per_node_down, up_bytes=r.uplink.get(node, 0), flops=flops)
        return out

    def round_seconds(self, r: FogRound, device_of: Mapping[int, int], *, base_params: int,
                      trained_params: int | None = None, push_to_core: bool = True,
                      agents: Mapping[int, float] | None = None) -> float:
        """Virtual seconds of a synchronous fog round: its slowest contributor, then the push to core.

        ``trained_params`` defaults to the size of the round's aggregated delta; a round without a core
        (the flat baseline) passes ``push_to_core=False``; ``agents``: :meth:`agent_seconds`, if known."""
        trained = sum(int(d.size) for d in r.delta.values()) if trained_params is None else trained_params
        if agents is None:
            agents = self.agent_seconds(r, device_of, base_params=base_params, trained_params=trained)
        push = 0.0
        if push_to_core and r.version:
            push = clock.transfer_s(4 * trained, self.fog_core.uplink_mbps, self.fog_core.latency_ms)
        return clock.sync_round_s(list(agents.values()), push)

    def agent_job_seconds(self, device: int, *, down_bytes: int, up_bytes: int, flops: float) -> float:
        """Virtual seconds of one agent job on ``device`` (download, train, upload): a buffered fog's unit."""
        sim = self.profiles[device].simulation
        return clock.agent_round_s(Link(sim.uplink_mbps, sim.downlink_mbps, sim.latency_ms),
                                   sim.compute_speed_factor, down_bytes=down_bytes, up_bytes=up_bytes, flops=flops)


class SimulatedFleetView:
    """The fleet view of simulated devices (a :class:`~hyprstream.fog.fleet.FleetView` to selection): each
    device's telemetry at the start of the current step (:meth:`update`), by device ID.

    ``device_ids``: device index -> the agent's device ID (what ``query.device`` answered); ``dpsgd``: the
    experiment's ``[privacy.dpsgd]``, whose budget (else the profile's) the records name."""

    FLEET = "simulation"

    def __init__(self, fleet: VirtualFleet, device_ids: Mapping[int, str], *, task: str, dpsgd=None) -> None:
        self.fleet = fleet
        self.device_ids = dict(device_ids)
        self.task = task
        self.privacy = {i: _privacy_state(fleet.profiles[i], dpsgd) for i in self.device_ids}
        self.now = 0.0
        self._views: dict[str, DeviceView] = {}
        self._seq = 0

    def update(self, plan: StepPlan, sim_s: float) -> None:
        """The records of step ``plan`` at simulated time ``sim_s`` (also the selector's clock)."""
        self.now, self._seq = sim_s, self._seq + 1
        self._views = {device_id: self._view(i, device_id, plan) for i, device_id in self.device_ids.items()}

    def _view(self, i: int, device_id: str, plan: StepPlan) -> DeviceView:
        state = DeviceState.ONLINE if plan.online[i] else DeviceState.OFFLINE
        record = self.fleet.telemetry(i, plan, device_id=device_id, fleet=self.FLEET, task=self.task,
                                      privacy=self.privacy[i], seq=self._seq, now=self.now)
        return DeviceView(device_id, state, "simulated", record, self.now, self.now)

    def devices(self) -> dict[str, DeviceView]:
        return dict(self._views)


def _privacy_state(profile: DeviceProfile, dpsgd) -> PrivacyState:
    """The budget a simulated device's telemetry names: ``[privacy.dpsgd]``'s, else its profile's."""
    eps, delta = profile.training.privacy_epsilon, profile.training.privacy_delta
    if dpsgd is not None:
        budget = dpsgd.budget(eps, delta)
        eps, delta = budget.epsilon, budget.delta
    return PrivacyState(False, eps, delta)
