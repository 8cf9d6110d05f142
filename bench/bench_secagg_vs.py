"""The secure round of this checkout against the secure round of an earlier commit, in alternating processes.

    python bench/bench_secagg_vs.py                      # against d809dfa: 3 pairs of processes, 8 rounds each
    python bench/bench_secagg_vs.py --baseline REV --pairs 4 --repeats 5 --warmup 1
    python bench/bench_secagg_vs.py --quick              # K = 10, n = 2,000 against HEAD: a smoke run

What is timed: ``SecureFogAggregator.run_round`` for K = 100 clients whose layer-wise delta has
n = 100,000 float32 parameters, the clients answering one after another over the in-process
``LoopbackGrid`` (as case (secure) of ``bench_privacy.py``, whose helpers each side imports from its own
checkout): setup, share, mask, (consistency,) unmask, decode, mean, push to an in-memory core.

The baseline is another commit's code, so it cannot run in this process: the baseline revision is
checked out into a temporary ``git worktree`` (removed at the end), and each *pair* starts one process
per checkout. Each process builds its deployment (a CA and a certified identity per client where its
code has them) and checks that one secure round gives the exact mean within one quantization step;
then the two processes take turns, one round each, ``--warmup`` untimed rounds and ``--repeats`` timed
ones (interleaved round by round, as bench/README.md asks, so that a burst of load hits both sides
alike), the side that goes first alternating from pair to pair. The warm-up matters to the head side:
a client remembers the static agreements with the neighbours it has met, so its first rounds with a
fresh fog cost more than its steady ones (see ``--warmup``).

Reported: each pair's median rounds; the ratio head / base of the median round over all processes
(the figure), of the fastest rounds, and the spread of each head round over the base round next to it.
The default baseline d809dfa is the secure round before the consistency round (threshold half the
neighbourhood, no certified identities); the target is head / base <= 1.25.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TARGET = 1.25


def child(checkout: str, k: int, n: int, seed: int) -> None:
    """One side's process: the secure round of the code in ``checkout``, timed."""
    sys.path[:0] = [checkout, os.path.join(checkout, "bench")]
    for name in [m for m in sys.modules if m == "hyprstream" or m.startswith("hyprstream.")]:
        del sys.modules[name]
    import functools
    import logging
    import time
    import warnings

    import bench_privacy as bp
    import numpy as np

    import hyprstream

    if not os.path.abspath(hyprstream.__file__).startswith(os.path.abspath(checkout) + os.sep):
        raise SystemExit(f"imported {hyprstream.__file__}, not the code of {checkout}")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    logging.getLogger("hyprstream").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from hyprstream.fog.aggregator import FogAggregator, RoundPlan
    from hyprstream.privacy.config import SecAggConfig
    from hyprstream.privacy.noise import SeededRandom
    from hyprstream.privacy.quantize import Quantizer
    from hyprstream.privacy.secagg import plan_graph

    try:
        from hyprstream.fog.secure import SecureFogAggregator
    except ImportError:  # where it lived before the round engine moved
        from hyprstream.privacy.secagg_workflow import SecureFogAggregator

    rng = np.random.default_rng(seed)
    nodes = list(range(1000, 1000 + k))
    deltas = {}
    for node in nodes:
        v = rng.standard_normal(n)
        deltas[node] = (v * (0.5 / np.linalg.norm(v))).astype(np.float32)
    exact = np.mean([deltas[x].astype(np.float64) for x in nodes], axis=0)
    degree, threshold = plan_graph(k, expected_dropout=0.1)
    plan = RoundPlan(task="bench", layers=(bp.LAYER,), local_steps=1, batch_size=1, lr=0.1, timeout_s=600.0)
    with tempfile.TemporaryDirectory(prefix="bench-secagg-vs-") as tmp:
        identities = bp.certified_identities(tmp, nodes) if hasattr(bp, "certified_identities") else None
        kwargs = {"node_config": identities.__getitem__} if identities else {}
        grid = bp.make_grid(functools.partial(bp.hyprstream_app, deltas), nodes, 0, **kwargs)
        core = bp.StubCore(n)
        fog = FogAggregator("fog-bench", grid, nodes, core, bp.MODEL, plan)
        secure = SecureFogAggregator(fog, SecAggConfig(clip=1.0, stage_timeout_s=600.0), source=SeededRandom(seed))
        r = secure.run_round(1)
        if r.participants != k or r.version is None:
            raise SystemExit(f"the secure round did not aggregate all {k} clients: {r.reasons}")
        err = float(np.abs(core.last[bp.PARAM] - exact).max())
        step = Quantizer.for_clients(clip=1.0, max_clients=k).resolution
        if not err <= step + 1e-6 * np.abs(exact).max():
            raise SystemExit(f"the secure round's mean is off by {err:.3g} (quantization step {step:.3g})")
        print("READY " + json.dumps({"degree": degree, "threshold": threshold, "identities": bool(identities),
                                     "max_abs_err": err, "step": step}), flush=True)
        for line in sys.stdin:  # one timed round per "run" line from the parent, until it closes stdin
            if line.strip() != "run":
                raise SystemExit(f"unexpected command {line.strip()!r}")
            t0 = time.perf_counter()
            r = secure.run_round(2)
            dt = time.perf_counter() - t0
            if r.participants != k or r.version is None:
                raise SystemExit(f"a timed round aggregated {r.participants} of {k} clients: {r.reasons}")
            print(f"SECONDS {dt!r}", flush=True)
        grid.close()


