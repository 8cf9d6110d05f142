"""Device availability from traces: when each simulated device is online, on the simulated clock.

A trace is an Arrow table (a Parquet, Arrow IPC or CSV file) with one row per online interval::

    device   int    the simulated device's index, 0 .. agents - 1 (fog j holds j * agents_per_fog ...)
    start_s  float  the interval's start, simulated seconds (>= 0)
    end_s    float  its end (> start_s); the device is online for start_s <= t < end_s

as in FedScale's client-behaviour traces (per-client active and inactive periods). A device without a row
is never online. The trace repeats with the period ``[fleet] availability_period_s`` (0: the latest
``end_s`` in the file), so a run longer than the trace keeps the same pattern. :func:`synthetic` writes one:
alternating online and offline sessions of exponential lengths per device, each device with its own
mean session lengths drawn around the given means, seeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from hyprstream.errors import ConfigError

COLUMNS = ("device", "start_s", "end_s")


def read_table(path: str | Path) -> pa.Table:
    """The trace file's table (Parquet, Arrow IPC / Feather or CSV, by suffix); ConfigError naming the file."""
    import pyarrow.csv as pcsv
    import pyarrow.feather as feather
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise ConfigError("not a regular file" if p.exists() else "file not found", source=str(p))
    suffix = p.suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(p)
        if suffix in (".arrow", ".feather", ".ipc"):
            return feather.read_table(p)
        if suffix == ".csv":
            return pcsv.read_csv(p)
    except (pa.ArrowException, OSError) as exc:
        raise ConfigError(f"not a readable trace: {str(exc).splitlines()[0]}", source=str(p)) from None
    raise ConfigError(f"a trace is a .parquet, .arrow/.feather or .csv file, not {suffix or 'no suffix'!r}",
                      source=str(p))


@dataclass(frozen=True)
class AvailabilityTrace:
    """Online intervals per device, sorted and merged; :meth:`online` answers for a simulated time."""

    starts: tuple[np.ndarray, ...]  # per device: interval starts, sorted
    ends: tuple[np.ndarray, ...]  # per device: the matching ends
    period_s: float

    @classmethod
    def from_table(cls, table: pa.Table, devices: int, *, period_s: float = 0.0, first: bool = False,
                   source: str | None = None) -> AvailabilityTrace:
        """Checked: the three columns, finite times, 0 <= start < end, device indices in ``[0, devices)``.
        ``first``: the rows of devices from ``devices`` on are left out instead of refused (a reduced run of a
        larger fleet's experiment keeps its first devices' rows)."""
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise ConfigError(f"the trace has no column(s) {missing} (it needs {list(COLUMNS)})", source=source)
        try:
            device = table.column("device").to_numpy(zero_copy_only=False).astype(np.int64, casting="safe")
            start = table.column("start_s").to_numpy(zero_copy_only=False).astype(np.float64)
            end = table.column("end_s").to_numpy(zero_copy_only=False).astype(np.float64)
        except (TypeError, ValueError, pa.ArrowException) as exc:
            raise ConfigError(f"device must be integers and start_s, end_s numbers ({exc})", source=source) from None
        bad = ~(np.isfinite(start) & np.isfinite(end) & (start >= 0) & (end > start))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ConfigError(f"row {row}: an interval needs finite 0 <= start_s < end_s, got "
                              f"[{start[row]}, {end[row]})", source=source)
        if first:
            kept = device < devices
            device, start, end = device[kept], start[kept], end[kept]
        out_of_range = (device < 0) | (device >= devices)
        if out_of_range.any():
            row = int(np.flatnonzero(out_of_range)[0])
            raise ConfigError(f"row {row}: device {device[row]} is not one of the fleet's {devices} devices "
                              f"(0 .. {devices - 1})", source=source)
        if not (period_s >= 0 and math.isfinite(period_s)):
            raise ConfigError(f"the period must be finite and >= 0, got {period_s}", source=source)
        period = period_s or (float(end.max()) if len(end) else 0.0)
        if len(end) and end.max() > period:
            raise ConfigError(f"an interval ends at {end.max():g} s, after the period of {period:g} s", source=source)
        order = np.argsort(device, kind="stable")
        bounds = np.searchsorted(device[order], np.arange(devices + 1))
        starts, ends = [], []
        for d in range(devices):
            rows = order[bounds[d]:bounds[d + 1]]
            s, e = _merge(start[rows], end[rows])
            starts.append(s)
            ends.append(e)
        return cls(tuple(starts), tuple(ends), period)

    @classmethod
    def load(cls, path: str | Path, devices: int, *, period_s: float = 0.0, first: bool = False) -> AvailabilityTrace:
        """The trace at ``path`` for ``devices`` devices (:meth:`from_table`)."""
        return cls.from_table(read_table(path), devices, period_s=period_s, first=first, source=str(path))

    @property
    def devices(self) -> int:
        return len(self.starts)

    def online(self, sim_s: float) -> np.ndarray:
        """Which devices are online at simulated time ``sim_s`` (the trace repeated every period)."""
        return np.array([self.online_device(d, sim_s) for d in range(self.devices)], dtype=bool)

    def online_device(self, device: int, sim_s: float) -> bool:
        """Whether ``device`` is online at simulated time ``sim_s``."""
        t = float(sim_s) % self.period_s if self.period_s > 0 else float(sim_s)
        s, e = self.starts[device], self.ends[device]
        i = int(np.searchsorted(s, t, side="right")) - 1
        return bool(i >= 0 and t < e[i])

    def fraction_online(self) -> np.ndarray:
        """Each device's share of the period spent online."""
        if self.period_s <= 0:
            return np.zeros(self.devices)
        return np.array([float((e - s).sum()) / self.period_s for s, e in zip(self.starts, self.ends, strict=True)])


