"""Telemetry-driven selection in the simulator (``fleet.clients_per_round``): the deployed fog's
:class:`RoundSelector` over :class:`SimulatedFleetView`, the telemetry each simulated device would send."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hyprstream.agent.profile import Strategy
from hyprstream.cli import resolve_experiment
from hyprstream.errors import ConfigError
from hyprstream.fog.selection import RoundSelector
from hyprstream.protocol import DeviceInfo
from hyprstream.sim.clock import Link
from hyprstream.sim.experiment import load_experiment, reduced
from hyprstream.sim.fleet import SimulatedFleetView, StepPlan, VirtualFleet, load_profiles

HUB, GATEWAY = "battery-sensor-hub", "x86-gateway"


def _fleet(names: list[str]) -> VirtualFleet:
    by_name = load_profiles(sorted(set(names)))
    return VirtualFleet([by_name[n] for n in names], seed=0, local_samples=320, fog_core=Link(1000.0, 1000.0, 10.0),
                        names=names)


@pytest.mark.unit
def test_the_simulated_view_reports_each_devices_state_and_the_selector_follows_it():
    names = [HUB, HUB, GATEWAY, GATEWAY, HUB, GATEWAY]
    fleet = _fleet(names)
    ids = {i: f"dev-{i}" for i in range(len(names))}
    view = SimulatedFleetView(fleet, ids, task="digits")
    selector = RoundSelector(view, load_experiment(resolve_experiment("quickstart")).fleet.rules(), count=2,
                             clock=lambda: view.now)
    agents = {100 + i: DeviceInfo(ids[i], 4) for i in ids}
    # device 0: on battery at 5 % (below the 20 % floor); 1: at 90 %; 4: offline; 5: in minimal
    plan = StepPlan(0, np.array([True, True, True, True, False, True]),
                    (Strategy.FULL,) * 5 + (Strategy.MINIMAL,), np.array([5.0, 90.0, np.nan, np.nan, 50.0, np.nan]))
    view.update(plan, sim_s=12.5)
    seen = view.devices()
    assert seen["dev-0"].telemetry.resources.battery_percent == 5.0
    assert seen["dev-0"].telemetry.resources.on_ac_power is False
    assert seen["dev-2"].telemetry.resources.battery_percent is None  # mains-powered
    assert seen["dev-4"].online is False and seen["dev-5"].telemetry.strategy.accept_training is False
    assert all(v.age(view.now) == 0.0 for v in seen.values())

    first = selector.choose(agents, 0)
    why = selector.last.excluded
    assert why[100].startswith("battery 5%") and why[104] == "offline" and why[105].startswith("strategy minimal")
    # the three that may train: the two gateways (mains: battery scores 1) before the hub at 90 %
    assert sorted(first) == [102, 103]
    # the next step: fairness puts the one left out first (1 / (1 + 0) against 1 / (1 + 1), weight 2)
    view.update(plan, sim_s=20.0)
    second = selector.choose(agents, 1)
    assert 101 in second and len(second) == 2


@pytest.mark.unit
def test_clients_per_round_is_checked_against_the_fog(tmp_path):
    base = resolve_experiment("quickstart").read_text()
    cases = {
        "clients_per_round = 9": "larger than agents_per_fog",
        "clients_per_round = 1\n[privacy.secagg]\nclip = 1.0\nmin_clients = 2": "below privacy.secagg.min_clients",
    }
    path = tmp_path / "exp.toml"
    for extra, expected in cases.items():
        head, *rest = extra.split("\n")
        path.write_text(base.replace("[fleet]", "[fleet]\n" + head, 1) + "\n".join(rest) + "\n")
        with pytest.raises(ConfigError, match=expected):
            load_experiment(path)
    # the buffered mode chooses too (each free slot, from the devices' state at that simulated instant)
    path.write_text(base.replace("[fleet]", "[fleet]\nclients_per_round = 2", 1)
                    .replace("[training]", '[training]\nmode = "buffered"', 1) + "[buffered]\nbuffer_k = 2\n")
    assert load_experiment(path).fleet.clients_per_round == 2
    exp = load_experiment(resolve_experiment("quickstart"))
    assert {c.participants.value for c in exp.cells()} == {"all"}
    chosen = dataclasses.replace(exp, fleet=dataclasses.replace(exp.fleet, clients_per_round=2))
    assert {c.participants.value for c in chosen.cells()} == {"selected"}
    assert reduced(chosen).fleet.clients_per_round == 2


@pytest.mark.integration
@pytest.mark.slow
def test_secure_steps_with_client_dp_sample_at_each_devices_telemetry_rate(tmp_path):
    """SecAgg+ with client-level DP over a telemetry choice in the simulator: each fog round is a Poisson sample
    at each device's own rate q * s_i (s_i from its simulated telemetry and its participation only), the
    released mean divides by their sum -- recomputed here by hand from the fleet and participation tables --
    and the model's epsilon is that of the subsampled Gaussian at the largest rate, q (dp-accounting)."""
    import json

    import dp_accounting

    from hyprstream.sim import harness

    exp = reduced(load_experiment(resolve_experiment("digits-client-dp")))
    # six agents, so that every step's sample holds the two SecAgg+ needs (seeded: the same sample every run)
    exp = dataclasses.replace(exp, fleet=dataclasses.replace(exp.fleet, agents_per_fog=6, clients_per_round=2))
    result = harness.run(exp, tmp_path / "run")
    dp, w = exp.privacy.client_dp, exp.fleet.weights
    import pyarrow.parquet as pq

    part = pq.read_table(tmp_path / "run" / "participation.parquet").to_pylist()
    fleet = pq.read_table(tmp_path / "run" / "fleet.parquet").to_pylist()
    assert {r["profile"] for r in fleet} == {GATEWAY} and all(r["online"] for r in fleet)
    versions = json.loads((tmp_path / "run" / "core" / "digits-model" / "manifest.json").read_text())["versions"][1:]
    assert len(versions) == exp.training.global_steps
    total = w.resources + w.battery + w.fairness + w.freshness
    for step, version in enumerate(versions, start=1):
        expected = 0.0
        for device in range(exp.fleet.agents_per_fog):
            n = sum(1 for p in part if p["device"] == device and p["round"] < step)  # earlier steps it took part in
            # idle CPU and memory, no GPU: resources 2/3; mains power: battery 1; fresh telemetry: 1
            s = (w.resources * 2 / 3 + w.battery + w.fairness / (1 + n) + w.freshness) / total
            expected += dp.client_sampling_rate * s
        assert version["privacy"]["expected_participants"] == pytest.approx(expected, rel=1e-9), step
        assert expected < dp.client_sampling_rate * exp.fleet.agents_per_fog
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(dp.client_sampling_rate, dp_accounting.GaussianDpEvent(
                dp.noise_multiplier)), step)
        pld = dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(dp.delta)
        rdp = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(dp.delta)
        assert pld * 0.999 <= version["privacy"]["epsilon"] <= rdp * 1.001
    assert result.final_version == exp.training.global_steps
