"""Acceptance: core is SIGKILLed at random points while several fogs push concurrently.

After every kill core restarts on the same files. At the end: no acknowledged version is lost, every
version present is a push a fog really sent (an unacknowledged one only when that push's call failed
because core died), the weights equal the replay of the lineage, and the audit log verifies.
"""

import random
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from coreproc import CoreProcess, make_deployment

from hyprstream.core.audit import iter_entries, verify_file
from hyprstream.core.auth import Role
from hyprstream.coreapi.client import CoreClient
from hyprstream.core.repository import ModelSettings, update_digest
from hyprstream.consistency import ConsistencyMode, ConsistencyPolicy
from hyprstream.vector_clock import VectorClock
from hyprstream.errors import HyprstreamError, TransportError, UpdateRejected
from hyprstream.store.layer_table import to_arrays, to_table

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KILLS = 20
W0 = {"fc1.weight": np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8), "fc1.bias": np.zeros(8, np.float32),
      "fc2.weight": np.ones((4, 8), np.float32)}
FOG_LAYERS = {"fog-0": ["fc1"], "fog-1": ["fc2"], "fog-2": ["fc1", "fc2"]}


def delta_for(fog: str, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([int(fog.split("-")[1]), seq])
    return {name: rng.normal(0, 0.01, arr.shape).astype(np.float32) for name, arr in W0.items()
            if name.split(".")[0] in FOG_LAYERS[fog]}


class Fog(threading.Thread):
    """Pulls, then pushes a delta with the next seq, forever; records what core answered."""

    def __init__(self, name, token, where, stop):
        super().__init__(name=name, daemon=True)
        self.fog, self.token, self.where, self.stop = name, token, where, stop
        self.sent: dict[int, str] = {}  # seq -> update digest of every push that left the fog
        self.acked: dict[int, int] = {}  # seq -> version core acknowledged
        self.uncertain: set[int] = set()  # the call failed in transit (core died): may or may not be committed
        self.refused: dict[int, str] = {}
        self.errors: list[str] = []
        self.seq = 0

    def run(self):
        while not self.stop.is_set():
            location = self.where["location"]
            try:
                with CoreClient(location, self.token, timeout_s=20) as core:
                    while not self.stop.is_set() and self.where["location"] == location:
                        snap = core.get_weights("m")
                        self.seq += 1
                        delta = delta_for(self.fog, self.seq)
                        self.sent[self.seq] = update_digest(delta)
                        try:
                            receipt = core.push_delta(
                                "m", to_table(delta), fog=self.fog, seq=self.seq, participants=3,
                                base_clocks={layer: snap.clocks[layer] for layer in FOG_LAYERS[self.fog]})
                        except UpdateRejected as exc:
                            self.refused[self.seq] = str(exc)
                            continue
                        except TransportError:
                            self.uncertain.add(self.seq)
                            raise
                        self.acked[self.seq] = receipt.version
            except TransportError:
                time.sleep(0.02)
            except HyprstreamError as exc:  # anything else is a bug: keep it for the assertion
                self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.02)


def replay(versions, sent_by) -> dict[str, np.ndarray]:
    w = {k: v.copy() for k, v in W0.items()}
    for v in versions[1:]:
        delta = delta_for(v["fog"], v["seq"])
        assert update_digest(delta) == v["update_sha256"] == sent_by[v["fog"]][v["seq"]]
        for name, d in delta.items():
            w[name] = w[name] + d if v["weight"] == 1.0 else (w[name] + v["weight"] * d).astype(np.float32)
    return w


