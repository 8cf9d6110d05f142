"""Daemon <-> ClientApp hand-off: saved global models, the policy file, and train requests planned by it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from hyprstream.agent.client_app import answer_train
from hyprstream.agent.handoff import (
    POLICY_FILE,
    PolicyState,
    latest_model,
    load_model,
    prune_models,
    read_policy,
    save_model,
    write_policy,
)
from hyprstream.agent.profile import Strategy
from hyprstream.learning.task import Dataset, get_task
from hyprstream.learning.trainer import model_weights
from hyprstream.errors import ValidationError
from hyprstream.protocol import ReplyStatus, TrainRequest
from hyprstream.store import Store

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def test_models_round_trip_and_prune(tmp_path):
    weights = {"fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "fc.bias": np.ones(2, np.float32)}
    assert latest_model(tmp_path, "digits") is None
    for v in (3, 10, 7):
        assert save_model(tmp_path, "digits", v, weights) is not None
    assert save_model(tmp_path, "digits", 7, weights) is None  # already there
    version, path = latest_model(tmp_path, "digits")
    assert version == 10 and path.name == "v10.arrow"
    back = load_model(path)
    assert set(back) == set(weights) and all(np.array_equal(back[k], weights[k]) for k in weights)
    assert [p.name for p in prune_models(tmp_path, "digits", keep=2)] == ["v3.arrow"]
    with pytest.raises(ValidationError):
        save_model(tmp_path, "../x", 1, weights)


def test_policy_file(tmp_path):
    assert read_policy(tmp_path) is None
    state = PolicyState(Strategy.HYBRID, 1000.0, 45.0, False, "CPU 60% > 50%", "/etc/p.toml")
    write_policy(tmp_path, state)
    assert read_policy(tmp_path) == state
    assert state.fresh(now=1045.0) and not state.fresh(now=1045.1)
    (tmp_path / POLICY_FILE).write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValidationError):
        read_policy(tmp_path)


@pytest.fixture()
def device(tmp_path):
    task = get_task("digits")
    train, _ = task.load_reference_data(seed=0)
    path = tmp_path / "store"
    with Store.open(path, create=True) as store:
        store.create_table(task.table, task.schema)
        store.append(task.table, task.to_table(Dataset(train.x[:100], train.y[:100])))
    return task, path, tmp_path / "state"


class Context:
    def __init__(self, store, state):
        self.node_config = {"store-dir": str(store), "state-dir": str(state)}


def request(task, **over):
    fields = dict(model="m", model_version=4, task="digits", layers=("fc1", "fc2", "head"), local_steps=500,
                  batch_size=64, lr=0.01, seed=1, weights=model_weights(task.build_model(seed=3)))
    return TrainRequest(**{**fields, **over})


def set_strategy(state_dir, strategy, *, age_s=0.0):
    state_dir.mkdir(parents=True, exist_ok=True)
    write_policy(state_dir, PolicyState(strategy, time.time() - age_s, 45.0, False, "test",
                                        str(ROOT / "firmware-configs" / "rpi4.toml")))


def test_train_requests_follow_the_daemons_strategy(device):
    task, store, state = device
    ctx = Context(store, state)
    # no policy file yet: declined, but the global model is kept for inference
    reply = answer_train(request(task).to_content(), ctx)
    assert reply.status is ReplyStatus.DECLINED and "not published" in reply.reason
    assert latest_model(state, "digits")[0] == 4
    set_strategy(state, Strategy.MINIMAL)
    reply = answer_train(request(task).to_content(), ctx)
    assert reply.status is ReplyStatus.DECLINED and "minimal" in reply.reason
    # rpi4 profile: hybrid trains 1 layer group, batch 8, at most 20 steps, on the CPU
    set_strategy(state, Strategy.HYBRID)
    reply = answer_train(request(task).to_content(), ctx)
    assert reply.status is ReplyStatus.OK and reply.layers == ("head",) and reply.steps == 20
    assert set(reply.delta) == {"head.weight", "head.bias"}
    set_strategy(state, Strategy.FULL)
    reply = answer_train(request(task, local_steps=5).to_content(), ctx)
    assert reply.layers == ("fc1", "fc2", "head") and reply.steps == 5 and len(reply.delta) == 6
    # a daemon that stopped writing its state: declined
    set_strategy(state, Strategy.FULL, age_s=120.0)
    reply = answer_train(request(task).to_content(), ctx)
    assert reply.status is ReplyStatus.DECLINED and "stale" in reply.reason
