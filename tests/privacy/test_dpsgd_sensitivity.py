"""The sensitivity DP-SGD's accountant assumes: adding or removing one example changes a step's clipped,
un-noised gradient sum by at most the clip bound C, for every registered task and both clip engines.

A loss whose reduction couples the examples (a class-weighted mean divides by the batch's sum of
weights) breaks it: every other example's term is rescaled. The sum is taken through
:func:`hyprstream.privacy.dpsgd.clipping`, the hook both engines' steps use.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("opacus")

import torch  # noqa: E402

from hyprstream.learning.task import get_task, task_names  # noqa: E402
from hyprstream.privacy.dpsgd import ClipEngine, clipping  # noqa: E402
from hyprstream.privacy.per_sample import LinearClipper  # noqa: E402

pytestmark = pytest.mark.unit

ENGINES = (ClipEngine.OPACUS, ClipEngine.LINEAR)


@functools.cache
def model_of(name: str):
    """The task's model with dropout off. Dropout is randomness of the mechanism drawn per example: the
    bound holds given the same masks for the examples both batches share, which two batches of
    different sizes do not draw, so the comparison is made without it."""
    model = get_task(name).build_model(seed=0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "dropout_prob", None), float):  # attention dropout of transformers' SDPA
            module.dropout_prob = 0.0
    return model


def trained_layers(task, model, engine: ClipEngine) -> list[str]:
    """Opacus: every layer group of a small model (convolutions included), the top two of a large one;
    the linear engine: the longest run of top layer groups it supports."""
    groups = task.layer_groups(model)
    if engine is ClipEngine.OPACUS:
        return groups if sum(p.numel() for p in model.parameters()) < 10**6 else groups[-2:]
    best = groups[-1:]
    for k in range(1, len(groups) + 1):
        freeze(task, model, groups[-k:])
        if LinearClipper.supports(model):
            best = groups[-k:]
    return best


def freeze(task, model, layers) -> list:
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(task.layer_of(name) in layers)
        if p.requires_grad:
            params.append(p)
    return params


def clipped_sum(task, model, params, x, y, clip: float, engine: ClipEngine) -> np.ndarray:
    with clipping(task, model, params, clip, engine) as run:
        sums, _ = run(torch.as_tensor(x), torch.as_tensor(y))
    return torch.cat([s.detach().reshape(-1).double() for s in sums]).numpy()


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.value)
@pytest.mark.parametrize("name", task_names())
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), size=st.integers(2, 16), clip=st.sampled_from([0.05, 1.0, 20.0]),
       data=st.data())
def test_one_example_moves_the_clipped_sum_by_at_most_the_clip_bound(name, engine, seed, size, clip, data):
    task = get_task(name)
    model = model_of(name)
    if sum(p.numel() for p in model.parameters()) >= 10**6:
        size = min(size, 4)  # MiniLM: a few examples per batch keep the test short
    params = freeze(task, model, trained_layers(task, model, engine))
    model.train()
    rng = np.random.default_rng(seed)
    x = task.example_input(size, seed=seed)
    y = rng.integers(0, task.n_classes, size)
    gone = data.draw(st.integers(0, size - 1), label="removed example")
    keep = np.arange(size) != gone
    full = clipped_sum(task, model, params, x, y, clip, engine)
    less = clipped_sum(task, model, params, x[keep], y[keep], clip, engine)
    moved = float(np.linalg.norm(full - less))
    assert moved <= clip * (1 + 1e-4) + 1e-6, f"{name}: one example moved the clipped sum by {moved / clip:.3g} C"


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.value)
def test_removing_the_anomaly_of_a_sensor_batch_moves_the_clipped_sum_by_at_most_c(engine):
    """The measured case: 32 readings, one of them an anomaly (class weight 20), C = 1."""
    task = get_task("sensor")
    model = model_of("sensor")
    params = freeze(task, model, task.layer_groups(model))
    model.train()
    x = task.example_input(32, seed=0)
    y = np.zeros(32, np.int64)
    y[5] = 1
    keep = np.arange(32) != 5
    moved = float(np.linalg.norm(clipped_sum(task, model, params, x, y, 1.0, engine)
                                 - clipped_sum(task, model, params, x[keep], y[keep], 1.0, engine)))
    assert moved <= 1.0 + 1e-5, f"removing the anomaly moved the clipped sum by {moved:.3g} C"