def _merge(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping or touching intervals joined, sorted by start."""
    order = np.argsort(start, kind="stable")
    merged_s: list[float] = []
    merged_e: list[float] = []
    for s, e in zip(start[order], end[order], strict=True):
        if merged_e and s <= merged_e[-1]:
            merged_e[-1] = max(merged_e[-1], float(e))
        else:
            merged_s.append(float(s))
            merged_e.append(float(e))
    return np.array(merged_s), np.array(merged_e)


def synthetic(devices: int, duration_s: float, *, mean_online_s: float, mean_offline_s: float, seed: int = 0,
              spread: float = 0.5) -> pa.Table:
    """A trace of ``devices`` over ``[0, duration_s)``: each device alternates online and offline sessions of
    exponential lengths with its own means (the given means times a log-normal factor of sigma ``spread``,
    so devices differ), online at 0 with probability ``mean_online / (mean_online + mean_offline)``: the
    process' stationary state (sessions are memoryless, so what is left of the first one is exponential
    too). Seeded: the same arguments give the same table."""
    if devices < 1 or not duration_s > 0 or not mean_online_s > 0 or not mean_offline_s > 0 or spread < 0:
        raise ValueError("need devices >= 1, duration_s > 0, mean_online_s > 0, mean_offline_s > 0, spread >= 0")
    rng = np.random.default_rng([seed, 0x7ACE])
    rows_d, rows_s, rows_e = [], [], []
    for d in range(devices):
        on_mean = mean_online_s * rng.lognormal(0.0, spread)
        off_mean = mean_offline_s * rng.lognormal(0.0, spread)
        online = rng.random() < on_mean / (on_mean + off_mean)
        t = 0.0
        while t < duration_s:
            length = rng.exponential(on_mean if online else off_mean)
            if online and length > 0:
                rows_d.append(d)
                rows_s.append(t)
                rows_e.append(min(duration_s, t + length))
            t += length
            online = not online
    return pa.table({"device": pa.array(rows_d, pa.int64()), "start_s": pa.array(rows_s, pa.float64()),
                     "end_s": pa.array(rows_e, pa.float64())})


def write(table: pa.Table, path: str | Path) -> Path:
    """Write a trace as Parquet (``.parquet``) or CSV (``.csv``)."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    p = Path(path)
    if p.suffix.lower() == ".csv":
        pcsv.write_csv(table, p)
    elif p.suffix.lower() == ".parquet":
        pq.write_table(table, p)
    else:
        raise ValueError(f"write a trace as .parquet or .csv, not {p.suffix or 'no suffix'!r}")
    return p


__all__ = ["COLUMNS", "AvailabilityTrace", "read_table", "synthetic", "write"]
