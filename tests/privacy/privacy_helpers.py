"""Shared pieces of the privacy tests: device stores, a stub core, an agent ClientApp with the secagg middleware."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.clientapp import ClientApp

from hyprstream.agent.task import Dataset, get_task
from hyprstream.agent.trainer import model_weights
from hyprstream.core.repository import PushResult, Snapshot
from hyprstream.core.vector_clock import VectorClock
from hyprstream.privacy.secagg_messages import SECAGG_ACTION
from hyprstream.privacy.secagg_mod import make_secagg_mod
from hyprstream.store import Store
from hyprstream.store import layer_table as lt


def make_devices(root: Path, n: int, rows: int = 60) -> list[Path]:
    task = get_task("digits")
    train, _ = task.load_reference_data(seed=0)
    paths = []
    for i in range(n):
        path = root / f"device-{i:04d}"
        idx = np.arange(i * rows, (i + 1) * rows) % len(train)
        with Store.open(path, create=True) as store:
            store.create_table(task.table, task.schema)
            store.append(task.table, task.to_table(Dataset(train.x[idx], train.y[idx])))
        paths.append(path)
    return paths


def agent_app(*, secure: bool = False) -> ClientApp:
    """The agent's own train handler, registered for train.secagg behind the middleware (the wiring)."""
    from hyprstream.agent.client_app import query_device, train

    app = ClientApp()
    app.train("layerwise")(train)
    app.query("device")(query_device)
    app.train(SECAGG_ACTION, mods=[make_secagg_mod(secure=secure)])(train)
    return app


@dataclass
class StubCore:
    """The two core calls a fog makes, in memory: the current weights and push_delta (recorded)."""

    model: str = "digits"
    version: int = 1
    pushes: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        net = get_task("digits").build_model(seed=0)
        self.table = lt.to_table(model_weights(net))

    def get_weights(self, model: str) -> Snapshot:
        clocks = {layer: VectorClock() for layer in lt.layers_in(self.table)}
        return Snapshot(model, self.version, self.table, clocks)

    def push_delta(self, model, delta, **kw) -> PushResult:
        self.pushes.append({"model": model, "delta": lt.to_arrays(delta), **kw})
        self.version += 1
        return PushResult(self.version, {}, 1.0, 0.0)
