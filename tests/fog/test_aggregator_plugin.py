"""An aggregation rule from a third-party package (entry point ``hyprstream.aggregators``, or
``module:attribute`` in the fog config), installed from a directory: found by name, refused with a clear
error when it is broken or combined with what it cannot run with, and used by a real fog round whose
version a real core commits. A rule that fails or returns garbage costs the round, never the fog."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import core_server
from flwr.app import Message
from flwr.clientapp import ClientApp
from test_task_plugin import install, install_module

from hyprstream.coreapi.client import CoreClient
from hyprstream.errors import ConfigError, ValidationError
from hyprstream.fog.aggregate import Aggregation, PluginRule, UpdateMatrix, resolve_rule
from hyprstream.fog.aggregator import FogAggregator, RoundPlan
from hyprstream.fog.config import load_fog_config
from hyprstream.fog.loopback import LoopbackGrid
from hyprstream.protocol import ReplyStatus, TrainReply, TrainRequest
from hyprstream.store import to_arrays, to_table

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "aggregator-plugin"
SHAPES = {"fc.weight": (3, 4), "fc.bias": (3,)}
BASE = {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}
HONEST = {1: 0.10, 2: 0.11, 3: 0.12, 4: 0.13, 5: 0.14}  # node -> the value of every entry of its delta
BYZANTINE = {6: 50.0, 7: -40.0}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("aggregators")
    target = root / "site"
    install(EXAMPLE, target)
    install_module(root, target, "broken_rules", "hyprstream.aggregators",
                   {"not-callable": "NOT_CALLABLE", "missing": "missing", "explodes": "explodes", "nan": "nan",
                    "wrong-shape": "wrong_shape", "mean": "explodes"},
                   """
                   import numpy as np

                   NOT_CALLABLE = 3

                   def explodes(rows, weights):
                       raise RuntimeError("boom")

                   def nan(rows, weights):
                       return {name: np.full(m.shape[1], np.nan) for name, m in rows.items()}

                   def wrong_shape(rows, weights):
                       return {name: m[:, :1].mean(axis=0) for name, m in rows.items()}
                   """)
    return target


@pytest.fixture
def on_path(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site))


def matrix(values: dict[int, float]) -> UpdateMatrix:
    m = UpdateMatrix(SHAPES, capacity=len(values))
    for v in values.values():
        m.add({name: np.full(shape, v, np.float32) for name, shape in SHAPES.items()}, 10.0)
    return m


def test_an_installed_rule_is_found_by_name_and_by_reference(on_path):
    krum = resolve_rule("krum")
    assert isinstance(krum, PluginRule) and krum.value == "krum"
    assert resolve_rule("krum_rule:multi_krum").value == "krum_rule:multi_krum"
    assert resolve_rule("mean") is Aggregation.MEAN  # a built-in name is never replaced by a plugin's
    # Krum keeps one honest update whole; the mean is dragged far off by the two outliers
    rows = matrix({**HONEST, **BYZANTINE})
    picked = rows.aggregate(krum)["fc.bias"]
    assert picked[0] in [np.float32(v) for v in HONEST.values()] and np.all(picked == picked[0])
    assert abs(rows.aggregate(Aggregation.MEAN)["fc.bias"][0]) > 1.0
    multi = rows.aggregate(resolve_rule("multi-krum"))["fc.weight"]
    assert multi.shape == SHAPES["fc.weight"]
    np.testing.assert_allclose(multi, np.mean(list(HONEST.values())), rtol=1e-6)  # the 5 honest of 7


@pytest.mark.parametrize(("name", "error"), [
    ("not-callable", "is 3, not a callable"),
    ("missing", "does not load: AttributeError"),
    ("no-such-rule", "unknown aggregation rule 'no-such-rule' \\(known: mean, trimmed_mean, median, "),
    ("krum_rule:nothing_here", "does not load: AttributeError"),
    ("no_such_module:rule", "does not load: ModuleNotFoundError"),
])
def test_a_broken_or_unknown_rule_is_refused_by_name(on_path, name, error):
    with pytest.raises(ValidationError, match=error):
        resolve_rule(name)


@pytest.mark.parametrize(("name", "error"), [
    ("explodes", "'explodes' failed: RuntimeError: boom"),
    ("nan", "NaN or Inf"),
    ("wrong-shape", "shape \\(1,\\), expected \\(12,\\)"),
])
def test_a_rule_that_fails_or_returns_garbage_is_caught(on_path, name, error):
    rows = matrix(HONEST)
    before = {k: v.copy() for k, v in rows._rows.items()}
    with pytest.raises(ValidationError, match=error):
        rows.aggregate(resolve_rule(name))
    for k, v in before.items():
        np.testing.assert_array_equal(rows._rows[k], v)


def test_a_rule_cannot_change_the_deltas_it_is_shown(on_path):
    def scribble(rows, weights):
        rows["fc.bias"][0, 0] = 99.0
        return {}

    with pytest.raises(ValidationError, match="read-only"):
        matrix(HONEST).aggregate(PluginRule("scribble", scribble))


def fog_toml(tmp_path: Path, rounds: str, extra: str = "") -> Path:
    path = tmp_path / "fog.toml"
    path.write_text('kind = "fog"\nname = "f"\n[core]\nlocation = "grpc://127.0.0.1:1"\ntoken_file = "t"\n'
                    f'model = "m"\n[rounds]\n{rounds}\n{extra}')
    return path


def test_the_fog_config_loads_the_rule_and_refuses_what_it_cannot_run_with(on_path, tmp_path):
    assert load_fog_config(fog_toml(tmp_path, 'aggregation = "krum"')).rounds.rule.value == "krum"
    with pytest.raises(ConfigError, match="unknown aggregation rule 'krumm'"):
        load_fog_config(fog_toml(tmp_path, 'aggregation = "krumm"'))
    with pytest.raises(ConfigError, match="needs each update in the clear"):
        load_fog_config(fog_toml(tmp_path, 'aggregation = "krum_rule:krum"', "[privacy.secagg]\nclip = 1.0\n"))
    # a buffered fog combines each buffer's rows by the installed rule
    assert load_fog_config(fog_toml(tmp_path, 'aggregation = "krum"\nmode = "buffered"')).rounds.rule.value == "krum"


app = ClientApp()


@app.train("layerwise")
def fixed_delta(msg: Message, context) -> Message:
    """Each node answers with its fixed delta (honest ones close together, two far-off attackers)."""
    request = TrainRequest.from_content(msg.content)
    node = int(context.node_config["node"])
    value = {**HONEST, **BYZANTINE}[node]
    delta = {name: np.full(shape, value, np.float32) for name, shape in SHAPES.items()}
    reply = TrainReply(ReplyStatus.OK, request.model_version, request.layers, delta, num_examples=10)
    return Message(reply.to_content(), reply_to=msg)


def test_a_fog_round_with_an_installed_rule_commits_its_aggregate(on_path, tmp_path):
    nodes = sorted({**HONEST, **BYZANTINE})
    with core_server(tmp_path / "core") as location:
        with CoreClient(location, "admin") as admin:
            admin.register_model("m", to_table(BASE, layer=lambda name: name.split(".")[0]))
        grid = LoopbackGrid(app, nodes, node_config=lambda n: {"node": n})
        results = {}
        with CoreClient(location, "fog") as core:
            for round_no, rule in enumerate(("krum", "nan"), start=1):
                plan = RoundPlan(task="digits", layers=("fc",), local_steps=1, batch_size=1, lr=0.1,
                                 aggregation=resolve_rule(rule))
                fog = FogAggregator("fog-a", grid, nodes, core, "m", plan, seed=1)
                results[rule] = fog.run_round(round_no, fog.pull())
            after = to_arrays(core.get_weights("m").table)
    krum, broken = results["krum"], results["nan"]
    assert krum.version == 1 and krum.participants == len(nodes)
    assert after["fc.bias"][0] in [np.float32(v) for v in HONEST.values()]  # one honest delta, whole
    np.testing.assert_array_equal(after["fc.weight"], np.full(SHAPES["fc.weight"], after["fc.bias"][0]))
    # the failing rule: no push, the reason recorded, the fog still standing
    assert broken.version is None and any("NaN or Inf" in r for r in broken.reasons), broken.reasons
