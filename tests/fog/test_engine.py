"""The round engine (hyprstream.fog.engine): one sync and one buffered scheduler, and nothing else loops over rounds."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest

from hyprstream.consistency import ConsistencyMode, ConsistencyPolicy
from hyprstream.coreapi.client import CoreClient
from hyprstream.core.repository import ModelSettings
from hyprstream.errors import ValidationError
from hyprstream.fog.aggregator import FogAggregator, RoundPlan
from hyprstream.fog.engine import Lane, round_runner, run_buffered, run_sync
from hyprstream.fog.loopback import LoopbackGrid
from hyprstream.fog.dp import PrivateFogAggregator
from hyprstream.fog.secure import SecureFogAggregator
from hyprstream.privacy.client_dp import NoisePlacement
from hyprstream.privacy.config import ClientDpConfig, SecAggConfig

from test_buffered import Agents

pytestmark = pytest.mark.integration

PACKAGE = Path(__file__).resolve().parents[2] / "hyprstream"


@pytest.fixture()
def two_fogs(tmp_path, site):
    """Two fogs (fog-a: agents 1, 2; fog-b: agents 3, 4) on one grid, as the simulator runs them, over a model
    in eventual consistency (both fogs' pushes of a round are taken)."""
    from hyprstream.core.auth import Principal, Role, TokenRegistry
    from hyprstream.core.repository import ModelRepository
    from hyprstream.core.server import CoreFlightServer
    from hyprstream.learning.trainer import model_weights
    from hyprstream.store import to_table

    tokens = TokenRegistry()
    tokens.add("admin", Principal("admin", Role.ADMIN))
    for name in ("fog-a", "fog-b"):
        tokens.add(name, Principal(name, Role.FOG))
    server = CoreFlightServer(ModelRepository(tmp_path / "core2"), tokens)
    location = server.start_background()
    with CoreClient(location, "admin") as admin:
        admin.register_model("m", to_table(model_weights(site.task.build_model(seed=0)), layer=site.task.layer_of),
                             ModelSettings(consistency=ConsistencyPolicy(mode=ConsistencyMode.EVENTUAL)))
    agents = Agents()
    grid = LoopbackGrid(agents.app, [1, 2, 3, 4], node_config=lambda n: {"store-dir": str(site.stores[n])})
    plan = RoundPlan(task="digits", layers=("head",), local_steps=2, batch_size=16, lr=0.05, timeout_s=60.0)
    cores = [CoreClient(location, name) for name in ("fog-a", "fog-b")]
    fogs = [FogAggregator(name, grid, nodes, core, "m", plan, seed=j)
            for j, (name, nodes, core) in enumerate(zip(("fog-a", "fog-b"), ([1, 2], [3, 4]), cores, strict=True))]
    try:
        yield fogs
    finally:
        for core in cores:
            core.close()
        server.stop()


def test_every_lane_sends_its_requests_before_any_lane_collects(two_fogs):
    lanes = [Lane(fog) for fog in two_fogs]
    seen, steps = [], []
    done = run_sync(lanes, rounds=2, on_round=lambda j, pending, r: seen.append((j, r.round)),
                    on_step=lambda step, results: steps.append((step, [r.base_version for r in results])))

    assert seen == [(0, 1), (1, 1), (0, 2), (1, 2)]
    # both fogs of a round start from the version current when the round began, though fog-a pushed first
    assert steps == [(1, [0, 0]), (2, [2, 2])]
    assert [r.version for r in done] == [1, 2, 3, 4]
    assert all(r.participants == 2 for r in done)


def test_a_round_without_eligible_agents_waits_when_asked_to_and_runs_empty_otherwise(two_fogs):
    fog = two_fogs[0]
    asked = []

    def prepare(round_no):
        asked.append(round_no)
        return [[]] if len(asked) == 1 else [None]  # nobody may train at first, then everybody

    (r,) = run_sync([Lane(fog)], rounds=1, prepare=prepare, idle_wait_s=0.01)
    assert asked == [1, 1]  # the same round asked again, not skipped
    assert (r.round, r.participants, r.version) == (1, 2, 1)

    # the simulator's step passes with nobody training: the round is recorded, nothing is pushed
    (empty,) = run_sync([Lane(fog)], rounds=1, prepare=lambda round_no: [[]])
    assert (empty.participants, empty.version, empty.nodes) == (0, None, ())


def test_prepare_returning_none_or_a_stop_event_ends_the_rounds(two_fogs):
    fog = two_fogs[0]
    assert run_sync([Lane(fog)], rounds=5, prepare=lambda round_no: None) == []
    stop = threading.Event()
    done = run_sync([Lane(fog)], rounds=0, stop=stop, on_step=lambda step, results: step == 2 and stop.set())
    assert [r.round for r in done] == [1, 2]


def test_round_runner_is_the_one_place_that_decides_secure_rounds(two_fogs):
    fog = two_fogs[0]
    assert round_runner(fog, None) is fog
    secure = round_runner(fog, SecAggConfig(clip=1.0), ClientDpConfig(noise_multiplier=1.0))
    assert isinstance(secure, SecureFogAggregator) and secure.fog is fog and secure.client_dp is not None
    assert Lane(secure).fog is fog
    private = round_runner(fog, None, ClientDpConfig(noise_multiplier=1.0, clip=1.0))
    assert isinstance(private, PrivateFogAggregator) and Lane(private).fog is fog and Lane(private).client_dp
    with pytest.raises(ValidationError, match="needs privacy.client_dp.clip"):
        round_runner(fog, None, ClientDpConfig(noise_multiplier=1.0))
    with pytest.raises(ValidationError, match="needs \\[privacy.secagg\\]"):
        round_runner(fog, None, ClientDpConfig(noise_multiplier=1.0, clip=1.0, placement=NoisePlacement.DISTRIBUTED))
    with pytest.raises(ValidationError, match="max_pushes"):
        run_buffered([], max_pushes=0)


def _calls(path: Path, method: str) -> list[int]:
    tree = ast.parse(path.read_text(), str(path))
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == method]


@pytest.mark.unit
def test_only_the_engine_drives_rounds():
    """Rounds are collected (``finish_round``) and buffered fogs stepped (``step``) by the engine's two
    schedulers only: the deployed fog, the buffered fog and the simulator have no round loop of their own.
    (A runner's ``run_round`` is start + finish of one round, for callers outside a schedule.)"""
    outside = {}
    for path in sorted([*PACKAGE.glob("fog/*.py"), *PACKAGE.glob("sim/*.py"), PACKAGE / "cli.py"]):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "fog/engine.py":
            continue
        for method in ("finish_round", "step"):
            for line in _calls(path, method):
                outside.setdefault(rel, []).append((method, line))
    # run_round of the two runners: start_round + finish_round of a single round; a secure buffered fog's
    # aggregate stage: one SecAgg+ round over the cohort that filled the buffer
    assert {rel: [m for m, _ in calls] for rel, calls in outside.items()} == {
        "fog/aggregator.py": ["finish_round"], "fog/secure.py": ["finish_round"], "fog/dp.py": ["finish_round"],
        "fog/buffered.py": ["finish_round"]}
    assert _calls(PACKAGE / "fog" / "engine.py", "finish_round") and _calls(PACKAGE / "fog" / "engine.py", "step")
