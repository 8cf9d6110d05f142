"""The agent's train handler on a real store, and the ClientApp's refusal path."""

import numpy as np
import pytest

from hyprstream.agent.client_app import answer_train, handle_train
from hyprstream.agent.task import get_task
from hyprstream.agent.trainer import model_weights
from hyprstream.protocol import ReplyStatus, TrainReply, TrainRequest
from hyprstream.store import Store

pytestmark = pytest.mark.unit


@pytest.fixture()
def device(tmp_path):
    task = get_task("digits")
    train_set, _ = task.load_reference_data(seed=0)
    from hyprstream.agent.task import Dataset

    path = tmp_path / "device-0000"
    with Store.open(path, create=True) as store:
        store.create_table(task.table, task.schema)
        store.append(task.table, task.to_table(Dataset(train_set.x[:200], train_set.y[:200])))
    return task, path


def request(digits, layers=("fc1",), **over):
    weights = model_weights(digits.build_model(seed=3))
    fields = dict(model="m", model_version=7, task="digits", layers=layers, local_steps=5, batch_size=16,
                  lr=0.01, seed=1, weights=weights)
    return TrainRequest(**{**fields, **over})


def test_trains_only_requested_layers(device):
    task, path = device
    req = request(task, ("fc2",))
    reply = handle_train(req, path)
    assert reply.status is ReplyStatus.OK and reply.model_version == 7
    assert set(reply.delta) == {"fc2.weight", "fc2.bias"}
    assert reply.num_examples == 200 and reply.steps == 5
    assert np.abs(reply.delta["fc2.weight"]).sum() > 0
    # same request, same seed: same delta (reproducible local training)
    again = handle_train(req, path)
    np.testing.assert_array_equal(again.delta["fc2.weight"], reply.delta["fc2.weight"])


class FakeContext:
    def __init__(self, store_dir):
        self.node_config = {"store-dir": str(store_dir)}


@pytest.mark.parametrize("over, reason", [
    ({"layers": ("fc1", "fc9")}, "unknown layer group"),
    ({"task": "weather"}, "unknown task"),
    ({"weights": {"fc1.weight": np.zeros((1, 1), np.float32)}}, "do not fit the model"),
])
def test_clientapp_declines_what_it_cannot_serve(device, over, reason):
    task, path = device
    reply = TrainReply.from_content(answer_train(request(task, **over).to_content(), FakeContext(path)).to_content())
    assert reply.status is ReplyStatus.DECLINED and reason in reply.reason and not reply.delta


def test_no_store_declines(tmp_path, device):
    task, _ = device
    reply = answer_train(request(task).to_content(), FakeContext(tmp_path / "missing"))
    assert reply.status is ReplyStatus.DECLINED and "no store" in reply.reason


def test_agent_app_answers_layerwise_secure_and_device_messages():
    from hyprstream.agent.client_app import app

    handlers = set(app._registered_funcs)  # Flower's registry of message types this app serves
    assert {"train.layerwise", "train.secagg", "query.device"} <= handlers
