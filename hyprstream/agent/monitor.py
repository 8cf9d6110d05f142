"""Resource monitor: what the device is doing right now, as one typed :class:`ResourceSample`.

:class:`ResourceMonitor` reads the CPU, memory, disk, temperature, battery and AC power through
``psutil`` and the GPU through NVML (``pynvml``, from the ``nvidia-ml-py`` package). Every reading
that a device cannot give (no temperature sensor, no battery, no NVIDIA GPU, no NVML library) is
``None``: an absent GPU is normal, not an error, and is logged once at DEBUG.

Monitors are anything with ``sample() -> ResourceSample``; :class:`TraceMonitor` replays a recorded
trace (CSV, one sample per row; see :func:`load_trace` and :func:`write_trace`), which is how the
policy is tested and how a device's behaviour can be reproduced on a desk.

Sampling is cheap (no sleeps): CPU utilisation is measured between two consecutive calls, so the
first call of a fresh monitor primes the counter and reports the utilisation since the process
started.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Protocol

from hyprstream.errors import ValidationError
from hyprstream.telemetry.records import GpuSample, ResourceSample

__all__ = [
    "GpuSample",
    "Monitor",
    "NvmlGpu",
    "ResourceMonitor",
    "ResourceSample",
    "TraceMonitor",
    "load_trace",
    "write_trace",
]

log = logging.getLogger("hyprstream.agent.monitor")

# psutil sensor names that report the SoC / CPU package temperature, most specific first.
_SOC_SENSORS = ("cpu_thermal", "soc_thermal", "cpu-thermal", "coretemp", "k10temp", "zenpower",
                "tegra_thermal", "thermal_zone0", "acpitz")


class Monitor(Protocol):
    """Anything that gives resource samples."""

    def sample(self) -> ResourceSample: ...


class NvmlGpu:
    """GPU readings through NVML; quietly absent when there is no NVIDIA GPU or no NVML library.

    ``index`` picks the GPU. NVML is initialised on the first :meth:`read` and shut down by
    :meth:`close`. A reading that fails later (driver reset, GPU lost) returns ``None`` and is
    logged once.
    """

    def __init__(self, index: int = 0) -> None:
        self.index = index
        self._nvml = None
        self._handle = None
        self._name = ""
        self._tried = False
        self._warned = False

    @property
    def available(self) -> bool:
        self._init()
        return self._handle is not None

    def _init(self) -> None:
        if self._tried:
            return
        self._tried = True
        try:
            import pynvml
        except ImportError:
            log.debug("pynvml is not installed: no GPU readings")
            return
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # pynvml.NVMLError and OSError when libnvidia-ml is missing
            log.debug("NVML unavailable (%s): no GPU readings", exc)
            return
        try:
            if pynvml.nvmlDeviceGetCount() <= self.index:
                log.debug("NVML sees no GPU %d: no GPU readings", self.index)
                pynvml.nvmlShutdown()
                return
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            name = pynvml.nvmlDeviceGetName(self._handle)
            self._name = name.decode() if isinstance(name, bytes) else str(name)
            self._nvml = pynvml
        except Exception as exc:
            log.debug("NVML failed to open GPU %d (%s): no GPU readings", self.index, exc)
            self._handle = None
            pynvml.nvmlShutdown()

    def read(self) -> GpuSample | None:
        self._init()
        nvml, handle = self._nvml, self._handle
        if nvml is None or handle is None:
            return None
        try:
            util = nvml.nvmlDeviceGetUtilizationRates(handle)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        except Exception as exc:
            if not self._warned:
                log.warning("NVML reading of GPU %d failed: %s", self.index, exc)
                self._warned = True
            return None
        return GpuSample(
            name=self._name, util_percent=float(util.gpu), memory_used_mb=mem.used / 2**20,
            memory_total_mb=mem.total / 2**20,
            temp_c=_optional(lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))),
            power_w=_optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),
        )

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
        self._nvml = self._handle = None


def _optional(read: Callable[[], float]) -> float | None:
    try:
        return read()
    except Exception:
        return None


class ResourceMonitor:
    """Samples this machine with psutil (and NVML for the GPU). ``disk_path``: the store's filesystem."""

    def __init__(self, disk_path: str | Path = "/", *, gpu: NvmlGpu | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        import psutil

        self._psutil = psutil
        self.disk_path = str(disk_path)
        self.gpu = gpu if gpu is not None else NvmlGpu()
        self._clock = clock
        psutil.cpu_percent(interval=None)  # prime: the next call reports utilisation since now

    def sample(self) -> ResourceSample:
        ps = self._psutil
        vm = ps.virtual_memory()
        try:
            disk = ps.disk_usage(self.disk_path).percent
        except OSError:
            disk = 0.0
        battery = ps.sensors_battery() if hasattr(ps, "sensors_battery") else None
        return ResourceSample(
            time=self._clock(),
            cpu_percent=float(ps.cpu_percent(interval=None)),
            memory_percent=float(vm.percent),
            memory_used_mb=(vm.total - vm.available) / 2**20,
            disk_percent=float(disk),
            soc_temp_c=self._soc_temp(),
            battery_percent=float(battery.percent) if battery is not None else None,
            on_ac_power=_ac_power(battery),
            gpu=self.gpu.read(),
        )

    def _soc_temp(self) -> float | None:
        reader = getattr(self._psutil, "sensors_temperatures", None)
        if reader is None:
            return None
        try:
            sensors = reader()
        except (OSError, RuntimeError):
            return None
        return soc_temperature(sensors)

    def close(self) -> None:
        self.gpu.close()


def _ac_power(battery) -> bool | None:
    if battery is None:
        return None
    plugged = battery.power_plugged
    return None if plugged is None else bool(plugged)


def soc_temperature(sensors: dict[str, Sequence]) -> float | None:
    """The SoC temperature from psutil's ``sensors_temperatures()``: the hottest reading of the
    best-known sensor, else the hottest reading of any sensor; ``None`` without readings."""
    for name in _SOC_SENSORS:
        readings = [r.current for r in sensors.get(name, ()) if r.current is not None]
        if readings:
            return float(max(readings))
    everything = [r.current for rs in sensors.values() for r in rs if r.current is not None]
    return float(max(everything)) if everything else None


class TraceMonitor:
    """Replays recorded samples in order; :meth:`sample` raises ``IndexError`` past the end."""

    def __init__(self, samples: Iterable[ResourceSample]) -> None:
        self.samples = list(samples)
        self._next = 0

    def sample(self) -> ResourceSample:
        if self._next >= len(self.samples):
            raise IndexError("resource trace exhausted")
        s = self.samples[self._next]
        self._next += 1
        return s

    def __iter__(self) -> Iterator[ResourceSample]:
        while self._next < len(self.samples):
            yield self.sample()

    def __len__(self) -> int:
        return len(self.samples)


# ---------------------------------------------------------------------------------------------- traces

_SCALAR = [f.name for f in fields(ResourceSample) if f.name != "gpu"]
_GPU = [f"gpu_{f.name}" for f in fields(GpuSample)]
TRACE_COLUMNS = (*_SCALAR, *_GPU)
"""Columns of a trace CSV file; empty cells are ``None``. ``gpu_name`` empty: no GPU."""


def write_trace(path: str | Path, samples: Iterable[ResourceSample]) -> int:
    """Write ``samples`` as a trace CSV; returns the count (record a device with ``ResourceMonitor``)."""
    n = 0
    with Path(path).open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(TRACE_COLUMNS)
        for s in samples:
            gpu = s.gpu
            row = [_cell(getattr(s, name)) for name in _SCALAR]
            row += [_cell(getattr(gpu, f.name)) if gpu else "" for f in fields(GpuSample)]
            out.writerow(row)
            n += 1
    return n


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def load_trace(path: str | Path) -> list[ResourceSample]:
    """Samples from a trace CSV written by :func:`write_trace` (or by hand with the same columns).

    Raises ValidationError naming the file and line for an unknown column or a bad value.
    """
    path = Path(path)
    samples = []
    with path.open(newline="") as fh:
        rows = csv.DictReader(line for line in fh if not line.lstrip().startswith("#"))
        unknown = set(rows.fieldnames or ()) - set(TRACE_COLUMNS)
        missing = {"time", "cpu_percent", "memory_percent"} - set(rows.fieldnames or ())
        if unknown or missing:
            raise ValidationError(f"{path}: trace columns: unknown {sorted(unknown)}, missing {sorted(missing)}")
        for line, row in enumerate(rows, start=2):
            try:
                samples.append(_parse_row(row))
            except (ValueError, TypeError) as exc:
                raise ValidationError(f"{path}:{line}: {exc}") from None
    return samples


def _parse_row(row: dict[str, str]) -> ResourceSample:
    def num(key: str, default: float | None = None) -> float | None:
        text = (row.get(key) or "").strip()
        return float(text) if text else default

    ac = (row.get("on_ac_power") or "").strip()
    gpu = None
    if (row.get("gpu_name") or "").strip():
        gpu = GpuSample(name=row["gpu_name"].strip(), util_percent=num("gpu_util_percent", 0.0),
                        memory_used_mb=num("gpu_memory_used_mb", 0.0),
                        memory_total_mb=num("gpu_memory_total_mb", 0.0),
                        temp_c=num("gpu_temp_c"), power_w=num("gpu_power_w"))
    return ResourceSample(
        time=num("time"), cpu_percent=num("cpu_percent"), memory_percent=num("memory_percent"),
        memory_used_mb=num("memory_used_mb", 0.0), disk_percent=num("disk_percent", 0.0),
        soc_temp_c=num("soc_temp_c"), battery_percent=num("battery_percent"),
        on_ac_power=None if not ac else ac.lower() in {"1", "true", "yes"}, gpu=gpu,
    )