def test_sigkill_at_random_points_loses_nothing_acknowledged(tmp_path):
    rnd = random.Random(20261127)
    dep = make_deployment(tmp_path)
    core = CoreProcess(dep.config)
    with CoreClient(core.location, dep.token("admin", Role.ADMIN)) as admin:
        policy = ConsistencyPolicy(ConsistencyMode.BOUNDED, max_staleness=1_000_000, staleness_exponent=0.5)
        assert admin.register_model("m", to_table(W0), ModelSettings(policy)) == 0
    where = {"location": core.location}
    stop = threading.Event()
    fogs = [Fog(name, dep.token(name, Role.FOG), where, stop) for name in FOG_LAYERS]
    for f in fogs:
        f.start()
    kills = 0
    try:
        while kills < KILLS:
            before = sum(len(f.acked) for f in fogs)
            deadline = time.monotonic() + 120
            while sum(len(f.acked) for f in fogs) == before and time.monotonic() < deadline:
                time.sleep(0.005)  # wait for progress, so that every cycle commits something
            assert sum(len(f.acked) for f in fogs) > before, "no push was acknowledged after a restart"
            time.sleep(rnd.uniform(0, 0.25))  # then kill at a random point of the ongoing pushes
            core.kill()
            kills += 1
            core = CoreProcess(dep.config)
            where["location"] = core.location
        before = sum(len(f.acked) for f in fogs)
        while sum(len(f.acked) for f in fogs) == before:
            time.sleep(0.005)
    finally:
        stop.set()
        for f in fogs:
            f.join(timeout=60)
    try:
        with CoreClient(core.location, dep.token("admin", Role.ADMIN)) as admin:
            versions = admin.list_versions("m")
            head = admin.get_weights("m")
    finally:
        assert core.terminate() == 0, "".join(core.stderr)

    assert kills >= KILLS
    for f in fogs:
        assert not f.errors, f.errors
    sent_by = {f.fog: f.sent for f in fogs}
    assert [v["version"] for v in versions] == list(range(len(versions)))
    assert all(v["parent"] == v["version"] - 1 for v in versions[1:])
    committed = {(v["fog"], v["seq"]): v for v in versions[1:]}
    assert len(committed) == len(versions) - 1  # no (fog, seq) twice
    acked = 0
    for f in fogs:
        for seq, version in f.acked.items():  # no acknowledged version is lost
            acked += 1
            assert versions[version]["fog"] == f.fog and versions[version]["seq"] == seq
            assert versions[version]["update_sha256"] == f.sent[seq]
        for seq in f.refused:
            assert (f.fog, seq) not in committed
    for (fog, seq), v in committed.items():  # nothing appears that no fog sent; unacknowledged = cut by a kill
        f = next(x for x in fogs if x.fog == fog)
        assert seq in f.sent
        assert seq in f.acked or seq in f.uncertain, (fog, seq)
    assert acked >= KILLS + 1
    # the master weights are exactly the lineage replayed
    expected = replay(versions, sent_by)
    got = to_arrays(head.table)
    for name in W0:
        np.testing.assert_array_equal(got[name], expected[name])
    assert head.clocks["fc1"] == VectorClock.of({fog: sum(1 for v in versions[1:] if v["fog"] == fog and "fc1" in
                                                          v["layers"]) for fog in FOG_LAYERS})
    # the audit log verifies, has one commit entry per version and records every restart
    assert verify_file(dep.audit_log, dep.audit_key.public_key()).ok
    entries = list(iter_entries(dep.audit_log))
    pushes = [e.details["version"] for e in entries if e.action == "model.push" and e.outcome == "ok"]
    assert sorted(pushes) == list(range(1, len(versions)))
    assert sum(e.action == "core.start" for e in entries) == KILLS + 1
    rollbacks = sum(e.action == "recovery.rollback" for e in entries)
    unacked = sum(1 for (fog, seq) in committed if seq not in next(x for x in fogs if x.fog == fog).acked)
    print(f"{kills} kills, {len(versions) - 1} versions ({unacked} committed without an ack), "
          f"{sum(len(f.uncertain) for f in fogs)} pushes cut by a kill, {rollbacks} rolled back at restart, "
          f"{sum(len(f.refused) for f in fogs)} refused")
    cli = subprocess.run([sys.executable, "-m", "hyprstream.cli", "audit", "verify", str(dep.audit_log)],
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stdout + cli.stderr
