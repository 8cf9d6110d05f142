"""``hyprstream fog run`` on Flower's deployment engine for the fog tests: the fog's config file, its
stores, and a run with real SuperNodes (running the agent ClientApp) against its real SuperLink, all on
loopback. Every process is started and stopped by its PID."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from hyprstream.agent.daemon import FogLink, SuperNodeProcess
from hyprstream.learning.task import Dataset, get_task
from hyprstream.fog.service import stop_process
from hyprstream.store import Store

# the Flower commands of this environment first
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digits_stores(root: Path, n: int, rows: int) -> list[Path]:
    """``n`` local stores under ``root`` with interleaved shards of ``rows`` digits records each."""
    task = get_task("digits")
    train, _ = task.load_reference_data(seed=0)
    stores = []
    for i in range(n):
        path = root / f"device-{i}"
        with Store.open(path, create=True) as store:
            store.create_table(task.table, task.schema)
            store.append(task.table, task.to_table(Dataset(train.x[i::n][:rows], train.y[i::n][:rows])))
        stores.append(path)
    return stores


def fog_toml(path: Path, *, name: str, location: str, token: str, model: str, body: str,
             state_dir: Path | None = None) -> Path:
    """A fog config at ``path``: core at ``location`` with ``token`` (written beside it), then ``body``."""
    token_file = path.parent / "fog.token"
    token_file.write_text(token + "\n")
    state = f'state_dir = "{state_dir}"' if state_dir is not None else ""
    path.write_text(f"""
kind = "fog"
name = "{name}"
{state}
[core]
location = "{location}"
token_file = "{token_file}"
model = "{model}"
{body}
""")
    return path


def run_fog_over_supernodes(config: Path, port: int, stores: list[Path], timeout_s: float = 540.0,
                            env: dict[str, str] | None = None) -> str:
    """``hyprstream fog run --config config`` (its SuperLink on ``port``, insecure) with one SuperNode per
    store; waits for the fog to exit after its ``max_rounds``, asserts exit code 0, returns its output."""
    env = ENV if env is None else env
    fog = subprocess.Popen([sys.executable, "-m", "hyprstream.cli", "fog", "run", "--config", str(config)],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    nodes = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and fog.poll() is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        for path in stores:  # each device as the agent daemon runs it: a SuperNode and its warm executor
            node = SuperNodeProcess(FogLink(f"127.0.0.1:{port}", insecure=True), node_config={"store-dir": str(path)},
                                    env={**env, "FLWR_HOME": str(path.parent / f"{path.name}.flwr")},
                                    log_path=path.parent / f"{path.name}.supernode.log")
            node.start()
            nodes.append(node)
        out, _ = fog.communicate(timeout=timeout_s)  # a loaded 2-core machine: minutes per round
        assert fog.returncode == 0, out
        return out
    finally:
        for node in nodes:
            node.stop()
        stop_process(fog)
