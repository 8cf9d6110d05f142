"""``report.md`` and PNG plots for a finished simulation run."""

from __future__ import annotations

from pathlib import Path

from hyprstream.config import to_dict
from hyprstream.sim.experiment import Experiment
from hyprstream.sim.metrics import MetricsLog


def plot_accuracy(metrics: MetricsLog, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    g = metrics.global_rows()
    ax1.plot([r.round for r in g], [r.accuracy for r in g], "o-", label="global (core)", linewidth=2)
    for fog in sorted({r.fog for r in metrics.rows if r.kind == "fog_round"}):
        rows = [r for r in metrics.rows if r.fog == fog]
        ax1.plot([r.round for r in rows], [r.accuracy for r in rows], ".--", alpha=0.7, label=f"{fog} (after its round)")
    ax1.set_xlabel("global step")
    ax1.set_ylabel("held-out accuracy")
    ax1.set_ylim(0, 1)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.plot([r.sim_s for r in g], [r.accuracy for r in g], "o-")
    ax2.set_xlabel("simulated seconds on the fleet")
    ax2.set_ylabel("held-out accuracy")
    ax2.set_ylim(0, 1)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(exp: Experiment, metrics: MetricsLog, out: Path, *, final_accuracy: float,
                 final_version: int) -> Path:
    plot_accuracy(metrics, out / "accuracy.png")
    g = metrics.global_rows()
    lines = [
        f"# Simulation report: {exp.name}",
        "",
        exp.description or "",
        "",
        f"- Task: `{exp.task.name}`; fleet: {exp.fleet.fogs} fog(s) x {exp.fleet.agents_per_fog} agent(s); "
        f"partition: {exp.partition.scheme.value}"
        + (f" (alpha {exp.partition.alpha})" if exp.partition.scheme.value == "dirichlet" else ""),
        f"- Global steps: {exp.training.global_steps}; local steps {exp.training.local_steps}, batch "
        f"{exp.training.batch_size}, lr {exp.training.lr}; layers: {', '.join(exp.training.layers) or 'all'}",
        f"- Consistency: {exp.core.consistency.mode.value}; seed {exp.seed}",
        "- Fleet mix: " + ", ".join(f"{name} {share:g}" for name, share in sorted(exp.fleet.profiles.items())),
        "- Simulated time (`sim s`): virtual seconds from each device profile's link and compute speed "
        "(`hyprstream.sim.clock`); `wall s`: real seconds of this run.",
        f"- **Final held-out accuracy: {final_accuracy:.4f}** (master version {final_version})",
        "",
        "| step | version | accuracy | loss | train loss | participants | bytes up | bytes down | sim s | wall s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in g:
        lines.append(f"| {r.round} | {r.version} | {r.accuracy:.4f} | {r.loss:.4f} | {r.train_loss:.4f} | "
                     f"{r.participants} | {r.bytes_up:,} | {r.bytes_down:,} | {r.sim_s:.1f} | {r.wall_s:.1f} |")
    lines += ["", "![accuracy](accuracy.png)", "", "## Experiment", "", "```toml",
              *_toml_lines(to_dict(exp)), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _toml_lines(d: dict, prefix: str = "") -> list[str]:
    scalars = [(k, v) for k, v in d.items() if not isinstance(v, dict)]
    tables = [(k, v) for k, v in d.items() if isinstance(v, dict)]
    lines = [f"{k} = {_toml_value(v)}" for k, v in scalars if v is not None]
    for k, v in tables:
        name = f"{prefix}{k}"
        lines += ["", f"[{name}]", *_toml_lines(v, f"{name}.")]
    return lines


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)
