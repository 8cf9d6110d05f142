"""Shared pieces of the privacy tests: device stores, a real core Flight server on loopback, an agent ClientApp
with the secagg middleware."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.clientapp import ClientApp

from hyprstream.learning.task import Dataset, get_task
from hyprstream.learning.trainer import model_weights
from hyprstream.core import signing
from hyprstream.core.audit import AuditLog, iter_entries
from hyprstream.core.auth import Principal, Role, TokenRegistry
from hyprstream.coreapi.client import CoreClient
from hyprstream.core.repository import ModelRepository, PushResult
from hyprstream.core.server import CoreFlightServer
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


def one_thread_agent_app() -> ClientApp:
    """:func:`agent_app` for a worker process, training with one torch thread: float sums in the same
    order as a test process that recomputes its training with one thread (:func:`one_torch_thread`)."""
    import torch

    torch.set_num_threads(1)
    return agent_app()


@contextlib.contextmanager
def one_torch_thread():
    """Torch in this process on one thread for the block (restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class RecordingCoreClient(CoreClient):
    """The fog's real core client; it also keeps a copy of what each push sent (the tests compare it with
    means computed by hand) and the version core committed for it."""

    def __init__(self, location: str, token: str) -> None:
        super().__init__(location, token)
        self.pushes: list[dict] = []

    def push(self, push, delta) -> PushResult:
        result = super().push(push, delta)
        fields = {k: getattr(push, k) for k in ("model", "fog", "seq", "base_clocks", "participants", "privacy",
                                                "transcript_sha256")}
        self.pushes.append({**fields, "delta": lt.to_arrays(delta), "version": result.version})
        return result


@dataclass
class LoopbackCore:
    """A real core Flight server on loopback (repository, signed audit log, tokens), the digits model
    registered as ``model`` at version 0; ``client`` is the fog's connection."""

    root: Path
    server: CoreFlightServer
    location: str
    client: RecordingCoreClient
    model: str
    fog: str

    @property
    def audit_path(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def pushes(self) -> list[dict]:
        return self.client.pushes

    def audited_pushes(self) -> list[dict]:
        """The details of every committed push in core's audit log, in order."""
        return [dict(e.details) for e in iter_entries(self.audit_path)
                if e.action == "model.push" and e.outcome == "ok"]

    def close(self) -> None:
        self.client.close()
        self.server.stop()
        self.server.audit.close()


def start_core(root: Path, *, model: str = "digits", fog: str = "fog-a") -> LoopbackCore:
    root.mkdir(parents=True, exist_ok=True)
    tokens = TokenRegistry()
    tokens.add("admin-token", Principal("admin", Role.ADMIN))
    tokens.add("fog-token", Principal(fog, Role.FOG))
    audit = AuditLog(root / "audit.jsonl", signing.generate_key(), sync=False)
    server = CoreFlightServer(ModelRepository(root / "models", audit=audit), tokens)
    location = server.start_background()
    task = get_task("digits")
    with CoreClient(location, "admin-token") as admin:
        admin.register_model(model, lt.to_table(model_weights(task.build_model(seed=0)), layer=task.layer_of))
    return LoopbackCore(root, server, location, RecordingCoreClient(location, "fog-token"), model, fog)
