"""Partition tolerance of the fog's pushes, against a real core Flight server that goes away and comes back."""

import numpy as np
import pytest

from hyprstream.core.auth import Principal, Role, TokenRegistry
from hyprstream.coreapi.client import CoreClient
from hyprstream.core.repository import ModelRepository
from hyprstream.core.server import CoreFlightServer
from hyprstream.vector_clock import VectorClock
from hyprstream.fog.aggregator import _project
from hyprstream.coreapi.commands import PushDelta
from hyprstream.fog.outbox import Outbox, Outcome, Push
from hyprstream.store import to_arrays, to_table

pytestmark = pytest.mark.integration

W0 = {"fc.weight": np.zeros((2, 2), np.float32), "head.weight": np.zeros(3, np.float32)}


def start(root):
    tokens = TokenRegistry()
    tokens.add("admin", Principal("admin", Role.ADMIN))
    tokens.add("fog", Principal("fog-a", Role.FOG))
    server = CoreFlightServer(ModelRepository(root), tokens)
    return server, server.start_background()


def push(seq, value, clocks):
    return Push(PushDelta("m", "fog-a", seq, clocks, 3), to_table({"fc.weight": np.full((2, 2), value, np.float32)}))


def test_buffered_pushes_survive_restart_and_apply_once(tmp_path):
    server, location = start(tmp_path / "core")
    with CoreClient(location, "admin") as admin:
        admin.register_model("m", to_table(W0))
    box = Outbox(tmp_path / "outbox")
    client = CoreClient(location, "fog", timeout_s=5)
    snap = client.get_weights("m")
    first = push(1, 1.0, {"fc": snap.clocks["fc"]})
    box.put(first)
    [d] = box.flush(client)
    assert d.outcome is Outcome.COMMITTED and d.result.version == 1 and len(box) == 0

    server.stop()  # partition: core is gone
    local = _project(snap, first)  # what the fog projects locally from version 0 and its own push
    assert local.clocks["fc"] == VectorClock.of({"fog-a": 1})
    second = push(2, 2.0, {"fc": local.clocks["fc"]})
    box.put(second)
    local = _project(local, second)
    third = push(3, 4.0, {"fc": local.clocks["fc"]})
    box.put(third)
    assert box.flush(client) == [] and len(box) == 2
    np.testing.assert_array_equal(to_arrays(local.table)["fc.weight"], np.full((2, 2), 3.0))
    client.close()

    reopened = Outbox(tmp_path / "outbox")  # the fog restarts: the outbox is on disk
    assert [p.seq for p in reopened.pending()] == [2, 3]
    server, location = start(tmp_path / "core")  # core comes back with its committed state
    client = CoreClient(location, "fog", timeout_s=5)
    deliveries = reopened.flush(client)
    assert [(d.push.seq, d.outcome, d.result.version) for d in deliveries] == [
        (2, Outcome.COMMITTED, 2), (3, Outcome.COMMITTED, 3)]
    assert [d.result.staleness["fc"] for d in deliveries] == [0, 0]  # the projected bases were exact

    reopened.put(push(3, 4.0, {"fc": local.clocks["fc"]}))  # an acknowledgement lost: sent again
    [again] = reopened.flush(client)
    assert again.outcome is Outcome.ALREADY_APPLIED and len(reopened) == 0
    weights = to_arrays(client.get_weights("m").table)
    np.testing.assert_array_equal(weights["fc.weight"], np.full((2, 2), 7.0))  # 1 + 2 + 4, each once
    assert client.head("m")["version"] == 3
    client.close()
    server.stop()



def test_a_secure_rounds_push_keeps_its_privacy_record_across_restarts(tmp_path):
    """A push that carries client-level DP spend and a transcript hash waits in the outbox with both,
    and core's audit entry for the version it makes has them."""
    from hyprstream.core import signing
    from hyprstream.core.audit import AuditLog, iter_entries

    tokens = TokenRegistry()
    tokens.add("admin", Principal("admin", Role.ADMIN))
    tokens.add("fog", Principal("fog-a", Role.FOG))
    audit = AuditLog(tmp_path / "audit.jsonl", signing.generate_key(), sync=False)
    server = CoreFlightServer(ModelRepository(tmp_path / "core", audit=audit), tokens)
    location = server.start_background()
    try:
        with CoreClient(location, "admin") as admin:
            admin.register_model("m", to_table(W0))
            snap = admin.get_weights("m")
        privacy = {"epsilon": 1.25, "delta": 1e-5, "noise_multiplier": 1.0, "sample_rate": 1.0, "clip": 1.0}
        record = PushDelta("m", "fog-a", 7, {"fc": snap.clocks["fc"]}, 3, privacy, "ab" * 32)
        Outbox(tmp_path / "outbox").put(Push(record, to_table({"fc.weight": np.ones((2, 2), np.float32)})))
        reopened = Outbox(tmp_path / "outbox")  # the fog restarted before core could be reached
        [p] = reopened.pending()
        assert p.record == record  # the same typed record, from the outbox's file
        with CoreClient(location, "fog", timeout_s=5) as client:
            [d] = reopened.flush(client)
        assert d.outcome is Outcome.COMMITTED and d.result.version == 1
    finally:
        server.stop()
        audit.close()
    pushes = [e for e in iter_entries(tmp_path / "audit.jsonl") if e.details.get("seq") == 7]
    assert [e.outcome for e in pushes] == ["ok"], [(e.action, e.outcome) for e in pushes]
    [entry] = pushes
    assert entry.details["privacy"] == privacy and entry.details["transcript_sha256"] == "ab" * 32


@pytest.mark.unit
def test_an_outbox_file_is_read_back_as_core_reads_a_command_and_a_damaged_one_is_named(tmp_path):
    """An outbox file written before the record took the command's form still reads; one whose record was
    tampered with (a negative participant count, a sequence number that is not an integer) is refused with
    its path, not sent to core."""
    import json

    import pyarrow as pa

    from hyprstream.errors import ValidationError
    from hyprstream.fog.outbox import _META

    box = Outbox(tmp_path / "outbox")
    box.put(push(5, 1.0, {"fc": VectorClock.of({"fog-a": 2})}))
    [path] = sorted((tmp_path / "outbox").glob("push-*.arrow"))

    def rewrite(meta: dict) -> None:
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        table = table.replace_schema_metadata({_META: json.dumps(meta).encode()})
        with pa.OSFile(str(path), "wb") as fh, pa.ipc.new_file(fh, table.schema) as writer:
            writer.write_table(table)

    legacy = {"seq": 5, "model": "m", "fog": "fog-a", "base_clocks": {"fc": {"fog-a": 2}}, "participants": 3,
              "privacy": None, "transcript_sha256": None}
    rewrite(legacy)
    [p] = Outbox(tmp_path / "outbox").pending()
    assert p.record == PushDelta("m", "fog-a", 5, {"fc": VectorClock.of({"fog-a": 2})}, 3)
    for damaged in ({**legacy, "participants": -1}, {**legacy, "seq": "5"}, {**legacy, "fog": "../x"}):
        rewrite(damaged)
        with pytest.raises(ValidationError, match=f"outbox file {path}"):
            Outbox(tmp_path / "outbox")
