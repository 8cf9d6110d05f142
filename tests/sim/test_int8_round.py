"""An int8 round end to end: the fog asks for int8, the real agent code encodes, the fog decodes and
aggregates; the pushed mean equals the mean of the agents' decoded int8 deltas, bytes are int8 + scales."""

import numpy as np
import pytest

from hyprstream.agent.client_app import app, handle_train
from hyprstream.learning.task import Dataset, get_task
from hyprstream.learning.trainer import model_weights
from hyprstream.codec import Encoding
from hyprstream.core.auth import Principal, Role, TokenRegistry
from hyprstream.coreapi.client import CoreClient
from hyprstream.core.repository import ModelRepository
from hyprstream.core.server import CoreFlightServer
from hyprstream.fog.aggregator import FogAggregator, RoundPlan
from hyprstream.fog.loopback import LoopbackGrid
from hyprstream.protocol import TrainReply, TrainRequest
from hyprstream.store import Store, to_arrays, to_table

pytestmark = pytest.mark.integration


def test_int8_round(tmp_path):
    task = get_task("digits")
    train_set, _ = task.load_reference_data(seed=0)
    stores = {}
    for node in (1, 2):
        path = tmp_path / f"device-{node}"
        with Store.open(path, create=True) as store:
            store.create_table(task.table, task.schema)
            idx = np.arange(node * 150, node * 150 + 100 + 30 * node)
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
        grid = LoopbackGrid(app, [1, 2], node_config=lambda n: {"store-dir": str(stores[n])})
        plan = RoundPlan(task="digits", layers=("fc2", "head"), local_steps=5, batch_size=16, lr=0.01,
                         update_encoding="int8")
        with CoreClient(location, "fog") as core:
            fog = FogAggregator("fog-a", grid, [1, 2], core, "m", plan, seed=4)
            base = fog.pull()
            result = fog.run_round(1, base)
            after = core.get_weights("m")
    finally:
        server.stop()
    assert result.participants == 2 and result.refused == 0 and result.version == 1

    # The same requests answered directly, through the wire form of their int8 replies.
    weights = to_arrays(base.table, copy=True)
    decoded = {}
    for i, node in enumerate((1, 2)):
        request = TrainRequest("m", 0, "digits", ("fc2", "head"), 5, 16, 0.01, 4 * 1_000_003 + 1009 + i, weights,
                               update_encoding="int8")
        reply = handle_train(request, stores[node])
        assert reply.encoding is Encoding.INT8
        decoded[node] = TrainReply.from_content(reply.to_content())
        # int8 values plus one float32 scale per tensor
        sizes = [a.size for a in reply.delta.values()]
        assert result.uplink[node] == sum(sizes) + 4 * len(sizes) == decoded[node].payload_bytes()
        for name, d in reply.delta.items():  # within one step of the fp32 delta
            assert np.all(np.abs(decoded[node].delta[name] - d) <= np.abs(d).max() / 127 * (1 + 1e-5))
    final = to_arrays(after.table)
    for name in decoded[1].delta:
        n = [decoded[k].num_examples for k in (1, 2)]
        mean = sum(decoded[k].delta[name].astype(np.float64) * n[j] for j, k in enumerate((1, 2))) / sum(n)
        np.testing.assert_allclose(final[name], weights[name] + mean, rtol=1e-5, atol=1e-6)
    assert result.bytes_up * 3 < sum(4 * a.size for a in decoded[1].delta.values()) * 2  # ~4x smaller
