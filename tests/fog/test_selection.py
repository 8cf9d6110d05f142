"""Telemetry-driven selection of a round's agents: hand-checked rankings and property tests."""

from __future__ import annotations

import pytest
from fleet_helpers import status, telemetry
from hypothesis import given, settings
from hypothesis import strategies as st

from hyprstream.agent.profile import Strategy
from hyprstream.telemetry.records import DeviceState, telemetry_topic, to_wire
from hyprstream.errors import ConfigError, ValidationError
from hyprstream.fog.fleet import DeviceView, FleetView
from hyprstream.fog.selection import (
    Participation,
    SelectionRules,
    SelectionWeights,
    exclusion,
    score,
    select_agents,
)
from hyprstream.protocol import DeviceInfo

pytestmark = pytest.mark.unit

NOW = 1000.0


def view_of(records, now=NOW) -> dict[str, DeviceView]:
    """Feed records through a real FleetView (as if they came from the broker at ``now``)."""
    fleet = FleetView("plant-7", clock=lambda: now)
    for rec in records:
        kind = "status" if hasattr(rec, "state") else "telemetry"
        topic = telemetry_topic(rec.fleet, rec.device_id) if kind == "telemetry" else \
            f"hyprstream/v1/{rec.fleet}/{rec.device_id}/status"
        assert fleet.ingest(topic, to_wire(rec))
    return fleet.devices()


def test_exclusions_ranking_and_fallback_by_hand():
    records = [
        telemetry("a", cpu=10.0, memory=20.0, ac=True),  # plenty free, mains power
        telemetry("b", cpu=90.0, memory=90.0, battery=30.0, ac=False),  # busy, on battery
        telemetry("c", strategy=Strategy.MINIMAL),
        telemetry("d", spent=8.0, budget=8.0),
        telemetry("e", battery=10.0, ac=False),
        status("f", DeviceState.ONLINE), status("f", DeviceState.OFFLINE),
    ]
    fleet = view_of(records)
    agents = {i: DeviceInfo(d, 100) for i, d in enumerate("abcdefg", start=1)}  # g: no telemetry at all
    sel = select_agents(agents, fleet, count=2, now=NOW, seed=0)
    assert sel.chosen == (1, 7)
    assert sel.excluded == {3: "strategy minimal: does not train", 4: "privacy budget spent (epsilon budget 8)",
                            5: "battery 10% below 20%", 6: "offline", 2: "not chosen: lower score"}
    w = SelectionWeights()
    # a: resources (0.9 + 0.8 + 0) / 3, battery 1, fairness 1, freshness 1 (age 0), data 1
    assert sel.scores[1] == pytest.approx(w.resources * 1.7 / 3 + w.battery + w.fairness + w.freshness + w.data)
    # b: resources (0.1 + 0.1) / 3, battery 0.3
    assert sel.scores[2] == pytest.approx(w.resources * 0.2 / 3 + w.battery * 0.3 + w.fairness + w.freshness + w.data)
    # g: no telemetry: neutral resources and battery, no freshness
    assert sel.scores[7] == pytest.approx(w.resources * 0.5 + w.battery * 0.5 + w.fairness + w.data)
    # stale telemetry counts as none; participation lowers the score
    stale = view_of([telemetry("a", ac=True)], now=NOW - 301)
    assert score(stale["a"], participations=0, data_share=1.0, now=NOW, rules=SelectionRules()) == \
        pytest.approx(sel.scores[7])
    again = select_agents(agents, fleet, count=2, now=NOW, seed=0, participation={"a": 3})
    assert again.chosen == (7, 2)


@st.composite
def fleets(draw):
    n = draw(st.integers(1, 12))
    records, agents = [], {}
    for i in range(n):
        device = f"dev-{i}"
        node = 100 + 7 * i
        agents[node] = DeviceInfo(device, draw(st.integers(0, 1000)))
        kind = draw(st.sampled_from(["telemetry", "none", "offline"]))
        if kind == "offline":
            records.append(status(device, DeviceState.OFFLINE))
        if kind == "telemetry" or (kind == "offline" and draw(st.booleans())):
            on_ac = draw(st.one_of(st.none(), st.booleans()))
            records.append(telemetry(
                device, session="s1", cpu=draw(st.floats(0, 100)), memory=draw(st.floats(0, 100)),
                battery=draw(st.one_of(st.none(), st.floats(0, 100))), ac=on_ac,
                gpu_util=draw(st.one_of(st.none(), st.floats(0, 100))),
                strategy=draw(st.sampled_from(list(Strategy))), spent=draw(st.floats(0, 10)), budget=8.0))
    return agents, records


@settings(max_examples=150, deadline=None)
@given(fleets(), st.integers(0, 12), st.integers(0, 2**32 - 1),
       st.dictionaries(st.sampled_from([f"dev-{i}" for i in range(12)]), st.integers(0, 20)))
