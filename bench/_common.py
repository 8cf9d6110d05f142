"""Shared helpers for the scripts in ``bench/`` (the conventions are in ``bench/README.md``).

Only the standard library and numpy are needed; ``threadpoolctl``, when installed, names the BLAS
library and its thread count in the machine line.

* :func:`measure_interleaved` / :func:`measure` -- warm-up rounds, then ``repeats`` timed rounds,
  several cases (the baseline among them) interleaved round by round; :class:`Timing` gives the
  median, min and max of the timed rounds.
* :func:`peak_rss_bytes` -- the process's peak resident set size so far.
* :func:`machine_info` / :func:`machine_line` -- cores, CPU model (from ``/proc/cpuinfo``), memory,
  Python, numpy and BLAS, as a dict and as the one line that goes into ``bench/RESULTS.md``.
* :func:`base_parser` -- the ``--quick`` / ``--repeats`` / ``--warmup`` flags every benchmark takes.
* :func:`header` -- prints date, command and machine line before the figures.
* :func:`emit` -- prints the run's result as one ``RESULT {json}`` line, for scripts and CI;
  :func:`finish` records and prints the peak RSS first.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of the timed runs (warm-up runs excluded)."""

    samples: list[float] = field(repr=False)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "min_s": self.min, "max_s": self.max, "repeats": len(self.samples)}


@dataclass(frozen=True)
class Case:
    """One thing to time. ``setup()`` (untimed) builds a state before each run; ``run(state)`` is timed.

    The state and the run's result are dropped right after the run, so a per-run buffer lives for
    one run only (keeps the peak memory of a benchmark predictable).
    """

    run: Callable[[Any], Any]
    setup: Callable[[], Any] = lambda: None


def time_once(fn: Callable[..., Any], *args: Any) -> float:
    """Seconds taken by one call ``fn(*args)`` (``time.perf_counter``); the result is dropped."""
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def measure_interleaved(cases: dict[str, Case], *, repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Times every case once per round: ``warmup`` untimed rounds, then ``repeats`` timed rounds.

    Interleaving the cases round by round, baseline included, means a burst of load from another
    process on a shared machine hits all of them alike rather than one phase. Report medians.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(warmup + repeats):
        for name, case in cases.items():
            state = case.setup()
            dt = time_once(case.run, state)
            del state
            if r >= warmup:
                samples[name].append(dt)
    return {name: Timing(s) for name, s in samples.items()}


def measure(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> Timing:
    """``warmup`` untimed calls of ``fn()``, then ``repeats`` timed ones."""
    return measure_interleaved({"fn": Case(run=lambda _state: fn())}, repeats=repeats, warmup=warmup)["fn"]


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def gbps(nbytes: float, seconds: float) -> float:
    """Decimal GB/s (1e9 bytes per second)."""
    return nbytes / seconds / 1e9 if seconds > 0 else math.inf


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _blas() -> str | None:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    libs = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    return ", ".join(f"{i.get('internal_api')} {i.get('version')} ({i.get('num_threads')} threads)" for i in libs) or None


def machine_info() -> dict[str, Any]:
    import numpy as np

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    mem = _mem_total_gib()
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "mem_total_gib": None if mem is None else round(mem, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": _blas(),
        "platform": platform.platform(),
    }


def machine_line(info: dict[str, Any] | None = None) -> str:
    """One line for ``bench/RESULTS.md``: cores, CPU model, memory, Python, numpy, BLAS, OS."""
    i = machine_info() if info is None else info
    mem = f", {i['mem_total_gib']} GiB RAM" if i.get("mem_total_gib") is not None else ""
    blas = f", {i['blas']}" if i.get("blas") else ""
    return (
        f"{i['cores']} cores ({i['usable_cores']} usable), {i['cpu_model']}{mem}; "
        f"Python {i['python']}, numpy {i['numpy']}{blas}; {i['platform']}"
    )


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats: a smoke run for CI")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds before the timed ones")
    return p


def header(title: str) -> None:
    """Prints the title, date, command and machine line: what bench/RESULTS.md records."""
    print(f"# {title}")
    print(f"date:    {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {machine_line()}")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Timing):
        return obj.as_dict()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def finish(result: dict[str, Any]) -> int:
    """Records and prints the process's peak RSS, then :func:`emit`; a benchmark's ``main`` returns this."""
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(f"\npeak RSS: {result['peak_rss_bytes'] / 1e6:.0f} MB")
    emit(result)
    return 0


def emit(result: dict[str, Any]) -> None:
    """Prints ``RESULT {json}`` on one line, machine info included: easy to grep from a CI log."""
    print("RESULT " + json.dumps(_jsonable({"machine": machine_info(), **result}), sort_keys=True))
