"""Core, two fogs and three agents per fog as real processes on loopback, with TLS and authentication
on every link: core (`hyprstream core run`, TLS, signed tokens), fogs (`hyprstream fog run`, SuperLink
TLS and SuperNode authentication), agents (`hyprstream agent run`, each with its own encrypted store of
digits data), telemetry to mosquitto over TLS with passwords. fog-a runs plain rounds; fog-b runs
secure aggregation with client-level DP and reaches core through a TCP forwarder the tests can cut.

One deployment serves the module, in two steps:

1. The model improves: global versions from both fogs, the current model's test accuracy (fetched with
   a reader token) above the initial one, telemetry from every device, the broker refusing strangers.
2. Failures: an agent of fog-a SIGKILLed in the middle of a round, and fog-b cut from core (the
   forwarder closed, then reopened): rounds go on, fog-b's buffered pushes reach core after the link is
   back, and every push is applied exactly once (checked against the audit log, which verifies). The
   federation runs on until core has committed at least 30 versions, each scored on core's validation
   rows, and none falls more than 0.05 below the best before it.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass

import pytest

from deployment import MOSQUITTO, MOSQUITTO_PASSWD, SSH_KEYGEN, Deployment, Forwarder, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.mqtt, pytest.mark.timeout(900),
              pytest.mark.skipif(MOSQUITTO is None or MOSQUITTO_PASSWD is None, reason="mosquitto is not installed"),
              pytest.mark.skipif(SSH_KEYGEN is None, reason="ssh-keygen is not installed")]

FOGS = {"fog-a": ["a-1", "a-2", "a-3"], "fog-b": ["b-1", "b-2", "b-3"]}
DEVICES = [d for ds in FOGS.values() for d in ds]
WAIT_S = 480.0
VERSIONS = 30  # the second test runs the federation until core has committed at least this many versions
MARGIN = 0.05  # ... and no version's held-out accuracy falls more than this below the best before it
# Secure aggregation of the agents' deltas and client-level DP at fog-b; the noise is small enough (std
# 0.01 * clip of the sum) that the model still improves.
PRIVACY = """
[privacy.secagg]
clip = 5.0
stage_timeout_s = 240.0
min_clients = 2
[privacy.client_dp]
noise_multiplier = 0.01
placement = "central"
delta = 1e-5
"""


def by_fog(versions: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for v in versions[1:]:
        out.setdefault(v["fog"], []).append(v)
    return out


def wait_for_versions(dep: Deployment, done, timeout_s: float = WAIT_S) -> list[dict]:
    """Poll core's lineage until ``done(versions)``; fail early when a service died."""
    seen: list[dict] = []

    def check() -> bool:
        nonlocal seen
        dead = [s.name for s in dep.services if s.proc.poll() is not None and s.name in (*FOGS, "core", "mosquitto")]
        assert not dead, f"{dead} exited:\n{dep.logs()}"
        seen = dep.versions()
        return done(seen)

    assert wait_until(check, timeout_s, 2.0), f"versions: {seen}\n{dep.logs()}"
    return seen


def committed_pushes(dep: Deployment) -> list[tuple[str, int, int]]:
    """(fog, seq, version) of every committed push in the audit log, in log order."""
    return [(e.details["fog"], e.details["seq"], e.details["version"]) for e in dep.audit_entries()
            if e.action == "model.push" and e.outcome == "ok"]


def check_exactly_once(dep: Deployment, versions: list[dict]) -> list[tuple[str, int, int]]:
    pushes = committed_pushes(dep)
    twice = [k for k, n in Counter((f, s) for f, s, _ in pushes).items() if n > 1]
    assert not twice, f"pushes applied twice: {twice}"
    # the lineage is exactly the audited pushes
    assert sorted((v["fog"], v["seq"], v["version"]) for v in versions[1:]) == sorted(pushes)
    refused = [e.details for e in dep.audit_entries() if e.action == "model.push" and e.outcome != "ok"]
    assert all("replay" in d.get("reason", "") for d in refused), refused
    return pushes


def start_core_and_broker(dep: Deployment) -> None:
    dep.start_broker(DEVICES)
    dep.start_core()
    dep.register_model()


def start_fogs(dep: Deployment, fog_core: dict[str, str] | None = None, *, fog_args: dict | None = None) -> None:
    """Both fogs (each to core at ``fog_core[name]``, default directly), their devices and agents."""
    for i, (name, devices) in enumerate(FOGS.items()):
        fog = dep.start_fog(name, core_location=(fog_core or {}).get(name), **(fog_args or {}).get(name, {}))
        for j, device in enumerate(devices):
            dep.add_device(fog, device, shard=3 * i + j, shards=len(DEVICES))
        dep.register(fog, devices)
        for device in devices:
            dep.start_agent(fog, device)