def test_never_selects_an_excluded_device_and_is_deterministic(fleet_and_agents, count, seed, participation):
    agents, records = fleet_and_agents
    fleet = view_of(records)
    rules = SelectionRules()
    sel = select_agents(agents, fleet, count=count, now=NOW, seed=seed, participation=participation)
    barred = {n for n, info in agents.items() if exclusion(fleet.get(info.device_id), rules) is not None}
    assert not barred & set(sel.chosen)
    assert len(set(sel.chosen)) == len(sel.chosen)
    assert set(sel.chosen) | set(sel.excluded) == set(agents) and not set(sel.chosen) & set(sel.excluded)
    eligible = len(agents) - len(barred)
    assert len(sel.chosen) == (eligible if count == 0 else min(count, eligible))
    for node in barred:
        view = fleet.get(agents[node].device_id)
        assert view is not None and (not view.online or view.telemetry is not None)
    # best first
    assert [sel.scores[n] for n in sel.chosen] == sorted((sel.scores[n] for n in sel.chosen), reverse=True)
    assert select_agents(agents, fleet, count=count, now=NOW, seed=seed, participation=participation) == sel


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 10), st.data())
def test_fairness_rotates_participation_among_equal_devices(n, data):
    k = data.draw(st.integers(1, n - 1))
    rounds = data.draw(st.integers(1, 3 * n))
    fleet = view_of([telemetry(f"dev-{i}", ac=True) for i in range(n)])
    agents = {i: DeviceInfo(f"dev-{i}", 50) for i in range(n)}
    history = Participation(window=rounds)
    for r in range(rounds):
        sel = select_agents(agents, fleet, count=k, now=NOW, seed=r, participation=history.counts())
        history.record([agents[i].device_id for i in sel.chosen])
    counts = [history.counts().get(f"dev-{i}", 0) for i in range(n)]
    assert sum(counts) == k * rounds
    assert max(counts) - min(counts) <= 1


@settings(max_examples=100, deadline=None)
@given(st.floats(0, 100), st.floats(0, 100), st.floats(0, 100), st.integers(0, 5))
def test_more_battery_or_fewer_participations_never_score_lower(cpu, low, high, p):
    low, high = sorted((low, high))
    fleet = view_of([telemetry("x", cpu=cpu, battery=low, ac=False, session="s1"),
                     telemetry("y", cpu=cpu, battery=high, ac=False, session="s1")])
    rules = SelectionRules()
    kw = {"data_share": 1.0, "now": NOW, "rules": rules}
    assert score(fleet["y"], participations=p, **kw) >= score(fleet["x"], participations=p, **kw)
    assert score(fleet["x"], participations=p, **kw) >= score(fleet["x"], participations=p + 1, **kw)


def test_bad_settings_are_refused():
    from hyprstream.config import parse

    with pytest.raises(ConfigError, match="at least one selection weight"):
        parse(SelectionWeights, {"resources": 0.0, "battery": 0.0, "fairness": 0.0, "freshness": 0.0, "data": 0.0})
    with pytest.raises(ValidationError, match="stale_after_s"):
        SelectionRules(stale_after_s=0)
    with pytest.raises(ValidationError, match="count"):
        select_agents({}, {}, count=-1, now=NOW, seed=0)
    with pytest.raises(ValidationError, match="window"):
        Participation(0)


def test_fog_config_sections_are_validated(tmp_path):
    from hyprstream.config import parse
    from hyprstream.fog.config import FogConfig, RoundMode

    base = {"name": "fog-a", "core": {"location": "grpc://127.0.0.1:1", "token_file": "t", "model": "m"}}
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    cfg = parse(FogConfig, {**base, "rounds": {"mode": "buffered", "buffer_k": 2, "max_staleness": 3},
                            "fleet": {"fleet": "plant-7", "mqtt_host": "127.0.0.1", "username": "fog-a",
                                      "password_file": str(pw), "weights": {"battery": 2.0}},
                            "offload": {"port": 8443, "token_file": "tokens"}}, source="fog.toml")
    assert cfg.rounds.mode is RoundMode.BUFFERED and (cfg.rounds.buffer_k, cfg.rounds.max_staleness) == (2, 3)
    broker = cfg.fleet.broker()
    assert (broker.host, broker.port, broker.username, broker.password) == ("127.0.0.1", 1883, "fog-a", "s3cret")
    assert cfg.fleet.rules().weights.battery == 2.0 and cfg.offload.enabled
    assert not parse(FogConfig, base).fleet.enabled and not parse(FogConfig, base).offload.enabled
    # buffered with a telemetry choice: clients_per_round agents train at once, chosen as slots come free
    chosen = parse(FogConfig, {**base, "rounds": {"mode": "buffered"},
                               "fleet": {"fleet": "f", "mqtt_host": "h", "clients_per_round": 3}}, source="fog.toml")
    assert chosen.fleet.clients_per_round == 3
    for section, reason in [
        ({"rounds": {"mode": "async"}}, "rounds.mode: must be one of 'sync', 'buffered'"),
        ({"rounds": {"mode": "buffered", "schedule": "round_robin", "layers": ["fc1"]}}, "rounds.schedule: buffered"),
        ({"rounds": {"buffer_k": 0}}, "rounds.buffer_k"),
        ({"fleet": {"mqtt_host": "h", "fleet": "a/#"}}, "fleet.fleet"),
        ({"fleet": {"username": "u"}}, "fleet.password_file: username and password_file go together"),
        ({"fleet": {"mqtt_cert_file": "c", "mqtt_key_file": "k"}}, "fleet.mqtt_ca_file"),
        ({"offload": {"port": 8443}}, "offload.token_file"),
        ({"offload": {"tls_certfile": "c"}}, "offload.tls_certfile"),
    ]:
        with pytest.raises(ConfigError, match=reason.replace("(", r"\(")):
            parse(FogConfig, {**base, **section}, source="fog.toml")
