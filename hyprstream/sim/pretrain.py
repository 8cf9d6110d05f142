"""Where the shared model starts: its seeded random initialisation, or ``[pretrain]`` on public data.

Devices fine-tune a *shared* model; in practice that model was trained beforehand on data the operator
may use centrally (a public or licensed set). ``[pretrain] public_samples = N`` models this: a seeded
random slice of N samples of the task's training split is set aside as public data, **no device holds
any of it**, and the task's model (same seed) is trained on it centrally for ``steps`` minibatch steps
with the agents' own trainer (every layer group, Adam). The hierarchical run, the flat baseline and the
centralized reference all start from these same weights and use the same remaining samples, so they
stay comparable (Nguyen et al. 2023, "Where to begin? On the impact of pre-training and initialization
in federated learning", show that such a start narrows the gap that non-IID data opens).

The start is recorded in ``pretrain.json`` in the run folder (samples, steps, held-out accuracy) and
shown in the report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hyprstream.learning.task import Dataset, Task
from hyprstream.errors import ConfigError
from hyprstream.protocol import train_seed

PUBLIC_SEED = 0x5EED  # mixed into the experiment's seed: the public slice does not depend on the partition's draws
START_FILE = "pretrain.json"


@dataclass(frozen=True)
class Start:
    """The initial shared weights, the training samples left for the devices, and how the start was made."""

    weights: dict[str, np.ndarray]
    train: Dataset  # what the devices (and the centralized reference) train on
    public_samples: int = 0
    steps: int = 0
    accuracy: float | None = None  # held-out accuracy of the start, when pretrained


def split_public(train: Dataset, n: int, seed: int) -> tuple[Dataset, Dataset]:
    """``(public, rest)``: a seeded random slice of ``n`` samples and everything else, disjoint."""
    if not 0 < n < len(train):
        raise ConfigError(f"pretrain.public_samples must be between 1 and {len(train) - 1} (the training split "
                          f"has {len(train)} samples), got {n}", key="pretrain.public_samples")
    order = np.random.default_rng([seed, PUBLIC_SEED]).permutation(len(train))
    public, rest = np.sort(order[:n]), np.sort(order[n:])
    return Dataset(train.x[public], train.y[public]), Dataset(train.x[rest], train.y[rest])


def initial_state(exp, task: Task, train: Dataset, test: Dataset | None = None) -> Start:
    """The experiment's starting weights and the devices' training data (see the module docstring).

    ``train`` is the task's reference training split as loaded (``Task.load_reference_data``);
    ``test``, if given, is in model-input form (``Task.from_table``) and scores the start.
    """
    from hyprstream.learning.trainer import evaluate, model_weights, train_layers

    model = task.build_model(seed=exp.seed)
    pre = exp.pretrain
    if pre.public_samples == 0:
        return Start(model_weights(model), train)
    import torch

    public, rest = split_public(train, pre.public_samples, exp.seed)
    public = task.from_table(task.to_table(public))  # train on what a store would give back, as devices do
    threads = torch.get_num_threads()
    torch.set_num_threads(exp.runtime.torch_threads)  # as the agents train: same results on any machine
    try:
        train_layers(task, model, tuple(task.layer_groups(model)), public, steps=pre.steps,
                     batch_size=pre.batch_size, lr=pre.lr, seed=train_seed(exp.seed, 0, PUBLIC_SEED))
    finally:
        torch.set_num_threads(threads)
    accuracy = evaluate(task, model, test)[1] if test is not None else None
    return Start(model_weights(model), rest, pre.public_samples, pre.steps, accuracy)


def record(start: Start, out: Path) -> None:
    """Write ``pretrain.json`` into the run folder (nothing for a randomly initialised start)."""
    if start.public_samples:
        (out / START_FILE).write_text(json.dumps({"public_samples": start.public_samples, "steps": start.steps,
                                                  "accuracy": start.accuracy}, indent=2) + "\n")


def describe(out: Path) -> str | None:
    """The report's line about the start, from ``pretrain.json`` (None when the run started from scratch)."""
    path = out / START_FILE
    if not path.exists():
        return None
    s = json.loads(path.read_text())
    acc = f"; held-out accuracy {s['accuracy']:.4f} before any device trained" if s.get("accuracy") is not None else ""
    return (f"- Start: the shared model pretrained on {s['public_samples']:,} public samples that no device holds, "
            f"{s['steps']} steps{acc}")


__all__ = ["START_FILE", "Start", "describe", "initial_state", "record", "split_public"]
