"""Fixtures of the fog tests: the agent tests' mosquitto broker, and a real core Flight server on
loopback with a registered ``digits`` model and one local store per agent."""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("agent_conftest", Path(__file__).parents[1] / "agent" / "conftest.py")
_agent = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_agent)
Broker = _agent.Broker
MOSQUITTO = _agent.MOSQUITTO
free_port = _agent.free_port
broker = _agent.broker  # the same fixture: a private mosquitto on a free loopback port


@dataclass
class Site:
    location: str
    stores: dict[int, Path]
    task: object
    tmp: Path


@contextlib.contextmanager
def core_server(root: Path):
    """A core Flight server on loopback over a repository in ``root``, with tokens ``admin`` and ``fog``
    (fog ``fog-a``); yields its location and stops it."""
    from hyprstream.core.auth import Principal, Role, TokenRegistry
    from hyprstream.core.repository import ModelRepository
    from hyprstream.core.server import CoreFlightServer

    tokens = TokenRegistry()
    tokens.add("admin", Principal("admin", Role.ADMIN))
    tokens.add("fog", Principal("fog-a", Role.FOG))
    server = CoreFlightServer(ModelRepository(root), tokens)
    location = server.start_background()
    try:
        yield location
    finally:
        server.stop()


@pytest.fixture()
def site(tmp_path):
    """A core server holding model ``m`` (digits, seed 0) and stores for agents 1-4 (tokens:
    ``admin``, ``fog`` for fog ``fog-a``, ``reader`` for an agent)."""
    from hyprstream.learning.task import Dataset, get_task
    from hyprstream.learning.trainer import model_weights
    from hyprstream.coreapi.client import CoreClient
    from hyprstream.store import Store, to_table

    task = get_task("digits")
    train_set, _ = task.load_reference_data(seed=0)
    stores = {}
    for node in (1, 2, 3, 4):
        path = tmp_path / f"device-{node}"
        with Store.open(path, create=True) as store:
            store.create_table(task.table, task.schema)
            idx = np.arange(node * 100, node * 100 + 40 + 10 * node)  # different sizes: different weights
            store.append(task.table, task.to_table(Dataset(train_set.x[idx], train_set.y[idx])))
        stores[node] = path
    with core_server(tmp_path / "core") as location:
        with CoreClient(location, "admin") as admin:
            admin.register_model("m", to_table(model_weights(task.build_model(seed=0)), layer=task.layer_of))
        yield Site(location, stores, task, tmp_path)