def stop_edge(dep: Deployment) -> None:
    for fog in dep.fogs.values():
        for agent in fog.agents.values():
            agent.stop()
        fog.service.stop()


@dataclass
class Federation:
    dep: Deployment
    forwarder: Forwarder
    telemetry: dict[str, list[dict]]
    initial_accuracy: float
    started: float


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    dep = Deployment(tmp_path_factory.mktemp("e2e"))
    telemetry: dict[str, list[dict]] = {}
    lock = threading.Lock()

    def on_message(client, userdata, msg):
        data = json.loads(msg.payload)
        if data.get("schema") == "hyprstream.telemetry/2":
            with lock:
                telemetry.setdefault(data["device_id"], []).append(data)

    monitor = forwarder = None
    try:
        started = time.monotonic()
        start_core_and_broker(dep)
        forwarder = Forwarder(("127.0.0.1", dep.core_port))
        start_fogs(dep, {"fog-b": f"grpc+tls://127.0.0.1:{forwarder.port}"},
                   fog_args={"fog-a": {"min_agents": 2, "timeout_s": 90.0}, "fog-b": {"extra": PRIVACY}})
        monitor, code = dep.mqtt_connect("monitor", dep.mqtt_passwords["monitor"], on_message)
        assert code == 0
        monitor.subscribe("hyprstream/v1/e2e/+/telemetry", qos=1)
        yield Federation(dep, forwarder, telemetry, dep.accuracy(0), started)
    finally:
        if monitor is not None:
            monitor.loop_stop()
            monitor.disconnect()
        if forwarder is not None:
            forwarder.close()
        dep.close()


def test_three_tiers_train_with_tls_auth_and_telemetry(federation):
    dep = federation.dep
    # the broker refuses anonymous clients and wrong passwords; the monitor user reads every device
    anon, code = dep.mqtt_connect(None, None)
    anon.loop_stop()
    wrong, wrong_code = dep.mqtt_connect("monitor", "not-the-password")
    wrong.loop_stop()
    assert code not in (None, 0) and wrong_code not in (None, 0), (code, wrong_code)

    versions = wait_for_versions(dep, lambda vs: len(vs) - 1 >= 3 and len(by_fog(vs)) == 2)
    assert wait_until(lambda: set(federation.telemetry) == set(DEVICES), 60), sorted(federation.telemetry)
    accuracy = dep.accuracy(versions[-1]["version"])
    print(f"{len(versions) - 1} versions in {time.monotonic() - federation.started:.0f} s; accuracy "
          f"{federation.initial_accuracy:.3f} -> {accuracy:.3f}")
    assert accuracy > federation.initial_accuracy + 0.1, (federation.initial_accuracy, accuracy)
    assert {v["actor"] for v in versions[1:]} == set(FOGS)
    fogs = by_fog(versions)
    # client-level DP at fog-b: core gets the fixed denominator, never the realised count of participants
    assert all(v["participants"] == 0 for v in fogs["fog-b"])
    assert all(v["participants"] >= 2 for v in fogs["fog-a"])
    for device, msgs in federation.telemetry.items():
        assert all(m["fleet"] == "e2e" and m["device_id"] == device for m in msgs)
    # core scores every version on its validation rows, and serves its metrics and health
    assert all(v["accuracy"] is not None for v in versions), versions
    assert versions[0]["accuracy"] == pytest.approx(federation.initial_accuracy)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{dep.metrics_port}/metrics", timeout=10).read().decode()
    assert 'hyprstream_core_model_accuracy_ratio{model="digits-model"}' in metrics
    assert 'hyprstream_core_pushes_total{code="",fog="fog-b",model="digits-model",outcome="ok"}' in metrics
    with urllib.request.urlopen(f"http://127.0.0.1:{dep.metrics_port}/healthz", timeout=10) as health:
        assert health.status == 200 and health.read().startswith(b"ok: serving on grpc+tls://")
    for fog in dep.fogs.values():  # each fog's endpoint, on by default (on a port of its own: two share a host)
        text = urllib.request.urlopen(f"http://127.0.0.1:{fog.metrics_port}/metrics", timeout=10).read().decode()
        pushes = [line for line in text.splitlines() if line.startswith(f'hyprstream_fog_pushes_total{{fog="{fog.name}"}}')]
        assert pushes and float(pushes[0].split()[-1]) >= 1, text[:2000]


