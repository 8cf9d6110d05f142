"""Terminal front end of a simulation: progress display, per-step table, final summary."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hyprstream.sim import harness
from hyprstream.sim.experiment import Experiment
from hyprstream.sim.report import write_report


def run_with_console(exp: Experiment, out: Path, *, source: Path, quiet: bool = False,
                     baseline: str | None = None) -> harness.SimulationResult:
    """Run ``exp`` (hierarchical; with ``baseline="flat"`` the flat FedAvg baseline) with progress output."""
    console = Console(stderr=False, quiet=quiet)
    shape = {"flat": f"flat FedAvg baseline over {exp.num_agents} agents",
             "central": "centralized training on the union of the agents' data"}.get(
        baseline, f"{exp.fleet.fogs} fogs x {exp.fleet.agents_per_fog} agents")
    console.print(f"[bold]hyprstream simulate[/] {exp.name} ({source}): {shape}, "
                  f"{exp.training.global_steps} global steps -> {out}")
    header = f"{'step':>4} {'version':>7} {'accuracy':>8} {'loss':>7} {'agents':>6} {'up KB':>9} {'down KB':>9} {'sim s':>8} {'wall s':>7}"
    started = time.monotonic()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=quiet) as progress:
        bar = progress.add_task("global steps", total=exp.training.global_steps)
        progress.console.print(header)

        def on_step(step, rounds, row, core) -> None:
            progress.console.print(
                f"{step:>4} {row.version:>7} {row.accuracy:>8.4f} {row.loss:>7.4f} {row.participants:>6} "
                f"{row.bytes_up / 1024:>9.1f} {row.bytes_down / 1024:>9.1f} {row.sim_s:>8.4g} {row.wall_s:>7.1f}")
            for r in rounds:
                if r.reasons:
                    progress.console.print(f"     {r.fog}: {len(r.reasons)} problem(s), first: {r.reasons[0]}")
            progress.advance(bar)

        if baseline == "flat":
            from hyprstream.sim.flat import run_flat

            result = run_flat(exp, out, on_step=on_step)
        elif baseline == "central":
            from hyprstream.sim.central import run_central

            result = run_central(exp, out, on_step=on_step)
        elif baseline is None:
            result = harness.run(exp, out, on_step=on_step)
        else:
            raise ValueError(f"unknown baseline {baseline!r}")
    report = write_report(exp, result.metrics, out, final_accuracy=result.final_accuracy,
                          final_version=result.final_version, baseline=baseline)
    summary = Table(title="Summary", show_header=False)
    summary.add_row("final accuracy", f"{result.final_accuracy:.4f}")
    summary.add_row("master version", str(result.final_version))
    summary.add_row("wall time", f"{time.monotonic() - started:.1f} s")
    summary.add_row("metrics", str(out / "metrics.parquet"))
    summary.add_row("report", str(report))
    console.print(summary)
    return result
