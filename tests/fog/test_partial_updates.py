"""Agents that train only some of the requested layer groups (the hybrid strategy): each group is
averaged over the agents that trained it. Real agent code on an in-process grid, a real core server."""

import dataclasses

import numpy as np
import pytest
from flwr.app import Message
from flwr.clientapp import ClientApp

from hyprstream.agent.client_app import answer_train, handle_train, store_dir
from hyprstream.learning.task import Dataset, get_task
from hyprstream.learning.trainer import model_weights
from hyprstream.core.auth import Principal, Role, TokenRegistry
from hyprstream.coreapi.client import CoreClient
from hyprstream.core.repository import ModelRepository
from hyprstream.core.server import CoreFlightServer
from hyprstream.fog.aggregator import FogAggregator, RoundPlan
from hyprstream.fog.loopback import LoopbackGrid
from hyprstream.protocol import TrainRequest
from hyprstream.store import Store, to_arrays, to_table

pytestmark = pytest.mark.integration


def hybrid_layers(request: TrainRequest) -> TrainRequest:
    return dataclasses.replace(request, layers=request.layers[-1:])  # as a hybrid device: the last group only


app = ClientApp()


@app.train("layerwise")
def train(msg: Message, context) -> Message:
    if context.node_config.get("hybrid"):
        request = hybrid_layers(TrainRequest.from_content(msg.content))
        reply = handle_train(request, store_dir(context))
    else:
        reply = answer_train(msg.content, context)
    return Message(reply.to_content(), reply_to=msg)


def test_partial_updates_are_averaged_per_layer_group(tmp_path):
    task = get_task("digits")
    train_set, _ = task.load_reference_data(seed=0)
    stores = {}
    for node in (1, 2, 3):
        path = tmp_path / f"device-{node}"
        with Store.open(path, create=True) as store:
            store.create_table(task.table, task.schema)
            idx = np.arange(node * 100, node * 100 + 80 + 20 * node)
            store.append(task.table, task.to_table(Dataset(train_set.x[idx], train_set.y[idx])))
        stores[node] = path
    tokens = TokenRegistry()
    tokens.add("admin", Principal("admin", Role.ADMIN))
    tokens.add("fog", Principal("fog-a", Role.FOG))
    server = CoreFlightServer(ModelRepository(tmp_path / "core"), tokens)
    location = server.start_background()
    try:
        with CoreClient(location, "admin") as admin:
            admin.register_model("m", to_table(model_weights(task.build_model(seed=0)), layer=task.layer_of))
        grid = LoopbackGrid(app, [1, 2, 3],
                            node_config=lambda n: {"store-dir": str(stores[n]), **({"hybrid": 1} if n == 3 else {})})
        plan = RoundPlan(task="digits", layers=("fc2", "head"), local_steps=5, batch_size=16, lr=0.01)
        with CoreClient(location, "fog") as core:
            fog = FogAggregator("fog-a", grid, [1, 2, 3], core, "m", plan, seed=4)
            base = fog.pull()
            result = fog.run_round(1, base)
            after = core.get_weights("m")
    finally:
        server.stop()
    assert result.participants == 3 and result.refused == 0 and result.version == 1

    # The same requests, answered directly: fc2 from nodes 1 and 2, head from all three.
    weights = to_arrays(base.table, copy=True)
    replies = {}
    for i, node in enumerate((1, 2, 3)):
        request = TrainRequest("m", 0, "digits", ("fc2", "head"), 5, 16, 0.01, 4 * 1_000_003 + 1009 + i, weights)
        replies[node] = handle_train(hybrid_layers(request) if node == 3 else request, stores[node])
    expected = {}
    for name in weights:
        if not name.startswith(("fc2.", "head.")):
            continue
        got = [(r.delta[name], r.num_examples) for r in replies.values() if name in r.delta]
        assert len(got) == (2 if name.startswith("fc2.") else 3)
        mean = sum(d.astype(np.float64) * n for d, n in got) / sum(n for _, n in got)
        expected[name] = weights[name] + mean
    final = to_arrays(after.table)
    for name, value in expected.items():
        np.testing.assert_allclose(final[name], value, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(final["fc1.weight"], weights["fc1.weight"])  # not requested: unchanged


def test_reply_outside_the_request_is_refused_whole(tmp_path):
    from hyprstream.errors import ValidationError
    from hyprstream.fog.aggregate import UpdateMatrix
    from hyprstream.protocol import ReplyStatus, TrainReply

    fog = FogAggregator.__new__(FogAggregator)  # only _add and its plan are used here
    fog.plan = RoundPlan(task="digits", layers=("fc", "head"), local_steps=1, batch_size=1, lr=0.1,
                         max_update_norm=10.0)
    matrices = {"fc": UpdateMatrix({"fc.w": (2,)}, capacity=2), "head": UpdateMatrix({"head.w": (1,)}, capacity=2)}
    ok = {"fc.w": np.ones(2, np.float32), "head.w": np.ones(1, np.float32)}
    for layers, delta, reason in [
        (("fc", "emb"), ok, "the request asked for"),
        (("fc",), ok, "outside its layers"),
        (("fc", "head"), {**ok, "head.w": np.full(1, 20.0, np.float32)}, "exceeds the bound"),
        (("fc", "head"), {**ok, "fc.w": np.array([np.nan, 0], np.float32)}, "NaN"),
    ]:
        with pytest.raises(ValidationError, match=reason):
            fog._add(matrices, TrainReply(ReplyStatus.OK, 0, layers, delta, num_examples=5))
        assert matrices["fc"].count == matrices["head"].count == 0  # nothing of a refused reply is kept
    fog._add(matrices, TrainReply(ReplyStatus.OK, 0, ("head",), {"head.w": np.ones(1, np.float32)}, num_examples=5))
    assert (matrices["fc"].count, matrices["head"].count) == (0, 1)
