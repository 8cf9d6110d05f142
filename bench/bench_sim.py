"""Simulator: the fog hierarchy vs flat Flower FedAvg with the same clients, model and data; and the batched
engine vs the Flower engine at fleet scale.

    python bench/bench_sim.py            # 10 fogs x 100 agents (1,000 clients), 3 rounds, both cases
    python bench/bench_sim.py --quick    # 2 fogs x 5 agents, 3 rounds: a smoke run
    python bench/bench_sim.py --engines  # fleet-100k: 10 x 1,000 devices batched, 10 x 100 on the Flower engine
    python bench/bench_sim.py --engines --fogs 100 --agents-per-fog 10000 --flower-agents-per-fog 0  # a GPU

**Engines** (``--engines``): ``simulations/fleet-100k.toml`` (digits MLP, the pretrained head fine-tuned with
40 local steps of batch 32; 32 to 64 examples per device; a mixed fleet) resized, once with ``[runtime]
engine = "batched"`` at ``--fogs`` x ``--agents-per-fog`` devices (default 10 x 1,000) and once with the
Flower engine (every device a ClientApp on Flower's runtime, one store each) at ``--fogs`` x
``--flower-agents-per-fog`` (default 10 x 100: 1,000 devices, what that engine runs on 2 cores in minutes;
0 skips it), each in its own process. A round counts as done only when core committed a push from every
fog with a contributor. Reported: each round's wall seconds, the steady seconds per round, the devices
trained per second of a steady round, and their ratio (batched / Flower); peak memory as above.
Targets (issue 18): 10,000 devices, 2 cores: <= 5 s per steady round and >= 40x the Flower engine's rate;
1,000,000 devices on one GPU: <= 10 s.

Both cases run the same experiment, ``simulations/hierarchy-vs-flat.toml`` (digits MLP, IID shares of
scikit-learn's digits, x86-gateway profiles, 10 local steps of batch 32, seed 0), through Flower's
simulation engine with the real agent ClientApp code, each in its own Python process:

* ``hierarchy``: ``hyprstream.sim.harness.run`` -- a core Flight server and one FogAggregator per fog
  inside the ServerApp; consistency ``eventual`` (10 fogs push in one step);
* ``flat``: ``hyprstream.sim.flat.run_flat`` -- Flower's own FedAvg over all the agents.

Reported per case: wall seconds of each round (from the run's own ``metrics.parquet``: the first
round includes Ray's start-up), the steady-state seconds per round (mean of the rounds after the
first), final accuracy, uplink bytes; and memory: the peak resident set of the whole process tree
(the case's process plus Ray's processes, sampled every 0.5 s with psutil) and ``getrusage`` of the
case's process and of its waited-for children. Target (issue): hierarchy steady-state time per round
<= 1.2x the flat baseline's.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import base_parser, emit, finish, header  # noqa: E402

CASES = ("hierarchy", "flat")
ENGINE_CASES = ("batched", "flower")


def fleet_experiment(engine: str, fogs: int, agents_per_fog: int, rounds: int):
    """``simulations/fleet-100k.toml`` at the given size, on ``engine``."""
    from dataclasses import replace

    from hyprstream.sim.experiment import Engine, load_experiment

    exp = load_experiment(Path(__file__).resolve().parents[1] / "simulations" / "fleet-100k.toml")
    return replace(exp, fleet=replace(exp.fleet, fogs=fogs, agents_per_fog=agents_per_fog),
                   training=replace(exp.training, global_steps=rounds),
                   runtime=replace(exp.runtime, engine=Engine(engine), round_timeout_s=1800.0))


def experiment(fogs: int, agents_per_fog: int, rounds: int):
    """``simulations/hierarchy-vs-flat.toml`` at the given size."""
    from dataclasses import replace

    from hyprstream.sim.experiment import load_experiment

    exp = load_experiment(Path(__file__).resolve().parents[1] / "simulations" / "hierarchy-vs-flat.toml")
    return replace(exp, fleet=replace(exp.fleet, fogs=fogs, agents_per_fog=agents_per_fog),
                   training=replace(exp.training, global_steps=rounds))


def _tree_rss() -> int:
    import psutil

    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_case(case: str, fogs: int, agents_per_fog: int, rounds: int) -> dict:
    """One case in this process; returns its figures."""
    import pyarrow.parquet as pq

    os.environ.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})
    exp = fleet_experiment(case, fogs, agents_per_fog, rounds) if case in ENGINE_CASES else \
        experiment(fogs, agents_per_fog, rounds)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss())
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        out = Path(tmp)
        started = time.monotonic()
        if case != "flat":
            from hyprstream.sim.harness import run

            result = run(exp, out)
        else:
            from hyprstream.sim.flat import run_flat

            result = run_flat(exp, out)
        total = time.monotonic() - started
        table = pq.read_table(out / "metrics.parquet").to_pylist()
        rows = [r for r in table if r["kind"] == "global"]
        if case in ENGINE_CASES:  # alive and doing the work: every fog with a contributor had its push committed
            fog_rounds = [r for r in table if r["kind"] == "fog_round"]
            lost = [r for r in fog_rounds if r["participants"] and r["version"] is None]
            if len(rows) != rounds or lost or not all(r["participants"] for r in rows):
                raise SystemExit(f"{case}: {len(rows)} of {rounds} rounds, {len(lost)} fog round(s) not committed")
    stop.set()
    sampler.join()
    walls = [r["wall_s"] for r in rows]
    per_round = [walls[0]] + [b - a for a, b in zip(walls, walls[1:])]
    steady = per_round[1:]
    return {
        "case": case, "agents": exp.num_agents, "engine": exp.runtime.engine.value,
        "devices_per_s": (sum(r["participants"] for r in rows[1:]) / sum(steady)) if steady else None, "fogs": fogs if case != "flat" else 0, "rounds": len(rows),
        "round_s": per_round, "steady_s_per_round": sum(steady) / len(steady) if steady else None,
        "total_s": total, "final_accuracy": result.final_accuracy,
        "participants": [r["participants"] for r in rows], "bytes_up": sum(r["bytes_up"] for r in rows),
        "peak_tree_rss_mb": peak[0] / 2**20,
        "maxrss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "maxrss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def main() -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--case", choices=CASES + ENGINE_CASES, help=argparse_hidden())
    p.add_argument("--fogs", type=int, default=None)
    p.add_argument("--agents-per-fog", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--engines", action="store_true", help="the batched engine vs the Flower engine (fleet-100k)")
    p.add_argument("--flower-agents-per-fog", type=int, default=None,
                   help="--engines: the Flower engine's agents per fog (default 100; 0: skip it)")
    args = p.parse_args()
    fogs = args.fogs or (2 if args.quick else 10)
    per_fog = args.agents_per_fog or ((50 if args.engines else 5) if args.quick else (1000 if args.engines else 100))
    if args.rounds < 2:
        p.error("--rounds must be >= 2 (steady state is the rounds after the first)")
    if args.case:  # a child: one case, its figures as one JSON line
        print("CASE " + json.dumps(run_case(args.case, fogs, per_fog, args.rounds)), flush=True)
        return 0
    if args.engines:
        flower = args.flower_agents_per_fog if args.flower_agents_per_fog is not None else (5 if args.quick else 100)
        return engines(fogs, per_fog, flower, args.rounds)
    header(f"Simulator: {fogs} fogs x {per_fog} agents vs flat FedAvg, {args.rounds} rounds")
    results = {}
    for case in CASES:
        r = child(case, fogs, per_fog, args.rounds)
        if r is None:
            return 1
        results[case] = r
    ratio = results["hierarchy"]["steady_s_per_round"] / results["flat"]["steady_s_per_round"]
    print(f"steady-state time per round, hierarchy / flat: {ratio:.2f} (target <= 1.2: "
          f"{'met' if ratio <= 1.2 else 'not met'})")
    emit({"fogs": fogs, "agents_per_fog": per_fog, "rounds": args.rounds, "ratio": ratio, **results})
    return 0


def child(case: str, fogs: int, per_fog: int, rounds: int) -> dict | None:
    """One case in its own process; its figures, printed (None when it failed, with its error)."""
    cmd = [sys.executable, __file__, "--case", case, "--fogs", str(fogs), "--agents-per-fog", str(per_fog),
           "--rounds", str(rounds)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("CASE ")]
    if proc.returncode != 0 or not lines:
        print(proc.stderr[-3000:], file=sys.stderr)
        print(f"case {case} failed (exit {proc.returncode})", file=sys.stderr)
        return None
    r = json.loads(lines[-1].removeprefix("CASE "))
    rate = f"; {r['devices_per_s']:,.0f} devices/s" if r.get("devices_per_s") else ""
    print(f"{case:>9}: {r['agents']:,} agents; rounds {', '.join(f'{s:.1f}' for s in r['round_s'])} s; steady "
          f"{r['steady_s_per_round']:.2f} s/round{rate}; accuracy {r['final_accuracy']:.4f}; uplink "
          f"{r['bytes_up']:,} B; peak RSS (process tree) {r['peak_tree_rss_mb']:.0f} MB, "
          f"self {r['maxrss_self_mb']:.0f} MB, largest child {r['maxrss_children_mb']:.0f} MB", flush=True)
    return r


def engines(fogs: int, per_fog: int, flower_per_fog: int, rounds: int) -> int:
    """The batched engine at ``fogs`` x ``per_fog`` devices against the Flower engine at ``fogs`` x
    ``flower_per_fog`` (skipped at 0), one after the other, each in its own process."""
    import torch

    where = f"CUDA ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "CPU"
    header(f"Simulator engines: fleet-100k, batched {fogs} x {per_fog:,} devices ({where}) vs the Flower engine "
           f"{fogs} x {flower_per_fog:,}, {rounds} rounds")
    results = {}
    for case, size in (("batched", per_fog), ("flower", flower_per_fog)):
        if size:
            r = child(case, fogs, size, rounds)
            if r is None:
                return 1
            results[case] = r
    b = results["batched"]
    seconds = b["steady_s_per_round"]
    target = 5.0 if b["agents"] <= 10_000 else 10.0
    print(f"batched: {seconds:.2f} s per steady round of {b['agents']:,} devices (target <= {target:g} s: "
          f"{'met' if seconds <= target else 'not met'})")
    ratio = None
    if "flower" in results:
        ratio = b["devices_per_s"] / results["flower"]["devices_per_s"]
        print(f"devices trained per second, batched / Flower engine: {ratio:.1f}x (target >= 40x: "
              f"{'met' if ratio >= 40 else 'not met'})")
    return finish({"fogs": fogs, "rounds": rounds, "ratio": ratio, "device": where, **results})


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
