"""Local training of a fleet in one pass (``hyprstream.sim.batched.train_devices``) against the agent's trainer
run device after device (``hyprstream.learning.trainer.train_layers``).

    python bench/bench_batched.py             # 1,000 devices (both ways) and 10,000 (batched only)
    python bench/bench_batched.py --quick     # 50 devices, 10 steps: a smoke run
    python bench/bench_batched.py --device cuda --devices 100000 --baseline-devices 1000 --chunk 100000

The digits MLP (the task ``digits``), every layer group trained, 40 local steps of batch 32, Adam with
lr 0.01; each device holds 30 to 150 of scikit-learn's digits (a seeded share) and its own seed.
Checked first: for 8 devices the batched deltas equal ``train_layers``' (float tolerance, as
``tests/sim/test_batched.py``). Timed: the training call (one ``train_devices`` of all the devices; the
``train_layers`` loop over ``--baseline-devices`` of them, a fresh model per device loaded from the same
weights, as a simulated agent does). Reported: seconds, devices per second, the ratio of the two rates.
One torch thread per process unless ``--threads``: the baseline is what one agent actor does per core.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import base_parser, finish, header  # noqa: E402


def fleet(task, count: int, seed: int):
    from hyprstream.learning.task import Dataset

    train, _ = task.load_reference_data(seed)
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(count):
        idx = rng.choice(len(train), size=int(rng.integers(30, 151)), replace=False)
        data.append(Dataset(train.x[idx], train.y[idx]))
    return data


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=None, help="devices trained in one pass (default 1,000 and 10,000)")
    p.add_argument("--baseline-devices", type=int, default=None, help="devices trained one by one (default 1,000)")
    p.add_argument("--steps", type=int, default=None, help="local steps (default 40)")
    p.add_argument("--device", default="cpu", help="torch device of the batched pass (the baseline runs on the CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--chunk", type=int, default=4096, help="devices per vmapped pass (default 4,096)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import torch

    from hyprstream.learning.task import get_task
    from hyprstream.learning.trainer import load_weights, model_weights, train_layers
    from hyprstream.sim.batched import train_devices

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA device here")
    torch.set_num_threads(args.threads)
    steps = args.steps or (10 if args.quick else 40)
    sizes = [args.devices] if args.devices else ([50] if args.quick else [1_000, 10_000])
    base_n = args.baseline_devices or (50 if args.quick else 1_000)
    batch, lr = 32, 0.01
    header("Batched local training of a fleet against the agent's trainer device by device")
    task = get_task("digits")
    model = task.build_model(seed=args.seed)
    layers = tuple(task.layer_groups(model))
    start = model_weights(model)
    data = fleet(task, max(max(sizes), base_n), args.seed)
    seeds = list(range(1000, 1000 + len(data)))
    print(f"task digits (MLP, {sum(v.size for v in start.values()):,} parameters), layers {layers}, {steps} steps "
          f"of batch {batch}, lr {lr}; {args.threads} torch thread(s); batched on {args.device}")

    # correctness first: 8 devices both ways
    check = train_devices(task, start, layers, data[:8], steps=steps, batch_size=batch, lr=lr, seeds=seeds[:8],
                          device=args.device)
    worst = 0.0
    for i in range(8):
        alone = task.build_model(seed=0)
        load_weights(alone, start)
        want = train_layers(task, alone, layers, data[i], steps=steps, batch_size=batch, lr=lr, seed=seeds[i])
        for name, d in want.delta.items():
            diff = float(np.abs(check.delta[name][i] - d).max())
            worst = max(worst, diff)
            if diff > 1e-3 * lr * steps:
                raise SystemExit(f"batched delta of device {i} ({name}) is off by {diff:.3g}: not the same training")
    print(f"check:   8 devices, max |batched - train_layers| {worst:.2e} (bound {1e-3 * lr * steps:.1e})")

    # the baseline: the agent's trainer, device after device
    t0 = time.perf_counter()
    for i in range(base_n):
        alone = task.build_model(seed=0)
        load_weights(alone, start)
        train_layers(task, alone, layers, data[i], steps=steps, batch_size=batch, lr=lr, seed=seeds[i])
    base_s = time.perf_counter() - t0
    base_rate = base_n / base_s
    print(f"\n{'case':44s} {'devices':>9s} {'seconds':>9s} {'devices/s':>11s}")
    print(f"{'train_layers, device after device (baseline)':44s} {base_n:9,d} {base_s:9.2f} {base_rate:11.1f}")
    result: dict = {"benchmark": "batched", "steps": steps, "batch": batch, "threads": args.threads,
                    "device": args.device, "baseline": {"devices": base_n, "seconds": base_s}, "batched": []}
    for count in sizes:
        t0 = time.perf_counter()
        out = train_devices(task, start, layers, data[:count], steps=steps, batch_size=batch, lr=lr,
                            seeds=seeds[:count], device=args.device, chunk=args.chunk)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        if not all(np.isfinite(v).all() and v.shape[0] == count for v in out.delta.values()):
            raise SystemExit("the batched pass returned non-finite or missing deltas")
        rate = count / secs
        print(f"{'train_devices, one pass':44s} {count:9,d} {secs:9.2f} {rate:11.1f}   {rate / base_rate:6.1f}x the baseline's rate")
        result["batched"].append({"devices": count, "seconds": secs, "speedup": rate / base_rate})
    return finish(result)


if __name__ == "__main__":
    raise SystemExit(main())
