"""The agent's train handler on a real store, and the ClientApp's refusal path."""

import numpy as np
import pytest

from hyprstream.agent.client_app import answer_train, handle_train
from hyprstream.agent.policy import BUDGET_DECLINE
from hyprstream.learning.task import get_task
from hyprstream.learning.trainer import model_weights
from hyprstream.protocol import ReplyStatus, TrainReply, TrainRequest
from hyprstream.store import Store

pytestmark = pytest.mark.unit


@pytest.fixture()
def device(tmp_path):
    task = get_task("digits")
    train_set, _ = task.load_reference_data(seed=0)
    from hyprstream.learning.task import Dataset

    path = tmp_path / "device-0000"
    with Store.open(path, create=True) as store:
        store.create_table(task.table, task.schema)
        store.append(task.table, task.to_table(Dataset(train_set.x[:200], train_set.y[:200])))
    return task, path


def request(digits, layers=("fc1",), **over):
    weights = model_weights(digits.build_model(seed=3))
    fields = dict(model="m", model_version=7, task="digits", layers=layers, local_steps=5, batch_size=16,
                  lr=0.01, seed=1, weights=weights)
    return TrainRequest(**{**fields, **over})


def test_trains_only_requested_layers(device):
    task, path = device
    req = request(task, ("fc2",))
    reply = handle_train(req, path)
    assert reply.status is ReplyStatus.OK and reply.model_version == 7
    assert set(reply.delta) == {"fc2.weight", "fc2.bias"}
    assert reply.num_examples == 200 and reply.steps == 5
    assert np.abs(reply.delta["fc2.weight"]).sum() > 0
    # same request, same seed: same delta (reproducible local training)
    again = handle_train(req, path)
    np.testing.assert_array_equal(again.delta["fc2.weight"], reply.delta["fc2.weight"])


class FakeContext:
    def __init__(self, store_dir):
        self.node_config = {"store-dir": str(store_dir)}


@pytest.mark.parametrize("over, reason", [
    ({"layers": ("fc1", "fc9")}, "unknown layer group"),
    ({"task": "weather"}, "unknown task"),
    ({"weights": {"fc1.weight": np.zeros((1, 1), np.float32)}}, "do not fit the model"),
])
def test_clientapp_declines_what_it_cannot_serve(device, over, reason):
    task, path = device
    reply = TrainReply.from_content(answer_train(request(task, **over).to_content(), FakeContext(path)).to_content())
    assert reply.status is ReplyStatus.DECLINED and reason in reply.reason and not reply.delta


def test_no_store_declines(tmp_path, device):
    task, _ = device
    reply = answer_train(request(task).to_content(), FakeContext(tmp_path / "missing"))
    assert reply.status is ReplyStatus.DECLINED and "no store" in reply.reason


def test_agent_app_answers_layerwise_secure_and_device_messages():
    from hyprstream.agent.client_app import app

    handlers = set(app._registered_funcs)  # Flower's registry of message types this app serves
    assert {"train.layerwise", "train.secagg", "query.device"} <= handlers


# ------------------------------------------------------------------------------------------ DP-SGD

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def dp_settings(budget=50.0, secure=False):
    from hyprstream.privacy.dpsgd import DpSgd
    from hyprstream.privacy.ledger import Budget

    return DpSgd(1.1, 1.0, Budget(budget, 1e-5), secure=secure)