def test_agent_killed_mid_round_and_fog_cut_from_core(federation):
    dep, forwarder = federation.dep, federation.forwarder
    fog_a, fog_b = dep.fogs["fog-a"], dep.fogs["fog-b"]

    # --- an agent of fog-a killed while it trains: as soon as one of them receives a new request
    wait_for_versions(dep, lambda vs: "fog-a" in by_fog(vs))
    seen = {d: set(dep.models_received(d)) for d in FOGS["fog-a"]}
    victim = None

    def training_on_new_base() -> bool:
        nonlocal victim
        victim = next((d for d in FOGS["fog-a"] if set(dep.models_received(d)) - seen[d]), None)
        return victim is not None

    assert wait_until(training_on_new_base, WAIT_S, 0.1), dep.logs()
    fog_a.agents[victim].kill()
    killed_at = dep.versions()[-1]["version"]
    dep.start_agent(fog_a, victim)  # the device comes back (same store, same node key)

    # --- fog-b cut from core once it has a version; back once a push waits in its outbox
    wait_for_versions(dep, lambda vs: "fog-b" in by_fog(vs))
    forwarder.close()
    outbox = fog_b.state / "outbox"
    buffered: set[int] = set()

    def push_buffered() -> bool:
        buffered.update(int(p.stem.removeprefix("push-")) for p in outbox.glob("push-*.arrow"))
        return bool(buffered)

    assert wait_until(push_buffered, WAIT_S, 0.2), dep.logs()
    time.sleep(5)
    push_buffered()
    forwarder.open()

    def done(vs) -> bool:
        fogs = by_fog(vs)
        a_after = [v for v in fogs.get("fog-a", []) if v["version"] > killed_at]
        b_seqs = {v["seq"] for v in fogs.get("fog-b", [])}
        return (buffered <= b_seqs and any(v["seq"] > max(buffered) for v in fogs.get("fog-b", []))
                and any(v["participants"] == 3 for v in a_after[1:]) and len(vs) - 1 >= VERSIONS)

    wait_for_versions(dep, done)
    stop_edge(dep)
    versions = dep.versions()
    print(f"{len(versions) - 1} versions in {time.monotonic() - federation.started:.0f} s; killed {victim} after "
          f"v{killed_at}; fog-b buffered seqs {sorted(buffered)}")

    fogs = by_fog(versions)
    a_after = [v for v in fogs["fog-a"] if v["version"] > killed_at]
    assert a_after and a_after[0]["participants"] == 2, fogs["fog-a"]  # the round of the kill ended without it
    assert any(v["participants"] == 3 for v in a_after[1:])  # and it is back after its restart
    assert "core unreachable" in (fog_b.state / "fog.log").read_text()
    assert not list((fog_b.state / "outbox").glob("push-*.arrow"))  # everything delivered
    pushes = check_exactly_once(dep, versions)
    b_seqs = [s for f, s, _ in pushes if f == "fog-b"]
    assert all(b_seqs.count(s) == 1 for s in buffered)
    assert b_seqs == sorted(b_seqs)  # delivered in order
    # every fog-b commit carries its client-level DP spend and its secure aggregation transcript; fog-a's none
    for p in (e.details for e in dep.audit_entries() if e.action == "model.push" and e.outcome == "ok"):
        if p["fog"] == "fog-a":
            assert p["privacy"] is None and p["participants"] >= 2, p
            continue
        assert p["privacy"]["noise_multiplier"] == 0.01 and p["privacy"]["clip"] == 5.0, p["privacy"]
        assert p["privacy"]["epsilon"] > 0 and len(p["transcript_sha256"]) == 64
        assert p["participants"] == 0 and p["privacy"]["expected_participants"] >= 2, p
    # every version scored; with mixing 1/N (two fogs: 1/2) the model holds over at least VERSIONS versions: no
    # version falls more than MARGIN below the best before it (core's guard, mode "warn", flags none either)
    accuracy = [v["accuracy"] for v in versions]
    print("accuracy per version:", [round(a, 3) for a in accuracy])
    assert len(versions) - 1 >= VERSIONS and all(a is not None for a in accuracy)
    drops = [max(accuracy[:i + 1]) - a for i, a in enumerate(accuracy)]
    assert max(drops) <= MARGIN, list(zip(accuracy, drops))
    assert not [e for e in dep.audit_entries() if e.details.get("regression")]
    verify = dep.audit_verify()
    assert verify.returncode == 0 and "ok:" in verify.stdout, verify.stdout + verify.stderr
