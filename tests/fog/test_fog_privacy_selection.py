"""Telemetry-driven selection with client-level DP. The accountant assumes each agent of the fog takes
part in a round independently with probability q (Poisson sampling); a top-M choice breaks that (one
device added to the fleet can displace another: sensitivity 2 C), so `config validate` refuses it, and
the selection that stays allowed (every eligible agent, then the Poisson sample) keeps each device's
inclusion independent of the other devices."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fleet_helpers import telemetry
from hypothesis import given, settings
from hypothesis import strategies as st
from test_selection import NOW, view_of

from hyprstream.agent.profile import Strategy
from hyprstream.fog.selection import select_agents
from hyprstream.protocol import DeviceInfo

pytestmark = pytest.mark.unit


def fog_toml(path, clients_per_round: int) -> None:
    (path.parent / "fog.token").write_text("fog-token\n")
    path.write_text(f"""
kind = "fog"
name = "fog-west"
[core]
location = "grpc://127.0.0.1:1"
token_file = "{path.parent / 'fog.token'}"
model = "digits-model"
[rounds]
task = "digits"
[fleet]
fleet = "plant-7"
mqtt_host = "127.0.0.1"
clients_per_round = {clients_per_round}
[privacy.secagg]
clip = 0.5
[privacy.client_dp]
noise_multiplier = 1.0
client_sampling_rate = 0.5
""")


def validate(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hyprstream.cli", "config", "validate", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_config_validate_refuses_top_m_selection_with_client_dp(tmp_path):
    top_m, every = tmp_path / "top-m.toml", tmp_path / "every.toml"
    fog_toml(top_m, clients_per_round=3)
    fog_toml(every, clients_per_round=0)
    proc = validate(top_m)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "fleet.clients_per_round" in proc.stderr and "Poisson" in proc.stderr, proc.stderr
    assert "client_sampling_rate" in proc.stderr  # says what to set instead
    proc = validate(every)
    assert proc.returncode == 0, proc.stdout + proc.stderr


DEVICE = st.fixed_dictionaries({
    "cpu": st.floats(0, 100), "memory": st.floats(0, 100),
    "battery": st.one_of(st.none(), st.floats(0, 100)), "ac": st.one_of(st.none(), st.booleans()),
    "strategy": st.sampled_from(list(Strategy)), "spent": st.floats(0, 10),
    "examples": st.integers(1, 10_000),
})


@settings(max_examples=60, deadline=None)
@given(st.lists(DEVICE, min_size=1, max_size=8), DEVICE, st.integers(0, 2**32 - 1))
def test_with_every_eligible_agent_one_added_device_changes_no_other_inclusion(fleet, added, seed):
    """The selection allowed with client DP (``clients_per_round = 0``): a device is asked or not by its own
    telemetry alone, so adding a device to the fleet changes no other device's inclusion; the Poisson
    sample over them then includes each with probability q (or 0 when excluded), q the ledger's rate."""
    def agents_and_view(devices):
        records = [telemetry(f"d{i}", cpu=d["cpu"], memory=d["memory"], battery=d["battery"], ac=d["ac"],
                             strategy=d["strategy"], spent=d["spent"]) for i, d in enumerate(devices)]
        return {i + 1: DeviceInfo(f"d{i}", d["examples"]) for i, d in enumerate(devices)}, view_of(records)

    agents, view = agents_and_view(fleet)
    grown_agents, grown_view = agents_and_view([*fleet, added])
    before = select_agents(agents, view, count=0, now=NOW, seed=seed)
    after = select_agents(grown_agents, grown_view, count=0, now=NOW, seed=seed)
    assert set(after.chosen) - {len(fleet) + 1} == set(before.chosen)