def test_dpsgd_rounds_charge_the_ledger_and_compose_across_restarts(device):
    pytest.importorskip("opacus")
    from hyprstream.agent.client_app import PrivateTraining
    from hyprstream.privacy.accountant import GaussianEvent, epsilon
    from hyprstream.privacy.dpsgd import ledger_dir_for
    from hyprstream.privacy.ledger import PrivacyLedger, Scope

    task, path = device
    event = GaussianEvent(1.1, 16 / 200, 5)
    for n in (1, 2, 3):  # a fresh PrivateTraining each round: the spend lives in the ledger, not in memory
        private = PrivateTraining(dp_settings(), ledger_dir_for(path), "dev-1")
        reply = handle_train(request(task, ("fc2",), model_version=n), path, privacy=private, round=f"fog/round-{n}")
        assert reply.status is ReplyStatus.OK and set(reply.delta) == {"fc2.weight", "fc2.bias"}
        assert reply.epsilon == pytest.approx(epsilon([event] * n, 1e-5)) and reply.delta_dp == 1e-5
    # the reply's spend survives the wire format, and the ledger holds one entry per round
    wire = TrainReply.from_content(reply.to_content())
    assert wire.epsilon == pytest.approx(reply.epsilon) and wire.delta_dp == 1e-5
    with Store.open(ledger_dir_for(path), readonly=True) as store:
        entries = PrivacyLedger(store).entries(Scope.DEVICE, "dev-1")
    assert [(e.charge.base_version, e.charge.round) for e in entries] == [(n, f"fog/round-{n}") for n in (1, 2, 3)]


def test_a_round_over_the_device_budget_is_declined_and_trains_nothing(device, monkeypatch):
    pytest.importorskip("opacus")
    from hyprstream.agent.client_app import (
        SIM_DEVICES_ENV,
        PrivateTraining,
        configure_simulation,
        simulation_dpsgd,
    )
    from hyprstream.privacy.accountant import GaussianEvent, epsilon
    from hyprstream.privacy.config import DpSgdConfig
    from hyprstream.privacy.dpsgd import ledger_dir_for

    task, path = device
    one, two = (epsilon([GaussianEvent(1.1, 16 / 200, 5)] * n, 1e-5) for n in (1, 2))
    configure_simulation(path.parent, DpSgdConfig(noise_multiplier=1.1, max_grad_norm=1.0,
                                                  epsilon_budget=(one + two) / 2, delta=1e-5))
    monkeypatch.setenv(SIM_DEVICES_ENV, str(path.parent))

    class Ctx:  # simulated device 0: its store is path, its ledger path + ".privacy"
        node_config = {"partition-id": 0}

    first = answer_train(request(task).to_content(), Ctx())
    assert first.status is ReplyStatus.OK and first.epsilon == pytest.approx(one)
    reply = answer_train(request(task).to_content(), Ctx())
    assert reply.status is ReplyStatus.DECLINED and reply.reason == BUDGET_DECLINE and not reply.delta
    settings = simulation_dpsgd(path.parent)
    assert settings.budget.epsilon == pytest.approx((one + two) / 2) and not settings.secure
    private = PrivateTraining(settings, ledger_dir_for(path), path.name)
    assert private.spend(200, 16, 5) == pytest.approx((one, two))  # the declined round charged nothing


