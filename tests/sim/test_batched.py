"""Many devices trained in one pass (``hyprstream.sim.batched``) against the agent's trainer run device by
device: the same minibatches, the same deltas (float tolerance), the same losses."""

from __future__ import annotations

import numpy as np
import pytest

from hyprstream.errors import ValidationError
from hyprstream.learning.task import Dataset, get_task
from hyprstream.learning.trainer import load_weights, model_weights, train_layers
from hyprstream.sim.batched import batch_indices, train_devices

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("n, batch", [(7, 32), (100, 32), (1000, 1)])
def test_one_draw_of_every_batch_is_the_stream_of_one_draw_per_step(n, batch):
    import torch

    gen = torch.Generator().manual_seed(5)
    per_step = torch.stack([torch.randint(0, n, (min(batch, n),), generator=gen) for _ in range(9)])
    assert torch.equal(batch_indices(n, 9, batch, 5), per_step)


def devices_of(task, sizes, seed=0):
    """Shares of the task's reference training data, one per device, of the given sizes, as model input."""
    train, _ = task.load_reference_data(seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train))
    out, lo = [], 0
    for size in sizes:
        idx = order[lo:lo + size]
        out.append(task.from_table(task.to_table(Dataset(train.x[idx], train.y[idx]))))  # as a device decodes it
        lo += size
    return out


# every registered task but text (a pretrained MiniLM: its ONNX and training paths are tested on their own)
@pytest.mark.parametrize("name, layers", [("digits", ("fc2", "head")), ("digits-cnn", None),
                                          ("sensor", None), ("fashion_mnist", None)])
def test_every_device_trains_as_the_agents_trainer_trains_it_alone(name, layers):
    task = get_task(name)
    model = task.build_model(seed=3)
    groups = task.layer_groups(model)
    layers = layers or tuple(groups[-2:])
    start = model_weights(model)
    sizes = [40, 7, 64, 33]  # one device with fewer examples than a batch
    data = devices_of(task, sizes)
    seeds = [11, 12, 13, 14]
    got = train_devices(task, start, layers, data, steps=6, batch_size=16, lr=0.01, seeds=seeds, chunk=3)
    assert got.steps == 6 and list(got.num_examples) == sizes
    for i, (d, seed) in enumerate(zip(data, seeds)):
        alone = task.build_model(seed=0)
        load_weights(alone, start)
        want = train_layers(task, alone, layers, d, steps=6, batch_size=16, lr=0.01, seed=seed)
        assert sorted(want.delta) == sorted(got.delta)
        for param, delta in want.delta.items():
            mine = got.delta[param][i]
            # Adam divides by the root of a running square: where a gradient is ~0, a rounding difference of the
            # two summation orders moves that element's step noticeably, but never by more than a sliver of
            # the largest step Adam takes (lr per step); everywhere else the two agree to float precision
            np.testing.assert_allclose(mine, delta, rtol=0, atol=1e-3 * 0.01 * 6, err_msg=f"{param} device {i}")
            close = np.isclose(mine, delta, rtol=1e-4, atol=2e-6)
            assert close.mean() >= 0.99, f"{param} device {i}: {close.size - close.sum()} elements differ"
            assert np.abs(delta).max() > 0  # it trained
        assert got.loss[i] == pytest.approx(want.loss, rel=1e-5)


def test_bad_requests_are_refused_by_name():
    task = get_task("digits")
    start = model_weights(task.build_model(seed=0))
    data = devices_of(task, [10, 10])
    with pytest.raises(ValidationError, match="unknown layer group"):
        train_devices(task, start, ("nope",), data, steps=1, batch_size=4, lr=0.1, seeds=[1, 2])
    with pytest.raises(ValidationError, match="2 datasets but 1 seeds"):
        train_devices(task, start, ("head",), data, steps=1, batch_size=4, lr=0.1, seeds=[1])
    with pytest.raises(ValidationError, match="no local training data on device"):
        train_devices(task, start, ("head",), [data[0], Dataset(data[0].x[:0], data[0].y[:0])], steps=1,
                      batch_size=4, lr=0.1, seeds=[1, 2])
