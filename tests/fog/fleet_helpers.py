"""Telemetry records for the fleet view and selection tests."""

from __future__ import annotations

from hyprstream.agent.monitor import GpuSample, ResourceSample
from hyprstream.agent.profile import ExecutionProvider, ModelVariant, Strategy
from hyprstream.telemetry.records import (
    DeviceState,
    InferenceStats,
    IngestStats,
    ModelState,
    PrivacyState,
    Status,
    StrategyState,
    Telemetry,
)

FLEET = "plant-7"


def telemetry(device_id: str = "cam-01", seq: int = 1, *, session: str = "s1", cpu: float = 20.0,
              memory: float = 40.0, battery: float | None = None, ac: bool | None = None,
              gpu_util: float | None = None, strategy: Strategy = Strategy.FULL, spent: float = 0.0,
              budget: float = 8.0, fleet: str = FLEET) -> Telemetry:
    gpu = None if gpu_util is None else GpuSample("Orin (nvgpu)", gpu_util, 1000.0, 4096.0, 45.0, None)
    return Telemetry(
        fleet=fleet, device_id=device_id, device_class="jetson-orin-nano", session=session, seq=seq,
        time=1_760_000_000.0 + seq, uptime_s=10.0 * seq,
        resources=ResourceSample(1_760_000_000.0 + seq, cpu, memory, 2000.0, 30.0, 45.0, battery, ac, gpu),
        strategy=StrategyState(strategy, None, "test", strategy is not Strategy.MINIMAL, ExecutionProvider.CPU,
                               ModelVariant.FP32),
        model=ModelState("digits", 1), privacy=PrivacyState(spent >= budget, budget, 1e-5),
        inference=InferenceStats(), ingest=IngestStats(),
    )


def status(device_id: str, state: DeviceState, *, session: str = "s1", fleet: str = FLEET) -> Status:
    return Status(fleet, device_id, state, session, None if state is DeviceState.OFFLINE else 1.0)
