"""``hyprstream simulate compare RUN_A RUN_B``: two finished runs side by side."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from hyprstream.errors import ConfigError


def _global_rows(run: Path) -> list[dict]:
    path = run / "metrics.parquet"
    if not path.is_file():
        raise ConfigError("no metrics.parquet here: not a finished simulation run", source=str(run))
    return [r for r in pq.read_table(path).to_pylist() if r["kind"] == "global"]


def time_to_accuracy(rows: list[dict], target: float) -> float | None:
    """Simulated seconds of the first global row with ``accuracy >= target`` (None if none reaches it)."""
    for r in rows:
        if r["accuracy"] >= target and r.get("sim_s") is not None:
            return r["sim_s"]
    return None


def _time_to_target(ra: list[dict], rb: list[dict]) -> str:
    """A's final accuracy as the target: how long each run took to reach it, in simulated seconds."""
    target = ra[-1]["accuracy"]
    ta, tb = time_to_accuracy(ra, target), time_to_accuracy(rb, target)
    cell = lambda t: f"{t:.3f}" if t is not None else "not reached"  # noqa: E731
    ratio = f" (A/B = {ta / tb:.2f})" if ta is not None and tb else ""
    return f"- sim s to reach A's final accuracy {target:.4f}: A {cell(ta)}, B {cell(tb)}{ratio}"


def compare_runs(a: Path, b: Path, *, out: Path | None = None) -> str:
    """A Markdown comparison of two runs; with ``out``, also writes it and a plot there."""
    ra, rb = _global_rows(a), _global_rows(b)
    lines = [f"# {a.name} vs {b.name}", "",
             "| step | accuracy A | accuracy B | sim s A | sim s B | bytes up A | bytes up B |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for step in range(1, max(len(ra), len(rb)) + 1):
        x = ra[step - 1] if step <= len(ra) else None
        y = rb[step - 1] if step <= len(rb) else None

        def cell(row, key, fmt):
            value = row.get(key) if row is not None else None  # runs of older versions lack sim_s
            return format(value, fmt) if value is not None else ""

        lines.append(f"| {step} | {cell(x, 'accuracy', '.4f')} | {cell(y, 'accuracy', '.4f')} | "
                     f"{cell(x, 'sim_s', '.4g')} | {cell(y, 'sim_s', '.4g')} | "
                     f"{cell(x, 'bytes_up', ',')} | {cell(y, 'bytes_up', ',')} |")
    total = [sum(r["bytes_up"] for r in rows) for rows in (ra, rb)]
    lines += ["", f"- final accuracy: A {ra[-1]['accuracy']:.4f}, B {rb[-1]['accuracy']:.4f}"
              if ra and rb else "- one run has no global rows",
              f"- total uplink bytes: A {total[0]:,}, B {total[1]:,}"
              + (f" (A/B = {total[0] / total[1]:.2f})" if total[1] else "")]
    if ra and rb:
        lines.append(_time_to_target(ra, rb))
    text = "\n".join(lines)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(text + "\n\n![accuracy](compare.png)\n")
        _plot(ra, rb, a.name, b.name, out / "compare.png")
    return text


def _plot(ra, rb, name_a, name_b, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for rows, name in ((ra, name_a), (rb, name_b)):
        ax1.plot([r["round"] for r in rows], [r["accuracy"] for r in rows], "o-", label=name)
        if all(r.get("sim_s") is not None for r in rows):
            ax2.plot([r["sim_s"] for r in rows], [r["accuracy"] for r in rows], "o-", label=name)
    ax1.set_xlabel("global step")
    ax2.set_xlabel("simulated seconds")
    for ax in (ax1, ax2):
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