class Side:
    """One checkout's process, set up and waiting: :meth:`round` has it run one timed secure round."""

    def __init__(self, name: str, checkout: str, args) -> None:
        self.name, self.checkout = name, checkout
        cmd = [sys.executable, os.path.abspath(__file__), "--child", checkout, "-K", str(args.clients),
               "-n", str(args.size), "--seed", str(args.seed)]
        env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", FLWR_LOG_LEVEL="WARNING")
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.info = json.loads(self._expect("READY "))

    def _expect(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):]
        self.proc.wait()
        raise SystemExit(f"the {self.name} process ({self.checkout}) stopped (exit {self.proc.returncode}):\n"
                         f"{self.proc.stderr.read()[-4000:]}")

    def round(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return float(self._expect("SECONDS "))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default=None,
                   help="the commit to compare against (default d809dfa; with --quick, HEAD: the machinery only)")
    p.add_argument("--pairs", type=int, default=3, help="pairs of processes, one of each side (default 3)")
    p.add_argument("--repeats", type=int, default=8, help="timed rounds per process (default 8)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds per process first (default 3)")
    p.add_argument("-K", "--clients", type=int, default=100)
    p.add_argument("-n", "--size", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="K = 10, n = 2,000, one pair: a smoke run")
    p.add_argument("--child", metavar="CHECKOUT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.clients, args.size, args.seed)
        return 0
    if args.quick:
        args.clients, args.size, args.pairs, args.repeats, args.warmup = 10, 2_000, 1, 3, 1
    args.baseline = args.baseline or ("HEAD" if args.quick else "d809dfa")
    if min(args.pairs, args.repeats) < 1 or args.warmup < 0:
        p.error("--pairs and --repeats must be >= 1, --warmup >= 0")

    sys.path.insert(0, HERE)
    from _common import header, machine_info

    header(f"Secure round: this checkout against {args.baseline}")
    head_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
    print(f"head:    {head_rev}{' + uncommitted changes' if dirty else ''} (this checkout)")
    print(f"base:    {args.baseline}; K={args.clients}, n={args.size}, {args.pairs} pair(s) of processes, "
          f"{args.warmup} warm-up + {args.repeats} timed rounds each, alternating round by round; clients serial")
    samples: dict[str, list[list[float]]] = {"base": [], "head": []}
    info: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tmp:
        base = os.path.join(tmp, "checkout")
        subprocess.run(["git", "worktree", "add", "--detach", "--quiet", base, args.baseline], cwd=ROOT, check=True)
        try:
            print(f"\n{'pair':>4s} {'base s':>8s} {'head s':>8s} {'head/base':>9s}  (medians of the timed rounds)")
            for i in range(args.pairs):
                sides = [Side("base", base, args), Side("head", ROOT, args)]
                try:
                    if i % 2:
                        sides.reverse()  # which side goes first alternates from pair to pair
                    got: dict[str, list[float]] = {s.name: [] for s in sides}
                    for r in range(args.warmup + args.repeats):
                        for side in sides:
                            dt = side.round()
                            if r >= args.warmup:
                                got[side.name].append(dt)
                    for side in sides:
                        samples[side.name].append(got[side.name])
                        info[side.name] = side.info
                finally:
                    for side in sides:
                        side.close()
                b, h = statistics.median(got["base"]), statistics.median(got["head"])
                print(f"{i + 1:4d} {b:8.3f} {h:8.3f} {h / b:8.2f}x", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", base], cwd=ROOT, check=False)
    for s in ("base", "head"):
        print(f"{s}: degree k={info[s]['degree']}, threshold t={info[s]['threshold']}, certified identities: "
              f"{info[s]['identities']}; checked: max |err| {info[s]['max_abs_err']:.2e} (step {info[s]['step']:.2e})")
    every = {s: [x for run in samples[s] for x in run] for s in samples}
    med = {s: statistics.median(every[s]) for s in every}
    low = {s: min(every[s]) for s in every}
    rounds = [h / b for bs, hs in zip(samples["base"], samples["head"]) for b, h in zip(bs, hs)]
    ratio = med["head"] / med["base"]
    print(f"\nmedian round over all processes: base {med['base']:.3f} s, head {med['head']:.3f} s")
    print(f"head / base secure round: {ratio:.2f}x (target <= {TARGET}x: {'met' if ratio <= TARGET else 'NOT met'})")
    print(f"  fastest rounds: {low['head'] / low['base']:.2f}x; round by round (each head round over the base round "
          f"next to it): median {statistics.median(rounds):.2f}x, quartiles {_quartiles(rounds)}")
    print("RESULT " + json.dumps({"machine": machine_info(), "benchmark": "secagg_vs", "baseline": args.baseline,
                                  "head": head_rev + ("+dirty" if dirty else ""), "samples": samples, "plans": info,
                                  "ratio_of_medians": ratio, "ratio_of_fastest": low["head"] / low["base"],
                                  "round_ratios": rounds}, sort_keys=True))
    return 0


def _quartiles(values: list[float]) -> str:
    if len(values) < 2:
        return "-"
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"{q1:.2f}-{q3:.2f}x"


if __name__ == "__main__":
    raise SystemExit(main())
