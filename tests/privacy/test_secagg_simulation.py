"""End to end: the secure fog round in a Flower ServerApp, agents as real ClientApps in Flower's simulation engine."""

from __future__ import annotations

import numpy as np
import pytest
from privacy_helpers import agent_app, make_devices, start_core

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_secure_round_over_flower_simulation(tmp_path, monkeypatch) -> None:
    pytest.importorskip("ray")
    import privacy_helpers
    import test_secagg_workflow as workflow_tests
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation
    from ray import cloudpickle

    from hyprstream.agent.client_app import SIM_DEVICES_ENV, THREADS_ENV
    from hyprstream.fog.aggregator import FogAggregator
    from hyprstream.privacy.config import SecAggConfig
    from hyprstream.privacy.noise import SeededRandom
    from hyprstream.fog.secure import SecureFogAggregator
    from hyprstream.sim.harness import discover, wait_for_nodes

    n = 4
    make_devices(tmp_path, n)
    for k, v in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", SIM_DEVICES_ENV: str(tmp_path),
                 THREADS_ENV: "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}.items():
        monkeypatch.setenv(k, v)
    # Ray workers cannot import the test helpers: ship them by value
    cloudpickle.register_pickle_by_value(privacy_helpers)
    core = start_core(tmp_path / "core")  # a real core Flight server on loopback
    out: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        try:
            nodes = wait_for_nodes(grid, n, timeout_s=120)
            devices = discover(grid, nodes, timeout_s=120)
            fog = FogAggregator("fog-a", grid, nodes, core.client, "digits", workflow_tests.PLAN)
            secure = SecureFogAggregator(fog, SecAggConfig(clip=0.5, stage_timeout_s=120.0), source=SeededRandom(0))
            fog.plan = type(fog.plan)(**{**fog.plan.__dict__, "timeout_s": 180.0})
            pending = secure.start_round(1)
            out.update(result=secure.finish_round(pending), pending=pending, secure=secure,
                       stores={node: tmp_path / info.device_id for node, info in devices.items()})
        except BaseException as exc:  # surfaced below: the engine would swallow it
            out["error"] = exc

    try:
        run_simulation(server_app=server_app, client_app=agent_app(), num_supernodes=n,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    except SystemExit as exc:  # Flower may exit on errors; the assertions below say what happened
        out.setdefault("error", exc)
    finally:
        cloudpickle.unregister_pickle_by_value(privacy_helpers)
        core.close()
    if "error" in out:
        raise out["error"]
    result, pending = out["result"], out["pending"]
    assert result.version == 1 and result.participants == n, result.reasons
    expected = workflow_tests.expected_mean(out["secure"], pending, out["stores"], set(pending.nodes))
    for name, value in expected.items():
        np.testing.assert_array_equal(core.pushes[0]["delta"][name], value)
