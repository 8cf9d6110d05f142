"""Telemetry-driven selection with client-level DP. The accountant assumes each agent of the fog takes
part in a round independently, with probability at most q (Poisson sampling); a top-M choice breaks that
(one device added to the fleet can displace another: sensitivity 2 C). So with client-level DP the fog
samples instead: every eligible agent with probability q (``clients_per_round = 0``), or with
``q * s_i``, ``s_i`` in [0, 1] its own telemetry score (``clients_per_round > 0``). Either way a device's
probability is a function of its own record, never of another device's, and never above q."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fleet_helpers import telemetry
from hypothesis import given, settings
from hypothesis import strategies as st
from test_selection import NOW, view_of

from hyprstream.agent.profile import Strategy
from hyprstream.fog.selection import inclusion_rates, select_agents
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


def test_config_validate_accepts_selection_with_client_dp(tmp_path):
    for count in (3, 0):
        path = tmp_path / f"fog-{count}.toml"
        fog_toml(path, clients_per_round=count)
        proc = validate(path)
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


@settings(max_examples=60, deadline=None)
@given(st.lists(DEVICE, min_size=1, max_size=8), DEVICE, DEVICE, st.floats(0.01, 1.0))
def test_telemetry_rates_are_each_devices_own_and_never_above_the_charged_rate(fleet, added, other, q):
    """``clients_per_round > 0`` with client DP: adding a device, or changing its data (its size, its spent
    sample-level budget), changes no other device's probability; every probability lies in [0, q]; an
    excluded device's is 0; and the denominator does not move with any device's data."""
    def sampling(devices):
        records = [telemetry(f"d{i}", cpu=d["cpu"], memory=d["memory"], battery=d["battery"], ac=d["ac"],
                             strategy=d["strategy"], spent=d["spent"]) for i, d in enumerate(devices)]
        agents = {i + 1: DeviceInfo(f"d{i}", d["examples"]) for i, d in enumerate(devices)}
        return inclusion_rates(agents, view_of(records), rate=q, now=NOW)

    before = sampling(fleet)
    grown = sampling([*fleet, added])
    assert {n: p for n, p in grown.rates.items() if n <= len(fleet)} == before.rates
    assert all(0.0 <= p <= q for p in grown.rates.values())
    assert all(grown.rates[n] == 0.0 for n in grown.excluded)
    # the added device with other data (size, sample-level budget): only its own probability may change
    changed = sampling([*fleet, {**added, "examples": other["examples"], "spent": other["spent"]}])
    assert {n: p for n, p in changed.rates.items() if n <= len(fleet)} == before.rates
    assert changed.expected == grown.expected


def test_a_client_dp_round_samples_at_the_telemetry_rates_and_divides_by_their_sum(tmp_path):
    """A client-level DP round (secure, or plain with the fog's noise: the same bookkeeping) draws the sample at
    the given rates (each at most q, the rate charged) and the released mean divides by the fixed expected count
    the rates give, never by who answered."""
    from hyprstream.fog.dp import ClientDpRounds
    from hyprstream.fog.selection import Sampling
    from hyprstream.privacy.config import ClientDpConfig
    from hyprstream.privacy.errors import PrivacyViolation
    from hyprstream.privacy.noise import SeededRandom

    class Fog:  # what the sampling reads of the fog
        name, model, node_ids = "fog-a", "digits", [1, 2, 3, 4]

    secure = ClientDpRounds(Fog(), ClientDpConfig(noise_multiplier=1.0, client_sampling_rate=0.5), 1.0,
                            source=SeededRandom(3))
    rates = {1: 0.5, 2: 0.25, 3: 0.0, 4: 0.1}
    taken = {n: 0 for n in rates}
    for _ in range(4000):
        nodes, expected = secure.sample((1, 2, 3, 4), Sampling(rates, 0.85, {3: "offline"}))
        assert expected == 0.85
        for n in nodes:
            taken[n] += 1
    for n, p in rates.items():
        assert abs(taken[n] / 4000 - p) < 0.03, (n, taken[n])
    assert taken[3] == 0
    with pytest.raises(PrivacyViolation, match="above the charged rate"):
        secure.sample((1,), Sampling({1: 0.6}, 0.6, {}))
    assert secure.dp(0.85).denominator == 1.0  # never below one expected participant
    assert secure.dp(2.5).denominator == 2.5
