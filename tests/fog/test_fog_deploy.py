"""A fog on Flower's deployment engine: real SuperLink, real SuperNodes running the agent ClientApp,
a real core Flight server, all on loopback."""

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from hyprstream.agent.task import Dataset, get_task
from hyprstream.agent.trainer import model_weights
from hyprstream.core.auth import Principal, Role, TokenRegistry
from hyprstream.core.client import CoreClient
from hyprstream.core.repository import ModelRepository
from hyprstream.core.server import CoreFlightServer
from hyprstream.fog.service import executable, stop_process
from hyprstream.store import Store, to_table

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# SuperNodes start flwr-clientapp from PATH: this environment's
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def core(tmp_path):
    tokens = TokenRegistry()
    tokens.add("admin-token", Principal("admin", Role.ADMIN))
    tokens.add("fog-token", Principal("fog-west", Role.FOG))
    server = CoreFlightServer(ModelRepository(tmp_path / "core"), tokens)
    location = server.start_background()
    task = get_task("digits")
    with CoreClient(location, "admin-token") as admin:
        admin.register_model("digits-model", to_table(model_weights(task.build_model(seed=0)), layer=task.layer_of))
    yield location
    server.stop()


def test_fog_runs_rounds_over_supernodes(core, tmp_path):
    task = get_task("digits")
    train, _ = task.load_reference_data(seed=0)
    stores = []
    for i in range(2):
        path = tmp_path / f"device-{i}"
        with Store.open(path, create=True) as store:
            store.create_table(task.table, task.schema)
            store.append(task.table, task.to_table(Dataset(train.x[i::2][:300], train.y[i::2][:300])))
        stores.append(path)
    (tmp_path / "fog.token").write_text("fog-token\n")
    port = free_port()
    config = tmp_path / "fog.toml"
    config.write_text(f"""
kind = "fog"
name = "fog-west"
state_dir = "{tmp_path / 'fog-state'}"
[core]
location = "{core}"
token_file = "{tmp_path / 'fog.token'}"
model = "digits-model"
[superlink]
port = {port}
[rounds]
task = "digits"
layers = ["fc2", "head"]
schedule = "round_robin"
local_steps = 10
min_agents = 2
min_replies = 2
timeout_s = 120
max_rounds = 2
""")
    fog = subprocess.Popen([sys.executable, "-m", "hyprstream.cli", "fog", "run", "--config", str(config)],
                           env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    nodes = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        supernode = executable("flower-supernode")
        for i, path in enumerate(stores):
            nodes.append(subprocess.Popen(
                [supernode, "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                 "--node-config", f"store-dir='{path}'"],
                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        out, _ = fog.communicate(timeout=540)  # a loaded 2-core machine: minutes per round
        assert fog.returncode == 0, out
    finally:
        for proc in [*nodes, fog]:
            stop_process(proc)
    with CoreClient(core, "admin-token") as admin:
        versions = admin.list_versions("digits-model")
    assert [v["version"] for v in versions] == [0, 1, 2]
    assert [v["actor"] for v in versions[1:]] == ["fog-west", "fog-west"]
    assert [v["layers"] for v in versions[1:]] == [["fc2"], ["head"]]  # round-robin layer schedule
    assert [v["participants"] for v in versions[1:]] == [2, 2]
    assert all(np.isfinite(v["update_norm"]) and v["update_norm"] > 0 for v in versions[1:])
