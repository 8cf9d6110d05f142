"""Local training of selected layer groups (torch). Frozen layers get no gradients at all."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hyprstream.learning.task import Dataset, Task
from hyprstream.errors import ValidationError


@dataclass(frozen=True)
class TrainResult:
    delta: dict[str, np.ndarray]
    loss: float
    steps: int
    num_examples: int


def load_weights(model, weights: Mapping[str, np.ndarray]) -> None:
    """Copy ``weights`` into ``model``; every parameter and buffer must be present with its shape."""
    import torch

    state = model.state_dict()
    missing = sorted(set(state) - set(weights))
    unknown = sorted(set(weights) - set(state))
    if missing or unknown:
        raise ValidationError(f"weights do not fit the model: missing {missing}, unknown {unknown}")
    for name, tensor in state.items():
        value = np.asarray(weights[name])
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValidationError(f"{name}: shape {value.shape} differs from the model's {tuple(tensor.shape)}")
    model.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in weights.items()})


def model_weights(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def prepare_layers(task: Task, model, layers: Sequence[str], data: Dataset, device: str):
    """Check the request, move ``model`` to ``device`` and freeze every parameter outside ``layers``
    (frozen layers get no gradients); returns the trainable parameters and a copy of their values."""
    if len(data) == 0:
        raise ValidationError("no local training data")
    known = set(task.layer_groups(model))
    unknown = [layer for layer in layers if layer not in known]
    if unknown:
        raise ValidationError(f"unknown layer group(s) {unknown} (model has {sorted(known)})")
    model.to(device)
    trainable = params_of(task, model, layers)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return trainable, {n: p.detach().clone() for n, p in trainable.items()}


def params_of(task: Task, model, layers: Sequence[str]) -> dict[str, object]:
    groups = set(layers)
    return {n: p for n, p in model.named_parameters() if task.layer_of(n) in groups}


def train_layers(task: Task, model, layers: Sequence[str], data: Dataset, *, steps: int, batch_size: int,
                 lr: float, seed: int, device: str = "cpu", max_seconds: float | None = None) -> TrainResult:
    """Train only ``layers`` of ``model`` for ``steps`` minibatch steps; returns the delta of those layers.

    With ``max_seconds``, training stops early (after at least one step) once that much time has
    passed; ``TrainResult.steps`` says how many steps ran.
    """
    import time

    import torch

    trainable, before = prepare_layers(task, model, layers, data, device)
    opt = torch.optim.Adam(list(trainable.values()), lr=lr)
    loss_fn = task.loss().to(device)  # a loss with class weights holds a tensor
    x = torch.as_tensor(data.x, device=device)
    y = torch.as_tensor(data.y, device=device)
    gen = torch.Generator().manual_seed(seed)
    n = len(data)
    model.train()
    losses = []
    started = time.monotonic()
    for _ in range(steps):
        if losses and max_seconds is not None and time.monotonic() - started >= max_seconds:
            break
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(device)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    delta = {n: (p.detach() - before[n]).cpu().numpy() for n, p in trainable.items()}
    return TrainResult(delta, float(torch.stack(losses).mean().cpu()), len(losses), n)


def evaluate(task: Task, model, data: Dataset, *, device: str = "cpu", batch_size: int = 1024) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` on ``data``."""
    import torch

    model.to(device).eval()
    loss_fn = task.loss().to(device)
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            x = torch.as_tensor(data.x[start:start + batch_size], device=device)
            y = torch.as_tensor(data.y[start:start + batch_size], device=device)
            out = model(x)
            total_loss += float(loss_fn(out, y)) * len(y)
            correct += int((out.argmax(dim=1) == y).sum())
    return total_loss / len(data), correct / len(data)
