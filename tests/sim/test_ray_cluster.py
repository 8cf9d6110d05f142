"""``hyprstream simulate`` on an existing Ray cluster (``[runtime] ray_address`` or ``RAY_ADDRESS``): a two-node
cluster started on this host (``ray.cluster_utils.Cluster``, every node on 127.0.0.1), the simulated agents
spread over its nodes by Flower's runtime, everything above them in the calling process as on a local instance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hyprstream.errors import HyprstreamError
from hyprstream.sim.experiment import load_experiment

ROOT = Path(__file__).resolve().parents[2]

# Run in a process of its own: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported (0 keeps the head,
# the second node and this driver on the loopback address), and the cluster's processes belong to that process'
# session, so that a timeout stops them all.
SCRIPT = r"""
import dataclasses, json, logging, os, sys
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
try:
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes(timeout=60)
    from hyprstream.cli import resolve_experiment
    from hyprstream.sim import harness
    from hyprstream.sim.experiment import load_experiment, reduced

    exp = reduced(load_experiment(resolve_experiment("quickstart")))
    exp = dataclasses.replace(exp, runtime=dataclasses.replace(exp.runtime, ray_address=cluster.address))
    result = harness.run(exp, Path(sys.argv[1]))
    import ray
    from ray._private import state

    ray.init(address=cluster.address, logging_level=logging.ERROR)
    alive = [n for n in ray.nodes() if n["Alive"]]
    nodes = sorted((n["NodeManagerAddress"], n["Resources"].get("CPU")) for n in alive)
    # where Flower's runtime ran the agents: its ClientApp actors, as the cluster's GCS remembers them
    actors = [a for a in state.actors().values() if "ClientAppActor" in a["ActorClassName"]]
    on = sorted({a["Address"]["NodeID"] for a in actors})
    ray.shutdown()
    print("RESULT " + json.dumps({"version": result.final_version, "accuracy": result.final_accuracy,
                                  "agents": exp.num_agents, "nodes": nodes, "actor_nodes": on,
                                  "node_ids": sorted(n["NodeID"] for n in alive)}), flush=True)
finally:
    cluster.shutdown()
"""


@pytest.mark.integration
@pytest.mark.slow
def test_simulate_runs_its_agents_on_a_two_node_ray_cluster(tmp_path):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path / "run")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=480)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the process and the cluster it started: its own session
        out, _ = proc.communicate()
        pytest.fail(f"the run on the Ray cluster did not finish in 480 s:\n{out[-4000:]}")
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, out[-4000:]
    result = json.loads(lines[0].removeprefix("RESULT "))
    # two nodes of one CPU each, both on loopback: a pool of two one-CPU agent actors has one on each
    assert result["nodes"] == [["127.0.0.1", 1.0], ["127.0.0.1", 1.0]]
    assert result["actor_nodes"] == result["node_ids"]  # the agents' actors ran on both nodes
    assert result["version"] >= 1 and 0.0 <= result["accuracy"] <= 1.0
    assert (tmp_path / "run" / "metrics.parquet").is_file()


@pytest.mark.unit
def test_an_unreachable_cluster_is_refused_at_once_by_name(tmp_path, monkeypatch):
    from hyprstream.sim.harness import simulate

    exp = load_experiment(ROOT / "simulations" / "quickstart.toml")
    for address, message in {"127.0.0.1:1": "cannot reach the Ray cluster at 127.0.0.1:1",
                             "ray://127.0.0.1:10001": "host:port", "auto": "host:port"}.items():
        monkeypatch.setenv("RAY_ADDRESS", address)
        with pytest.raises(HyprstreamError, match=message):
            simulate(exp, tmp_path, None, "hyprstream.agent.client_app:app")
    assert not (tmp_path / "devices").exists()  # refused before anything was set up
