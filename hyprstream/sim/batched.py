"""Local training of many simulated devices in one pass: per-device copies of the trained layers, stacked,
trained together with ``torch.func`` (``functional_call`` under ``vmap``) and a per-device Adam.

Each device trains exactly as :func:`hyprstream.learning.trainer.train_layers` trains it, alone: the same
minibatches (drawn from a generator seeded with the device's seed, ``min(batch_size, n)`` rows each, with
replacement), the task's (class-weighted mean) loss, Adam with torch's defaults and the given learning
rate, only the requested layer groups trained. The per-device deltas come back as one matrix per
parameter (devices first), so that what aggregates them can treat a fleet's deltas as arrays rather
than as one Python object per device. ``tests/sim/test_batched.py`` checks the equivalence against
``train_layers``, device by device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hyprstream.errors import ValidationError
from hyprstream.learning.task import Dataset, Task

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, as train_layers uses it
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class BatchedResult:
    """Per-device outcome of :func:`train_devices`: ``delta[name]`` has the devices along its first axis."""

    delta: dict[str, np.ndarray]
    loss: np.ndarray  # each device's mean training loss over its steps
    steps: int
    num_examples: np.ndarray


def batch_indices(n: int, steps: int, batch_size: int, seed: int):
    """The rows ``train_layers`` draws for a device of ``n`` examples: ``steps`` x ``min(batch_size, n)``
    indices from a generator seeded with ``seed`` (one draw of all of them gives the same stream as one
    draw per step: tested)."""
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, n, (steps, min(batch_size, n)), generator=gen)


def train_devices(task: Task, weights: Mapping[str, np.ndarray], layers: Sequence[str], datasets: Sequence[Dataset],
                  *, steps: int, batch_size: int, lr: float, seeds: Sequence[int], device: str = "cpu",
                  chunk: int = 4096) -> BatchedResult:
    """Train ``layers`` of the task's model, starting from ``weights``, on each of ``datasets`` (one per
    device, with ``seeds[i]`` for device ``i``) for ``steps`` steps; ``chunk`` devices at a time."""

    from hyprstream.learning.trainer import load_weights, params_of

    if len(datasets) != len(seeds):
        raise ValidationError(f"{len(datasets)} datasets but {len(seeds)} seeds")
    if steps < 1 or batch_size < 1:
        raise ValidationError("steps and batch_size must be >= 1")
    empty = [i for i, d in enumerate(datasets) if len(d) == 0]
    if empty:
        raise ValidationError(f"no local training data on device(s) {empty[:5]}")
    model = task.build_model(seed=0)
    load_weights(model, weights)
    known = set(task.layer_groups(model))
    unknown = [layer for layer in layers if layer not in known]
    if unknown:
        raise ValidationError(f"unknown layer group(s) {unknown} (model has {sorted(known)})")
    model.to(device).train()
    trained = sorted(params_of(task, model, layers))
    deltas: dict[str, list[np.ndarray]] = {name: [] for name in trained}
    losses: list[np.ndarray] = []
    for lo in range(0, len(datasets), chunk):
        part = _train_chunk(task, model, trained, datasets[lo:lo + chunk], seeds[lo:lo + chunk], steps=steps,
                            batch_size=batch_size, lr=lr, device=device)
        for name in trained:
            deltas[name].append(part[0][name])
        losses.append(part[1])
    return BatchedResult({n: np.concatenate(v) for n, v in deltas.items()}, np.concatenate(losses), steps,
                         np.array([len(d) for d in datasets]))


def _train_chunk(task: Task, model, trained: list[str], datasets: Sequence[Dataset], seeds: Sequence[int], *,
                 steps: int, batch_size: int, lr: float, device: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    import torch
    from torch.func import functional_call, grad_and_value, vmap

    count = len(datasets)
    fixed = {n: t.detach() for n, t in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()
             if n not in trained}
    start = {n: p.detach() for n, p in model.named_parameters() if n in trained}
    params = {n: p.unsqueeze(0).repeat(count, *([1] * p.dim())).clone() for n, p in start.items()}
    exp_avg = {n: torch.zeros_like(p) for n, p in params.items()}
    exp_avg_sq = {n: torch.zeros_like(p) for n, p in params.items()}

    # every device's rows in one tensor; each step gathers each device's batch from it (padded to the
    # largest batch, the padding masked out of the loss)
    sizes = [len(d) for d in datasets]
    offsets = torch.as_tensor(np.concatenate([[0], np.cumsum(sizes)[:-1]]), dtype=torch.long)
    x_all = torch.as_tensor(np.concatenate([d.x for d in datasets]), device=device)
    y_all = torch.as_tensor(np.concatenate([d.y for d in datasets]), device=device)
    width = min(batch_size, max(sizes))
    rows = torch.zeros((steps, count, width), dtype=torch.long)
    mask = torch.zeros((count, width), dtype=x_all.dtype)
    for i, (n, seed) in enumerate(zip(sizes, seeds)):
        idx = batch_indices(n, steps, batch_size, seed)
        rows[:, i, :idx.shape[1]] = idx + offsets[i]
        mask[i, :idx.shape[1]] = 1.0
    rows, mask = rows.to(device), mask.to(device)
    weight = None if task.class_weights is None else torch.tensor(task.class_weights, dtype=x_all.dtype,
                                                                   device=device)

    def loss_of(p, x, y, m):
        out = functional_call(model, {**fixed, **p}, (x,))
        each = torch.nn.functional.cross_entropy(out, y, reduction="none")
        w = m if weight is None else m * weight[y]
        return (each * w).sum() / w.sum()  # the weighted mean of CrossEntropyLoss over the real rows

    step_fn = vmap(grad_and_value(loss_of))
    beta1, beta2 = ADAM_BETAS
    total = torch.zeros(count, dtype=torch.float64, device=device)
    for t in range(1, steps + 1):
        idx = rows[t - 1]
        grads, loss = step_fn(params, x_all[idx], y_all[idx], mask)
        total += loss.detach().to(torch.float64)
        bc1, bc2_sqrt = 1 - beta1 ** t, (1 - beta2 ** t) ** 0.5
        with torch.no_grad():
            for n, g in grads.items():  # torch.optim.Adam's update (single-tensor form), every device at once
                exp_avg[n].lerp_(g, 1 - beta1)
                exp_avg_sq[n].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (exp_avg_sq[n].sqrt() / bc2_sqrt).add_(ADAM_EPS)
                params[n].addcdiv_(exp_avg[n], denom, value=-lr / bc1)
    delta = {n: (params[n] - start[n].unsqueeze(0)).cpu().numpy() for n in trained}
    return delta, (total / steps).cpu().numpy()


__all__ = ["BatchedResult", "batch_indices", "train_devices"]
