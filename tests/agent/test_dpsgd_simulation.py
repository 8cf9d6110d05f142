"""The agent's ClientApp in Flower's simulation engine with the experiment's DP-SGD (configure_simulation):
each simulated device trains with seeded DP-SGD and charges its own ledger under the devices' root."""

from __future__ import annotations

import numpy as np
import pytest

from hyprstream.learning.task import Dataset, get_task
from hyprstream.learning.trainer import model_weights
from hyprstream.protocol import TRAIN_MESSAGE_TYPE, ReplyStatus, TrainReply, TrainRequest
from hyprstream.store import Store

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def make_devices(root, n):
    task = get_task("digits")
    train, _ = task.load_reference_data(seed=0)
    for i in range(n):
        with Store.open(root / f"device-{i:04d}", create=True) as store:
            store.create_table(task.table, task.schema)
            store.append(task.table, task.to_table(Dataset(train.x[i * 80:(i + 1) * 80], train.y[i * 80:(i + 1) * 80])))


def request(seed: int) -> TrainRequest:
    task = get_task("digits")
    return TrainRequest("digits", 3, "digits", ("head",), 4, 16, 0.05, seed, model_weights(task.build_model(seed=0)))


def test_simulated_devices_train_with_dpsgd_in_flowers_simulation_engine(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    pytest.importorskip("opacus")
    from flwr.app import Message
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from hyprstream.agent.client_app import SIM_DEVICES_ENV, THREADS_ENV, answer_train, app, configure_simulation
    from hyprstream.fog.discovery import discover, wait_for_nodes
    from hyprstream.privacy.accountant import GaussianEvent, epsilon
    from hyprstream.privacy.config import DpSgdConfig

    dpsgd = DpSgdConfig(noise_multiplier=1.1, max_grad_norm=1.0, epsilon_budget=30.0, delta=1e-5)
    sim, direct = tmp_path / "sim", tmp_path / "direct"
    for root in (sim, direct):
        make_devices(root, 2)
        configure_simulation(root, dpsgd)
    for k, v in {SIM_DEVICES_ENV: str(sim), THREADS_ENV: "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}.items():
        monkeypatch.setenv(k, v)
    out: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        try:
            nodes = wait_for_nodes(grid, 2, timeout_s=300)
            devices = discover(grid, nodes, timeout_s=300)
            messages = [Message(request(seed=7).to_content(), dst_node_id=node, message_type=TRAIN_MESSAGE_TYPE,
                                group_id="fog-sim/round-1") for node in nodes]
            replies = grid.send_and_receive(messages, timeout=300)
            out["replies"] = {devices[m.metadata.src_node_id].device_id: TrainReply.from_content(m.content)
                              for m in replies}
        except BaseException as exc:  # surfaced below: the engine would swallow it
            out["error"] = exc

    try:
        run_simulation(server_app=server_app, client_app=app, num_supernodes=2,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    except SystemExit as exc:
        out.setdefault("error", exc)
    if "error" in out:
        raise out["error"]
    replies = out["replies"]
    assert set(replies) == {"device-0000", "device-0001"}
    expected = epsilon([GaussianEvent(1.1, 16 / 80, 4)], 1e-5)
    for name, reply in replies.items():
        assert reply.status is ReplyStatus.OK, reply.reason
        assert reply.epsilon == pytest.approx(expected) and reply.delta_dp == 1e-5
        assert (sim / f"{name}.privacy").is_dir()  # each device's own ledger under the simulation's root

        class Ctx:  # the same device, trained directly: seeded DP-SGD gives the very same delta
            node_config = {"partition-id": int(name.rsplit("-", 1)[1])}

        monkeypatch.setenv(SIM_DEVICES_ENV, str(direct))
        again = answer_train(request(seed=7).to_content(), Ctx(), round="fog-sim/round-1")
        np.testing.assert_array_equal(again.delta["head.weight"], reply.delta["head.weight"])
