"""The simulated fleet's batteries and adaptive strategies (hyprstream.sim.fleet) and how a simulated
agent serves a train request under its strategy (hyprstream.agent.client_app.simulated_plan)."""

import json

import numpy as np
import pytest

from hyprstream.agent.client_app import device_name, simulated_plan, strategy_file
from hyprstream.agent.profile import Strategy
from hyprstream.errors import ConfigError
from hyprstream.protocol import TrainRequest
from hyprstream.sim.clock import Link
from hyprstream.sim.fleet import VirtualFleet, load_profiles

pytestmark = pytest.mark.unit

HUB = "battery-sensor-hub"  # min_battery_train 40 %, min_battery_full 80 %, hysteresis 5, dwell 120 s


def fleet_of(names: list[str], seed: int = 0, *, always_online: bool = True) -> VirtualFleet:
    by_name = load_profiles(sorted(set(names)))
    fleet = VirtualFleet([by_name[n] for n in names], seed=seed, local_samples=320,
                         fog_core=Link(1000.0, 1000.0, 10.0), names=names)
    if always_online:
        fleet.availability[:] = 1.0
    return fleet


def request(layers=("fc1", "fc2", "head")) -> TrainRequest:
    return TrainRequest("digits-model", 3, "digits", tuple(layers), 7, 16, 0.05, 11, weights={})


def test_batteries_start_at_seeded_levels_within_the_profiles_range():
    names = [HUB] * 200 + ["rpi4"] * 3
    fleet = fleet_of(names, seed=1)
    low = fleet.profiles[0].simulation.battery_start_min_percent
    assert 0 < low < 100
    assert np.all((fleet.battery[:200] >= low) & (fleet.battery[:200] <= 100))
    assert np.isnan(fleet.battery[200:]).all()  # mains powered
    assert np.array_equal(fleet.battery, fleet_of(names, seed=1).battery, equal_nan=True)
    assert not np.array_equal(fleet.battery[:200], fleet_of(names, seed=2).battery[:200])


def test_each_device_runs_the_agents_policy_on_its_battery():
    fleet = fleet_of([HUB, HUB, HUB, HUB, "rpi4"])
    fleet.battery[:4] = [30.0, 60.0, 82.0, 95.0]
    plan = fleet.plan_step(1, sim_s=0.0)
    # below 40: minimal; 60 clears 40 + 5 hysteresis: hybrid; 82 is above 80 but not 80 + 5: hybrid
    assert plan.strategies == (Strategy.MINIMAL, Strategy.HYBRID, Strategy.HYBRID, Strategy.FULL, Strategy.FULL)
    assert [plan.trains(d) for d in range(5)] == [False, True, True, True, True]
    assert np.array_equal(plan.battery[:4], [30.0, 60.0, 82.0, 95.0])

    # the full hub's battery drops below 80: the policy's dwell (120 s of simulated time) holds it in full
    fleet.battery[3] = 70.0
    assert fleet.plan_step(2, sim_s=60.0).strategies[3] is Strategy.FULL
    assert fleet.plan_step(3, sim_s=121.0).strategies[3] is Strategy.HYBRID


def test_an_offline_device_is_not_asked_and_keeps_its_state():
    fleet = fleet_of([HUB, "rpi4"])
    fleet.battery[0] = 95.0
    fleet.availability[0] = 0.0
    plan = fleet.plan_step(1, sim_s=0.0)
    assert not plan.online[0] and not plan.trains(0) and plan.trains(1)
    assert plan.strategies[0] is Strategy.MINIMAL  # the profile's initial strategy: it observed nothing


def test_batteries_drain_while_working_and_charge_over_time():
    fleet = fleet_of([HUB, HUB, HUB, "x86-gateway"])
    sim = fleet.profiles[0].simulation
    fleet.battery[:3] = [50.0, 0.5, 99.99]
    fleet.finish_step({0: 1000.0, 1: 10_000.0, 3: 5.0}, step_s=100.0)
    assert fleet.battery[0] == pytest.approx(50.0 - 1000.0 * sim.battery_drain_percent_per_s
                                             + 100.0 * sim.battery_charge_percent_per_s)
    assert fleet.battery[1] == pytest.approx(100.0 * sim.battery_charge_percent_per_s)  # never below 0
    assert fleet.battery[2] == 100.0  # never above 100
    assert np.isnan(fleet.battery[3])


def test_a_simulated_agent_serves_requests_as_its_strategy_allows(tmp_path):
    fleet = fleet_of([HUB, HUB, HUB])
    fleet.battery[:] = [10.0, 60.0, 99.0]
    fleet.write_strategies(tmp_path, fleet.plan_step(1, sim_s=0.0))
    plans = [simulated_plan(request(), tmp_path / device_name(i)) for i in range(3)]
    assert not plans[0].accept and "minimal" in plans[0].reason
    keep = fleet.profiles[1].training.max_layer_groups_hybrid
    assert plans[1].accept and plans[1].layers == ("fc1", "fc2", "head")[-keep:]
    assert plans[2].accept and plans[2].layers == ("fc1", "fc2", "head")
    assert (plans[2].local_steps, plans[2].batch_size, plans[2].device) == (7, 16, "cpu")  # the request's


def test_without_a_strategy_file_the_request_is_served_as_asked(tmp_path):
    assert simulated_plan(request(), tmp_path / device_name(0)) is None


@pytest.mark.parametrize("content", [
    "not json", json.dumps([1]), json.dumps({"schema": "other/1", "strategy": "full", "max_layer_groups_hybrid": 1}),
    json.dumps({"schema": "hyprstream.sim-strategy/1", "strategy": "turbo", "max_layer_groups_hybrid": 1}),
    json.dumps({"schema": "hyprstream.sim-strategy/1", "strategy": "hybrid", "max_layer_groups_hybrid": 0}),
    json.dumps({"schema": "hyprstream.sim-strategy/1", "strategy": "hybrid"}),
])
def test_a_damaged_strategy_file_is_a_clear_error(tmp_path, content):
    store = tmp_path / device_name(0)
    strategy_file(store).write_text(content)
    with pytest.raises(ConfigError) as err:
        simulated_plan(request(), store)
    assert str(strategy_file(store)) in str(err.value)
