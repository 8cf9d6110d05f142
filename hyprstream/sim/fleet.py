"""The simulated fleet: which device profile each agent has, and which agents are online each round."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from hyprstream.agent.profile import DeviceProfile, load_profile
from hyprstream.errors import ConfigError
from hyprstream.fog.aggregator import FogRound
from hyprstream.sim import clock
from hyprstream.sim.clock import Link

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


class VirtualFleet:
    """Device profiles of the simulated agents (by device index) and the virtual time of their rounds."""

    def __init__(self, profiles: list[DeviceProfile], *, seed: int, local_samples: int,
                 fog_core: Link) -> None:
        self.profiles = profiles
        self.seed = seed
        self.local_samples = local_samples
        self.fog_core = fog_core
        self._availability = np.array([p.simulation.availability for p in profiles])

    @classmethod
    def build(cls, exp) -> VirtualFleet:
        by_name = load_profiles(sorted(exp.fleet.profiles))
        names = assign_profiles(exp.num_agents, exp.fleet.profiles, np.random.default_rng([exp.seed, 0xF1EE7]))
        link = Link(exp.network.fog_core_mbps, exp.network.fog_core_mbps, exp.network.fog_core_latency_ms)
        return cls([by_name[n] for n in names], seed=exp.seed,
                   local_samples=exp.training.local_steps * exp.training.batch_size, fog_core=link)

    def online(self, step: int) -> np.ndarray:
        return online(self._availability, self.seed, step)

    def round_seconds(self, r: FogRound, device_of: Mapping[int, int], *, base_params: int,
                      trained_params: int | None = None, push_to_core: bool = True) -> float:
        """Virtual seconds of a synchronous fog round: its slowest contributor, then the push to core.

        ``trained_params`` defaults to the size of the round's aggregated delta; a round without a core
        (the flat baseline) passes ``push_to_core=False``."""
        per_node_down = r.bytes_down // max(1, len(r.nodes))
        trained = sum(int(d.size) for d in r.delta.values()) if trained_params is None else trained_params
        flops = clock.training_flops(base_params, trained, self.local_samples)
        agents = []
        for node in r.contributors:
            sim = self.profiles[device_of[node]].simulation
            agents.append(clock.agent_round_s(Link(sim.uplink_mbps, sim.downlink_mbps, sim.latency_ms),
                                              sim.compute_speed_factor, down_bytes=per_node_down,
                                              up_bytes=r.uplink.get(node, 0), flops=flops))
        push = 0.0
        if push_to_core and r.version:
            push = clock.transfer_s(4 * trained, self.fog_core.uplink_mbps, self.fog_core.latency_ms)
        return clock.sync_round_s(agents, push)

    def agent_job_seconds(self, device: int, *, down_bytes: int, up_bytes: int, flops: float) -> float:
        """Virtual seconds of one agent job on ``device`` (download, train, upload): a buffered fog's unit."""
        sim = self.profiles[device].simulation
        return clock.agent_round_s(Link(sim.uplink_mbps, sim.downlink_mbps, sim.latency_ms),
                                   sim.compute_speed_factor, down_bytes=down_bytes, up_bytes=up_bytes, flops=flops)
