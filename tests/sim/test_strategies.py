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


def test_on_the_buffered_clock_a_battery_charges_with_time_drains_with_work_and_sets_the_strategy():
    """Buffered mode (VirtualFleet.observe_at): the hub's pack, by hand. The profile charges 0.0004 %/s and
    drains 0.002 %/s while working; the policy goes minimal below 40 % and hybrid above 45 %."""
    fleet = fleet_of([HUB, "rpi4"])
    hub = fleet.profiles[0].simulation
    charge, drain = hub.battery_charge_percent_per_s, hub.battery_drain_percent_per_s
    fleet.battery[0] = 50.0
    assert fleet.observe_at(0, 0.0) and fleet.strategy(0) is Strategy.HYBRID
    fleet.worked(0, 0.0, 3000.0)  # a job from t = 0 to 3000 s
    assert fleet.observe_at(0, 1000.0) and fleet.battery[0] == pytest.approx(50.0 + 1000 * charge)  # not done yet
    fleet.observe_at(0, 4000.0)  # done by now: drained for its 3000 s, charged for all 4000
    assert fleet.battery[0] == pytest.approx(50.0 + 4000 * charge - 3000 * drain)  # 45.6 %
    fleet.worked(0, 4000.0, 2000.0)
    fleet.observe_at(0, 6000.0)  # 42.4 %: still hybrid (minimal below 40)
    assert fleet.battery[0] == pytest.approx(50.0 + 6000 * charge - 5000 * drain)
    fleet.worked(0, 6000.0, 3000.0)
    fleet.observe_at(0, 9000.0)  # 37.6 %: minimal
    assert fleet.battery[0] == pytest.approx(50.0 + 9000 * charge - 8000 * drain) and fleet.strategy(0) is Strategy.MINIMAL
    fleet.observe_at(0, 8000.0)  # an earlier instant changes nothing
    assert fleet.battery[0] == pytest.approx(37.6)
    assert fleet.observe_at(1, 9000.0) and np.isnan(fleet.battery[1]) and fleet.strategy(1) is Strategy.FULL
    snap = fleet.snapshot(4)
    assert snap.step == 4 and snap.strategies == (Strategy.MINIMAL, Strategy.FULL) and snap.battery[0] == pytest.approx(37.6)


def test_on_the_buffered_clock_availability_is_drawn_per_device_and_instant():
    fleet = fleet_of([HUB] * 400, always_online=False)  # availability 0.7
    instants = [float(t) for t in range(50)]
    up = np.array([[fleet.online_at(d, t) for t in instants] for d in range(400)])
    assert abs(up.mean() - fleet.availability[0]) < 0.02
    assert np.array_equal(up[:, 7], [fleet.online_at(d, 7.0) for d in range(400)])  # the same instant, the same answer
    assert 0.2 < np.mean(up[:, 7] != up[:, 8]) < 0.6  # independent per instant: 2 * 0.7 * 0.3 = 0.42 differ
    fleet.availability[:] = 0.0
    assert not any(fleet.observe_at(d, 1.0) for d in range(5)) and not fleet.snapshot(1).online[:5].any()
