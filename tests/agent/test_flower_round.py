"""One fog round over Flower's deployment engine against a real agent: SuperLink on loopback, the
agent's SuperNode, and the very ClientApp the simulator runs (``hyprstream.agent.client_app:app``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_daemon import agent_cli
from test_supernode import superlink  # noqa: F401  (fixture)

from hyprstream.learning.task import Dataset, get_task
from hyprstream.protocol import data_bucket
from hyprstream.store import Store

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
APP = Path(__file__).parent / "flower_app"


def permissive_profile(tmp_path: Path) -> Path:
    """x86-gateway with thresholds no busy test machine can break: the round is never declined."""
    text = (ROOT / "firmware-configs" / "x86-gateway.toml").read_text()
    for key, value in {"full_max_cpu_percent": 99.0, "hybrid_max_cpu_percent": 100.0, "hysteresis_percent": 0.5,
                       "max_memory_percent": 100.0, "max_soc_temp_c": 125.0, "interval_s": 1.0}.items():
        text = re.sub(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
    path = tmp_path / "profile.toml"
    path.write_text(text)
    return path


def test_a_fog_round_reaches_the_agents_clientapp(tmp_path, superlink):  # noqa: F811
    port, _ = superlink
    key = os.urandom(32)
    (tmp_path / "key").write_bytes(key)
    task = get_task("digits")
    train, _ = task.load_reference_data(0)
    with Store.open(tmp_path / "store", create=True, key=key) as store:
        store.create_table(task.table, task.schema)
        store.append(task.table, task.to_table(Dataset(train.x[:150], train.y[:150])))
    agent = subprocess.Popen(
        [*agent_cli(), "run", "--config", str(permissive_profile(tmp_path)), "--fog", f"127.0.0.1:{port}",
         "--fog-insecure", "--device-id", "dev-a", "--store", str(tmp_path / "store"),
         "--store-key", str(tmp_path / "key")],
        stdout=(tmp_path / "agent.log").open("wb"), stderr=subprocess.STDOUT)
    home = tmp_path / "flwr-user"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n[superlink.local]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    out = tmp_path / "round.json"
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    flwr = str(Path(sys.executable).with_name("flwr"))
    try:
        run = subprocess.run([flwr, "run", str(APP), "local", "--stream", "--run-config", f'out="{out}"'],
                             capture_output=True, text=True, env=env, timeout=300)
        assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:] + (tmp_path / "agent.log").read_text()
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)
    (reply,) = json.loads(out.read_text())
    assert reply["device_id"] == "dev-a" and reply["data_bucket"] >= data_bucket(150)
    assert reply["status"] == "ok", reply["reason"]
    # full trains fc2 and head; so does hybrid (x86-gateway: up to 4 groups): the layers requested
    assert reply["layers"] == ["fc2", "head"] and reply["steps"] == 5 and reply["num_examples"] == 150
    assert reply["delta_keys"] == ["fc2.bias", "fc2.weight", "head.bias", "head.weight"]
    assert reply["delta_norm"] > 0
    # the global model of the request was handed to the daemon for inference
    assert (tmp_path / "store.state" / "models" / "digits" / "v11.arrow").exists()
