"""``report.md`` and PNG plots for a finished simulation run."""

from __future__ import annotations

import math
from pathlib import Path

from hyprstream.config import to_dict
from hyprstream.sim.experiment import Experiment
from hyprstream.sim.metrics import MetricsLog
from hyprstream.sim.pretrain import describe


def plot_accuracy(metrics: MetricsLog, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    g = metrics.global_rows()
    fogs = sorted({r.fog for r in metrics.rows if r.kind == "fog_round"})
    for j, fog in enumerate(fogs):  # each fog's points shifted a little sideways, so none hides another
        rows = [r for r in metrics.rows if r.fog == fog]
        shift = (j - (len(fogs) - 1) / 2) * min(0.08, 0.4 / max(1, len(fogs)))
        # a legend entry per fog up to ten; a large fleet's fogs share one
        label = f"{fog} (after its round)" if len(fogs) <= 10 else ("each fog (after its round)" if j == 0 else None)
        ax1.plot([r.round + shift for r in rows], [r.accuracy for r in rows], "x--", alpha=0.7, markersize=5,
                 linewidth=1, label=label)
    ax1.plot([r.round for r in g], [r.accuracy for r in g], "o-", label="global (core)", linewidth=2, zorder=3,
             markerfacecolor="none")
    _integer_steps(ax1)
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
    _save(plt, fig, path)


def _integer_steps(ax, y: bool = False) -> None:
    """Whole-number ticks on the x axis (global steps, counts), and on the y axis too with ``y``."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if y:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _seconds(x: float) -> str:
    """Simulated seconds with four significant digits (a fast fleet's steps take fractions of a second)."""
    return f"{x:.4g}"


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bytes(metrics: MetricsLog, path: Path) -> None:
    """Payload bytes per tier and global step: agents -> fog, fog -> agents, fogs -> core."""
    plt = _plt()
    g = metrics.global_rows()
    steps = [r.round for r in g]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.27
    for k, (label, values) in enumerate((("agents -> fog (up)", [r.bytes_up for r in g]),
                                         ("fog -> agents (down)", [r.bytes_down for r in g]),
                                         ("fog -> core (push)", [r.bytes_core for r in g]))):
        ax.bar([s + (k - 1) * width for s in steps], [v / 1e6 for v in values], width, label=label)
    _integer_steps(ax)
    ax.set_xlabel("global step")
    ax.set_ylabel("MB")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_participation(metrics: MetricsLog, path: Path) -> None:
    """Agents asked and agents whose update counted, per step; rounds each device contributed to."""
    plt = _plt()
    rows = metrics.participation
    steps = sorted({p["round"] for p in rows})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(steps, [sum(1 for p in rows if p["round"] == s) for s in steps], "o-", label="asked")
    ax1.plot(steps, [sum(1 for p in rows if p["round"] == s and p["contributed"]) for s in steps], "o-",
             label="contributed")
    _integer_steps(ax1, y=True)
    ax1.set_xlabel("global step")
    ax1.set_ylabel("agents")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    per_device: dict[int, int] = {}
    for p in rows:
        per_device[p["device"]] = per_device.get(p["device"], 0) + int(p["contributed"])
    ax2.hist(list(per_device.values()), bins=range(0, max(per_device.values(), default=0) + 2), align="left")
    _integer_steps(ax2, y=True)
    ax2.set_xlabel("rounds a device contributed to")
    ax2.set_ylabel("devices")
    ax2.grid(alpha=0.3)
    _save(plt, fig, path)


STRATEGY_COLOURS = {"full": "tab:green", "hybrid": "tab:orange", "minimal": "tab:red", "offline": "tab:gray"}


def strategy_mix(fleet: list[dict]) -> dict[str, list[int]]:
    """Devices per step in each strategy (online devices) and offline, from ``fleet.parquet`` rows."""
    steps = sorted({f["round"] for f in fleet})
    mix = {k: [0] * len(steps) for k in STRATEGY_COLOURS}
    index = {s: i for i, s in enumerate(steps)}
    for f in fleet:
        mix[f["strategy"] if f["online"] else "offline"][index[f["round"]]] += 1
    return {"steps": steps, **mix}


def plot_strategy(metrics: MetricsLog, path: Path) -> None:
    """Strategy mix per step (stacked: full, hybrid, minimal, offline) and each battery's level."""
    plt = _plt()
    mix = strategy_mix(metrics.fleet)
    steps = mix["steps"]
    batteries = sorted({f["device"] for f in metrics.fleet if f["battery_percent"] is not None})
    fig, axes = plt.subplots(1, 2 if batteries else 1, figsize=(10 if batteries else 6, 4), squeeze=False)
    ax1 = axes[0][0]
    bottom = [0] * len(steps)
    for name, colour in STRATEGY_COLOURS.items():
        ax1.bar(steps, mix[name], bottom=bottom, color=colour, label=name)
        bottom = [b + v for b, v in zip(bottom, mix[name], strict=True)]
    _integer_steps(ax1, y=True)
    ax1.set_xlabel("global step")
    ax1.set_ylabel("devices")
    ax1.set_title("strategy mix at the start of each step", fontsize=9)
    ax1.legend(fontsize=8)
    if batteries:
        ax2 = axes[0][1]
        for device in batteries:
            pts = sorted((f["round"], f["battery_percent"]) for f in metrics.fleet if f["device"] == device)
            ax2.plot([x for x, _ in pts], [y for _, y in pts], "-", alpha=0.6, linewidth=1)
        _integer_steps(ax2)
        ax2.set_xlabel("global step")
        ax2.set_ylabel("battery % (one line per battery device)")
        ax2.set_ylim(0, 100)
        ax2.grid(alpha=0.3)
    _save(plt, fig, path)


def plot_epsilon(metrics: MetricsLog, path: Path) -> None:
    """Sample-level epsilon of each device after each step (DP-SGD), and the model's client-level epsilon."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for device in sorted({p["device"] for p in metrics.privacy}):
        pts = sorted((p["round"], p["epsilon"]) for p in metrics.privacy if p["device"] == device)
        ax.plot([x for x, _ in pts], [y for _, y in pts], "-", alpha=0.5, linewidth=1)
    client = [(r.round, r.client_epsilon) for r in metrics.global_rows() if r.client_epsilon is not None]
    if client:
        ax.plot([x for x, _ in client], [y for _, y in client], "ko-", label="client-level (model)", linewidth=2)
        ax.legend(fontsize=8)
    _integer_steps(ax)
    ax.set_xlabel("global step")
    ax.set_ylabel("epsilon (one line per device)")
    ax.grid(alpha=0.3)
    _save(plt, fig, path)


def _engine_lines(exp: Experiment, baseline: str | None) -> list[str]:
    """What the batched engine ran instead of the devices' own code (docs/architecture.md, "Two engines")."""
    from hyprstream.sim.experiment import Engine

    if baseline is not None or exp.runtime.engine is not Engine.BATCHED:
        return []
    lines = ["- Engine: batched -- the devices' local training in vmapped passes over one device table (each "
             "device's minibatches, seeds and Adam as its ClientApp's), their replies checked as matrices at the "
             "fogs; no Flower messages, ClientApp middleware or per-device stores ran"]
    if exp.privacy.secagg is not None:
        lines.append("- Secure aggregation: the protocol's output computed -- each surviving device's clipped, "
                     "quantized input summed modulo the field, with the protocol's dropout and threshold; no keys, "
                     "masks or shares were made, and the uplink counts each survivor's field vector only")
    return lines


def write_report(exp: Experiment, metrics: MetricsLog, out: Path, *, final_accuracy: float,
                 final_version: int, baseline: str | None = None) -> Path:
    plot_accuracy(metrics, out / "accuracy.png")
    plot_bytes(metrics, out / "bytes.png")
    plot_participation(metrics, out / "participation.png")
    if metrics.fleet:
        plot_strategy(metrics, out / "strategy.png")
    private = bool(metrics.privacy) or any(r.client_epsilon is not None for r in metrics.rows)
    if private:
        plot_epsilon(metrics, out / "epsilon.png")
    g = metrics.global_rows()
    if baseline == "central":
        shape = (f"- **Centralized reference**: the same model trained on the union of the {exp.num_agents} "
                 f"agents' data, {exp.training.local_steps * exp.num_agents} minibatch steps per round")
    elif baseline == "flat":
        shape = (f"- **Flat baseline**: Flower's FedAvg over all {exp.num_agents} agents (no fogs, no core), every "
                 "layer group trained, full-model fp32 updates")
    else:
        shape = f"- Fleet: {exp.fleet.fogs} fog(s) x {exp.fleet.agents_per_fog} agent(s)"
    p = exp.privacy
    fogs = baseline is None  # secure aggregation and client-level DP happen at fogs; DP-SGD on devices
    parts = []
    if fogs and p.secagg is not None:
        parts.append(f"secure aggregation (clip {p.secagg.clip:g})")
    if fogs and p.client_dp is not None:
        parts.append(f"client-level DP (z {p.client_dp.noise_multiplier:g}, {p.client_dp.placement.value})")
    if baseline != "central" and p.dpsgd is not None:
        parts.append(f"DP-SGD (z {p.dpsgd.noise_multiplier:g}, C {p.dpsgd.max_grad_norm:g})")
    privacy = ", ".join(parts)
    lines = [
        f"# Simulation report: {exp.name}" + {"flat": " (flat FedAvg baseline)",
                                               "central": " (centralized reference)"}.get(baseline, ""),
        "",
        exp.description or "",
        "",
        f"- Task: `{exp.task.name}`; partition: {exp.partition.scheme.value}"
        + (f" (alpha {exp.partition.alpha})" if exp.partition.scheme.value == "dirichlet" else ""),
        shape,
        f"- Global steps: {exp.training.global_steps}; local steps {exp.training.local_steps}, batch "
        f"{exp.training.batch_size}, lr {exp.training.lr}; layers: "
        + ("all" if baseline else ", ".join(exp.training.layers) or "all")
        + ("" if baseline else f"; update encoding {exp.training.update_encoding.value}"),
        *filter(None, [describe(out)]),
        f"- Consistency: {exp.core.consistency.mode.value}; seed {exp.seed}",
        f"- Privacy: {privacy or 'none'}",
        *_engine_lines(exp, baseline),
        *_client_dp_lines(exp, g, baseline),
        *_buffered_lines(exp, baseline),
        "- Fleet mix: " + ", ".join(f"{name} {share:g}" for name, share in sorted(exp.fleet.profiles.items())),
        "- Simulated time (`sim s`): virtual seconds from each device profile's link and compute speed "
        "(`hyprstream.sim.clock`); `wall s`: real seconds of this run.",
        f"- **Final held-out accuracy: {final_accuracy:.4f}** (master version {final_version})",
        f"- Payload bytes in total: agents -> fog {sum(r.bytes_up for r in g):,}, fog -> agents "
        f"{sum(r.bytes_down for r in g):,}, fog -> core {sum(r.bytes_core for r in g):,}",
        "",
        "| step | version | accuracy | loss | train loss | participants | bytes up | bytes down | bytes core "
        "| client eps | max device eps | sim s | wall s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in g:
        lines.append(f"| {r.round} | {r.version} | {r.accuracy:.4f} | {r.loss:.4f} | {r.train_loss:.4f} | "
                     f"{r.participants} | {r.bytes_up:,} | {r.bytes_down:,} | {r.bytes_core:,} | "
                     f"{_opt(r.client_epsilon)} | {_opt(r.device_epsilon)} | {_seconds(r.sim_s)} | {r.wall_s:.1f} |")
    lines += ["", "![accuracy](accuracy.png)", "", "![bytes per tier](bytes.png)", "",
              "![participation](participation.png)", ""]
    if metrics.fleet:
        mix = strategy_mix(metrics.fleet)
        lines += ["Devices per strategy at the start of each step (the agents' adaptive policy on simulated "
                  "readings; `minimal` devices are not asked to train, `hybrid` ones train fewer layer groups):",
                  "", "| step | " + " | ".join(STRATEGY_COLOURS) + " |", "|---:" * (len(STRATEGY_COLOURS) + 1) + "|"]
        for i, step in enumerate(mix["steps"]):
            lines.append(f"| {step} | " + " | ".join(str(mix[k][i]) for k in STRATEGY_COLOURS) + " |")
        lines += ["", "![strategy mix](strategy.png)", ""]
    if private:
        lines += ["![epsilon](epsilon.png)", ""]
    lines += ["## Experiment", "", "```toml", *_toml_lines(to_dict(exp)), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _client_dp_lines(exp: Experiment, rows: list, baseline: str | None) -> list[str]:
    """The model's client-level epsilon after the last step (the fogs' ledgers), when the run used it."""
    dp = exp.privacy.client_dp
    spent = [r.client_epsilon for r in rows if r.client_epsilon is not None]
    if baseline is not None or dp is None or not spent:
        return []
    budget = f"budget {dp.epsilon_budget:g}" if math.isfinite(dp.epsilon_budget) else "no budget"
    clip = exp.privacy.secagg.clip if exp.privacy.secagg is not None else dp.clip
    if exp.training.mode.value == "buffered":  # each push a replace-one Gaussian release (docs/privacy.md)
        how = f"each push charged at rate 1 with sensitivity 2 x clip {clip:g}"
    else:
        how = f"sampling rate {dp.client_sampling_rate:g}, clip {clip:g}"
    return [f"- **Model's client-level epsilon: {spent[-1]:.3f}** at delta {dp.delta:g} ({budget}; noise "
            f"multiplier {dp.noise_multiplier:g}, {how}); per step in the `client eps` column"]


def _buffered_lines(exp: Experiment, baseline: str | None) -> list[str]:
    """The buffered asynchronous mode's settings (hyprstream.sim.buffered), when the run used it."""
    if baseline is not None or exp.training.mode.value != "buffered":
        return []
    from hyprstream.sim.buffered import push_budget

    b = exp.buffered
    return [f"- Mode: buffered asynchronous (FedBuff): buffer_k {b.buffer_k}, max staleness {b.max_staleness}, "
            f"concurrency {b.concurrency or exp.fleet.agents_per_fog} per fog; a global row (`step`) every "
            f"{exp.fleet.fogs} pushes; "
            + (f"run for {b.sim_seconds:g} simulated seconds" if b.sim_seconds is not None else
               f"{push_budget(exp)} pushes of {b.buffer_k} updates in all, at least as many agent updates as "
               "the sync mode's global steps ask for")]


def _opt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


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
