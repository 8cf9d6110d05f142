"""Federated evaluation: every version a fog pushes is scored on its agents' held-out data (real agent
ClientApp over the loopback grid, real core on loopback): the held-out examples never train, the score core
records is the mean of the devices' own scores recomputed here, an agent without a held-out split declines,
and core refuses a report that is malformed or made in another fog's name."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fog_privacy_deploy import core  # noqa: F401 - the core fixture (server, audit log, model)
from test_fog_privacy_rounds import devices, fog_config

from hyprstream.agent.client_app import (HOLDOUT_SALT, Holdout, answer_evaluate, app as agent_app, handle_train,
                                         local_data)
from hyprstream.core.audit import iter_entries
from hyprstream.coreapi.client import CoreClient
from hyprstream.errors import AccessDenied, ValidationError
from hyprstream.fog.loopback import LoopbackGrid
from hyprstream.fog.metrics import FogMetrics
from hyprstream.fog.server_app import run_fog
from hyprstream.learning.task import Dataset, get_task, holdout
from hyprstream.learning.trainer import evaluate, load_weights
from hyprstream.protocol import EvaluateRequest, ReplyStatus, TrainRequest
from hyprstream.store import layer_table as lt

TASK = get_task("digits")


@pytest.mark.integration
def test_each_pushed_version_is_scored_on_the_agents_held_out_data(core, tmp_path):  # noqa: F811
    location, audit_path = core
    stores = devices(tmp_path, 3)
    shares = {101: 0.3, 102: 0.3, 103: 0.0}  # the third device holds nothing out: it declines evaluation
    grid = LoopbackGrid(agent_app, list(stores), node_config=lambda node: {"store-dir": str(stores[node]),
                                                                          "holdout-share": shares[node]})
    cfg = fog_config(tmp_path, location, max_rounds=2, client_dp=False, secagg=False, extra="evaluate = true")
    metrics = FogMetrics("fog-west")
    rounds = run_fog(grid, cfg, metrics=metrics)
    assert [r.version for r in rounds] == [1, 2]
    with CoreClient(location, "fog-token") as fog:
        lineage = fog.list_versions("digits-model")
        for v in (1, 2):
            weights = lt.to_arrays(fog.get_weights("digits-model", v).table)
            mine = []
            for node in (101, 102):
                salt = (stores[node].with_name(stores[node].name + "." + HOLDOUT_SALT)).read_bytes()
                _, held = local_data(stores[node], TASK, Holdout(0.3, salt))
                model = TASK.build_model(seed=0)
                load_weights(model, weights)
                mine.append(evaluate(TASK, model, held))
            score = lineage[v]["federated"]["fog-west"]
            assert score["devices"] == 2
            assert score["loss"] == pytest.approx(np.mean([m[0] for m in mine]), rel=1e-6)
            assert score["accuracy"] == pytest.approx(np.mean([m[1] for m in mine]), rel=1e-9)
    assert lineage[0]["federated"] is None
    assert metrics.snapshot()["hyprstream_fog_evaluated_version"] == 2
    entries = [e for e in iter_entries(audit_path) if e.action == "model.evaluation"]
    assert [(e.actor, e.details["version"]) for e in entries] == [("fog-west", 1), ("fog-west", 2)]
    with CoreClient(location, "fog-token") as fog:
        with pytest.raises(AccessDenied, match="may not report as fog 'fog-east'"):
            fog.report_evaluation("digits-model", 2, fog="fog-east", loss=0.1, accuracy=0.9, devices=1)
        with pytest.raises(ValidationError, match="has no version 7"):
            fog.report_evaluation("digits-model", 7, fog="fog-west", loss=0.1, accuracy=0.9, devices=1)
        with pytest.raises(ValidationError, match="accuracy' in \\[0, 1\\]"):
            fog.report_evaluation("digits-model", 2, fog="fog-west", loss=0.1, accuracy=1.5, devices=1)


@pytest.mark.integration
def test_held_out_examples_never_train_and_a_device_without_a_split_declines(tmp_path):
    stores = devices(tmp_path, 1)
    store = stores[101]
    split = Holdout(0.25, b"s" * 32)
    train, held = local_data(store, TASK, split)
    everything, nothing = local_data(store, TASK, None)
    assert len(train) + len(held) == len(everything) == 50 and len(nothing) == 0 and len(held) > 0
    rows = {(x.tobytes(), int(y)) for x, y in zip(train.x, train.y)}
    assert not rows & {(x.tobytes(), int(y)) for x, y in zip(held.x, held.y)}
    request = EvaluateRequest("digits-model", 3, "digits", lt.to_arrays(lt.to_table(
        {k: v.detach().numpy() for k, v in TASK.build_model(seed=0).state_dict().items()}, layer=TASK.layer_of)))
    weights = request.weights
    trained = handle_train(TrainRequest("digits-model", 3, "digits", ("head",), 2, 8, 0.01, 0, weights), store,
                           holdout=split)
    assert trained.num_examples == len(train)  # what trains is the training split
    reply = answer_evaluate(request.to_content(), store, None)
    assert reply.status is ReplyStatus.DECLINED and "holdout_share = 0" in reply.reason
    for weights, task, reason in (({"fc1.weight": np.zeros((3, 3), np.float32)}, "digits", "do not fit the model"),
                                  ({}, "digits", "do not fit the model"), ({}, "no-such-task", "unknown task")):
        crafted = EvaluateRequest("digits-model", 3, task, weights).to_content()  # a fog sending nonsense
        refused = answer_evaluate(crafted, store, split)
        assert refused.status is ReplyStatus.DECLINED and reason in refused.reason
    reply = answer_evaluate(request.to_content(), store, split)
    assert reply.status is ReplyStatus.OK and reply.model_version == 3 and 0 <= reply.accuracy <= 1
    assert reply.data_bucket == len(held).bit_length()  # the split's size to a factor of two, not its count


@pytest.mark.unit
@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 300), share=st.floats(0.0, 0.5), seed=st.integers(0, 2**32 - 1))
def test_the_split_depends_on_each_example_alone(n, share, seed):
    rng = np.random.default_rng(seed)
    data = Dataset(rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n))
    train, held = holdout(data, share, seed.to_bytes(8, "big") * 4)
    assert len(train) + len(held) == n
    order = rng.permutation(n)  # another order, some rows gone (retention): each row stays on its side
    keep = order[: n // 2]
    train2, held2 = holdout(Dataset(data.x[keep], data.y[keep]), share, seed.to_bytes(8, "big") * 4)
    side = {x.tobytes(): True for x in held.x} | {x.tobytes(): False for x in train.x}
    assert all(side[x.tobytes()] for x in held2.x) and not any(side[x.tobytes()] for x in train2.x)
    if n >= 200 and share >= 0.1:
        assert abs(len(held) / n - share) < 0.15


@pytest.mark.unit
@pytest.mark.parametrize("privacy", ["[privacy.secagg]\nclip = 0.5\n", "[privacy.client_dp]\nclip = 0.5\nnoise_multiplier = 1.0\n"])
def test_federated_evaluation_is_refused_beside_secure_aggregation_and_client_level_dp(tmp_path, privacy):
    from hyprstream.errors import ConfigError
    from hyprstream.fog.config import load_fog_config

    (tmp_path / "fog.toml").write_text(f"""kind = "fog"
name = "fog-west"
[core]
location = "grpc://127.0.0.1:1"
token_file = "t"
model = "m"
[rounds]
evaluate = true
{privacy}""")
    with pytest.raises(ConfigError, match="rounds.evaluate.*which secure aggregation and client-level DP exist to "
                                          "hide"):
        load_fog_config(tmp_path / "fog.toml")


@pytest.mark.unit
def test_the_salt_is_made_once_whole_even_when_first_uses_race(tmp_path):
    """Eight threads make the device's salt at once, each with its own bytes: all read the same 32 bytes,
    the file is private, and no temporary file is left."""
    import os
    import threading

    from hyprstream.durable import create_once

    path, seen, start = tmp_path / HOLDOUT_SALT, [], threading.Barrier(8)

    def first_use() -> None:
        start.wait()
        seen.append(create_once(path, lambda: os.urandom(32)))

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 8 and len(set(seen)) == 1 and len(seen[0]) == 32
    assert path.stat().st_mode & 0o777 == 0o600 and [p.name for p in tmp_path.iterdir()] == [HOLDOUT_SALT]
    assert create_once(path, lambda: b"other") == seen[0]  # made once: later uses read it
