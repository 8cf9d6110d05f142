"""The centralized reference (``hyprstream simulate --baseline central``): the same model trained on all data.

The training split that the federated runs partition across devices is kept in one place and the
task's model (same seed, or the same pretrained start: ``[pretrain]``, hyprstream.sim.pretrain) is trained on it with the agents' own trainer
(:func:`~hyprstream.learning.trainer.train_layers`: Adam, the experiment's batch size and learning
rate, every layer group). Each of the ``global_steps`` rounds runs as many minibatch steps as the
whole fleet runs in a federated round (``local_steps`` x number of agents), then the model is
evaluated on the same held-out split. Rows have ``fog = "central"``; nothing is sent, so the byte
columns are 0, and ``sim_s`` is the training time on one reference core of the virtual clock
(:data:`~hyprstream.sim.clock.REFERENCE_FLOPS`). No Flower, no core: this is the accuracy that
federated runs of the same model are measured against.
"""

from __future__ import annotations

import time
from pathlib import Path

from hyprstream.protocol import train_seed
from hyprstream.sim import clock

CENTRAL = "central"


def run_central(exp, out: Path, *, on_step=None):
    """Train ``exp``'s model centrally; writes ``metrics.parquet`` into ``out``."""
    from hyprstream.learning.trainer import load_weights, model_weights, train_layers
    from hyprstream.sim.pretrain import initial_state, record
    from hyprstream.fog.aggregator import FogRound
    from hyprstream.sim.harness import SimulationResult
    from hyprstream.sim.metrics import MetricsLog

    import torch

    from hyprstream.learning.task import get_task

    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(exp.runtime.torch_threads)  # as each simulated agent trains

    task = get_task(exp.task.name)
    train, test = task.load_reference_data(exp.seed)
    # train and evaluate on exactly what devices would decode from their stores
    test = task.from_table(task.to_table(test))
    # the federated runs' start and data: pretrained weights and the samples devices hold ([pretrain])
    start = initial_state(exp, task, train, test)
    record(start, out)
    train = task.from_table(task.to_table(start.train))
    model = task.build_model(seed=exp.seed)
    load_weights(model, start.weights)
    layers = tuple(task.layer_groups(model))
    n_params = sum(p.numel() for p in model.parameters())
    steps = exp.training.local_steps * exp.num_agents
    metrics = MetricsLog()
    sim_s = 0.0
    from hyprstream.learning.trainer import evaluate

    for rnd in range(1, exp.training.global_steps + 1):
        result = train_layers(task, model, layers, train, steps=steps, batch_size=exp.training.batch_size,
                              lr=exp.training.lr, seed=train_seed(exp.seed, rnd))
        sim_s += clock.compute_s(clock.training_flops(n_params, n_params, steps * exp.training.batch_size), 1.0)
        loss, acc = evaluate(task, model, test)
        r = FogRound(fog=CENTRAL, round=rnd, base_version=rnd - 1, version=rnd, layers=layers, participants=1,
                     declined=0, refused=0, failed=0, bytes_up=0, bytes_down=0, train_loss=result.loss, seconds=0.0)
        wall = time.monotonic() - started
        metrics.add_fog_round(r, accuracy=acc, loss=loss, wall_s=wall, sim_s=sim_s)
        row = metrics.add_global(rnd, rnd, accuracy=acc, loss=loss, rounds=[r], wall_s=wall, sim_s=sim_s,
                                 fog=CENTRAL)
        if on_step is not None:
            on_step(rnd, [r], row, None)
    metrics.write_run(out)
    weights = model_weights(model)
    return SimulationResult(out, metrics, exp.training.global_steps, metrics.global_rows()[-1].accuracy, weights)


__all__ = ["CENTRAL", "run_central"]