def test_the_planner_declines_when_the_budget_left_cannot_pay_for_a_round(device, tmp_path):
    pytest.importorskip("opacus")
    import time

    from hyprstream.agent.client_app import PrivateTraining, plan_request
    from hyprstream.agent.handoff import PolicyState, write_policy
    from hyprstream.agent.profile import Strategy, load_profile
    from hyprstream.privacy.accountant import GaussianEvent, epsilon

    task, path = device
    rpi4 = (ROOT / "firmware-configs" / "rpi4.toml").read_text()
    section = "\n[privacy.dpsgd]\nnoise_multiplier = 1.1\nmax_grad_norm = 1.0\n"
    (tmp_path / "default.toml").write_text(rpi4 + section)
    prof = load_profile(tmp_path / "default.toml")
    settings = prof.dpsgd()
    assert (settings.budget.epsilon, settings.budget.delta) == (prof.training.privacy_epsilon,
                                                                prof.training.privacy_delta)  # [training]'s
    assert settings.secure and prof.privacy.ledger_dir(path) == path.with_name(path.name + ".privacy")
    # rpi4, strategy full: batch min(16, batch_size_full = 16), 5 steps over the store's 200 examples
    one, two = (epsilon([GaussianEvent(1.1, 16 / 200, 5)] * n, 1e-5) for n in (1, 2))
    profile = tmp_path / "dp-device.toml"
    profile.write_text(rpi4 + section + f"epsilon_budget = {float((one + two) / 2)!r}\ndelta = 1e-5\n")
    state = tmp_path / "state"
    state.mkdir()
    write_policy(state, PolicyState(Strategy.FULL, time.time(), 45.0, False, "test", str(profile)))

    class Ctx:
        node_config = {"store-dir": str(path), "state-dir": str(state), "device-id": "dev-7"}

    # the ClientApp finds DP-SGD in the daemon's profile and trains privately
    req = request(task, ("head",), local_steps=5)
    reply = answer_train(req.to_content(), Ctx())
    assert reply.status is ReplyStatus.OK and reply.epsilon == pytest.approx(one), reply.reason
    # the next round would go over the budget: the planner declines it before anything trains
    private = PrivateTraining(load_profile(profile).dpsgd(), load_profile(profile).privacy.ledger_dir(path), "dev-7")
    plan = plan_request(req, state, privacy=private, num_examples=200)
    assert not plan.accept and plan.reason == BUDGET_DECLINE  # no epsilon: it is a function of the data size
    assert plan_request(req, state).accept  # the same plan without DP-SGD
    reply = answer_train(req.to_content(), Ctx())
    assert reply.status is ReplyStatus.DECLINED and "privacy budget" in reply.reason and not reply.delta
    assert private.spend(200, 16, 5) == pytest.approx((one, two))


def test_simulated_devices_train_with_the_experiments_dpsgd(tmp_path, monkeypatch):
    pytest.importorskip("opacus")
    from hyprstream.agent.client_app import SIM_DEVICES_ENV, SIM_PRIVACY_FILE, configure_simulation
    from hyprstream.learning.task import Dataset
    from hyprstream.errors import ConfigError
    from hyprstream.privacy.accountant import GaussianEvent, epsilon
    from hyprstream.privacy.config import DpSgdConfig

    task = get_task("digits")
    train_set, _ = task.load_reference_data(seed=0)
    replies = []
    for run in ("a", "b"):
        root = tmp_path / run
        with Store.open(root / "device-0003", create=True) as store:
            store.create_table(task.table, task.schema)
            store.append(task.table, task.to_table(Dataset(train_set.x[:100], train_set.y[:100])))
        configure_simulation(root, DpSgdConfig(noise_multiplier=1.1, max_grad_norm=1.0, epsilon_budget=20.0,
                                               delta=1e-5))
        monkeypatch.setenv(SIM_DEVICES_ENV, str(root))

        class Ctx:
            node_config = {"partition-id": 3}

        replies.append(answer_train(request(task, ("head",), seed=11).to_content(), Ctx()))
        assert (root / "device-0003.privacy").is_dir()  # the device's ledger under the simulation's root
    a, b = replies
    assert a.status is ReplyStatus.OK and a.epsilon == pytest.approx(epsilon([GaussianEvent(1.1, 16 / 100, 5)], 1e-5))
    np.testing.assert_array_equal(a.delta["head.weight"], b.delta["head.weight"])  # seeded: reproducible
    plain = handle_train(request(task, ("head",), seed=11), tmp_path / "a" / "device-0003")
    assert not np.array_equal(plain.delta["head.weight"], a.delta["head.weight"])  # clipped and noised
    configure_simulation(tmp_path / "a", None)
    assert not (tmp_path / "a" / SIM_PRIVACY_FILE).exists()
    with pytest.raises(ConfigError, match="epsilon_budget"):
        configure_simulation(tmp_path / "a", DpSgdConfig(noise_multiplier=1.1, max_grad_norm=1.0))
