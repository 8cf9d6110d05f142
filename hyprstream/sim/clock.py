"""The simulator's virtual clock: how long things would take on the simulated fleet (pure functions).

Nothing sleeps. Each agent's part of a round costs the download of the request, its local training
and the upload of its reply, from its device profile's link speeds, latency and compute speed; a
synchronous fog round lasts as long as its slowest participant, plus the fog's push to core.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Sustained FP32 training throughput of the reference core of the device profiles' compute_speed_factor
# (one ~3 GHz AVX2 x86-64 core running small dense layers in torch): an assumption, stated once here.
REFERENCE_FLOPS = 20e9


@dataclass(frozen=True)
class Link:
    uplink_mbps: float
    downlink_mbps: float
    latency_ms: float


def transfer_s(nbytes: int, mbps: float, latency_ms: float) -> float:
    """Seconds to move ``nbytes`` over a link of ``mbps`` Mbit/s with one-way ``latency_ms``."""
    if nbytes < 0 or mbps <= 0 or latency_ms < 0:
        raise ValueError("bytes and latency must be >= 0 and bandwidth > 0")
    return latency_ms / 1000.0 + nbytes * 8 / (mbps * 1e6)


def training_flops(total_params: int, trained_params: int, samples: int) -> float:
    """FLOPs of ``samples`` training examples: a forward pass through every parameter (2 per
    parameter) and a backward pass through the trained ones (4 per parameter: input and weight
    gradients). Frozen layers before the trained ones need no backward pass in this model."""
    return float(samples) * (2 * total_params + 4 * trained_params)


def compute_s(flops: float, speed_factor: float) -> float:
    if speed_factor <= 0:
        raise ValueError("speed factor must be > 0")
    return flops / (speed_factor * REFERENCE_FLOPS)


def agent_round_s(link: Link, speed_factor: float, *, down_bytes: int, up_bytes: int, flops: float) -> float:
    """One agent's share of a round: download, train, upload."""
    return (transfer_s(down_bytes, link.downlink_mbps, link.latency_ms)
            + compute_s(flops, speed_factor)
            + transfer_s(up_bytes, link.uplink_mbps, link.latency_ms))


def sync_round_s(agent_seconds: Iterable[float], push_s: float) -> float:
    """A synchronous round waits for its slowest agent, then pushes to core."""
    return max(agent_seconds, default=0.0) + push_s
