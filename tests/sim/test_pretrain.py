"""The shared model's start (``[pretrain]``): a public slice no device holds, the same start for every kind of run."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from hyprstream.learning.task import Dataset, get_task
from hyprstream.learning.trainer import evaluate, load_weights, model_weights
from hyprstream.errors import ConfigError
from hyprstream.sim.experiment import load_experiment
from hyprstream.sim.harness import prepare_run
from hyprstream.sim.pretrain import START_FILE, describe, initial_state, split_public

ROOT = Path(__file__).resolve().parents[2]


def _quickstart(public: int, steps: int = 60):
    exp = load_experiment(ROOT / "simulations" / "quickstart.toml")
    return replace(exp, pretrain=replace(exp.pretrain, public_samples=public, steps=steps))


@pytest.mark.unit
def test_public_slice_is_disjoint_complete_and_seeded():
    x = np.arange(1000).reshape(-1, 1)
    data = Dataset(x, np.arange(1000) % 10)
    public, rest = split_public(data, 150, seed=3)
    assert len(public) == 150 and len(rest) == 850
    ids = np.concatenate([public.x[:, 0], rest.x[:, 0]])
    np.testing.assert_array_equal(np.sort(ids), np.arange(1000))  # every sample in exactly one part
    np.testing.assert_array_equal(split_public(data, 150, seed=3)[0].x, public.x)  # same seed, same slice
    assert not np.array_equal(split_public(data, 150, seed=4)[0].x, public.x)
    np.testing.assert_array_equal(public.y, public.x[:, 0] % 10)  # labels travel with their samples
    for bad in (0, 1000, 5000):
        with pytest.raises(ConfigError, match="public_samples"):
            split_public(data, bad, seed=0)


@pytest.mark.unit
def test_no_pretrain_is_the_seeded_initialisation():
    exp = _quickstart(0)
    task = get_task(exp.task.name)
    train, _ = task.load_reference_data(exp.seed)
    start = initial_state(exp, task, train)
    expected = model_weights(task.build_model(seed=exp.seed))
    assert start.train is train and start.public_samples == 0 and start.accuracy is None
    assert start.weights.keys() == expected.keys()
    for name, w in expected.items():
        np.testing.assert_array_equal(start.weights[name], w)


@pytest.mark.unit
def test_pretrained_start_is_reproducible_and_better_than_random():
    exp = _quickstart(400)
    task = get_task(exp.task.name)
    train, test = task.load_reference_data(exp.seed)
    test = task.from_table(task.to_table(test))
    a = initial_state(exp, task, train, test)
    b = initial_state(exp, task, train, test)
    for name in a.weights:
        np.testing.assert_array_equal(a.weights[name], b.weights[name])
    assert len(a.train) == len(train) - 400
    model = task.build_model(seed=exp.seed)
    _, random_acc = evaluate(task, model, test)
    load_weights(model, a.weights)
    assert evaluate(task, model, test)[1] == pytest.approx(a.accuracy)
    assert a.accuracy > random_acc + 0.3


@pytest.mark.unit
def test_devices_get_no_public_sample_and_the_report_says_so(tmp_path):
    exp = _quickstart(300, steps=20)
    prep = prepare_run(exp, tmp_path)
    task = get_task(exp.task.name)
    train, _ = task.load_reference_data(exp.seed)
    public, _ = split_public(train, 300, exp.seed)
    assert sum(prep.sizes) == len(train) - 300
    from hyprstream.agent.client_app import device_name
    from hyprstream.store import Store

    held = []
    for i in range(exp.num_agents):
        with Store.open(tmp_path / "devices" / device_name(i)) as store:
            held.append(task.from_table(store.read(task.table)).x)
    held = np.concatenate(held)
    pub = task.from_table(task.to_table(public)).x
    # no public image is among the devices' samples (digits has a few exact duplicates: compare counts)
    rows = {r.tobytes() for r in pub}
    assert sum(r.tobytes() in rows for r in held) <= sum(
        r.tobytes() in rows for r in task.from_table(task.to_table(Dataset(train.x, train.y))).x) - 300
    assert "300 public samples that no device holds" in describe(tmp_path)
    assert (tmp_path / START_FILE).exists()


@pytest.mark.unit
def test_public_slice_larger_than_the_data_is_a_config_error():
    exp = _quickstart(10_000_000)
    task = get_task(exp.task.name)
    train, _ = task.load_reference_data(exp.seed)
    with pytest.raises(ConfigError, match="public_samples must be between 1 and"):
        initial_state(exp, task, train)
