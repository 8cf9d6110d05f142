"""ModelRepository: durable commits with audit entries, recovery of every crash state, replay rules."""

import json
import shutil

import numpy as np
import pyarrow.fs as pafs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyprstream.core import signing
from hyprstream.core.audit import AuditError, AuditLog, head_path, iter_entries, verify_file
from hyprstream.consistency import ConsistencyMode, ConsistencyPolicy
from hyprstream.core.repository import ModelRepository, ModelSettings, update_digest
from hyprstream.core.storage import ArrowFsStorage, LocalStorage, open_storage
from hyprstream.vector_clock import VectorClock
from hyprstream.errors import UpdateRejected
from hyprstream.store.layer_table import to_arrays, to_table

pytestmark = pytest.mark.unit

KEY = signing.generate_key()
W0 = {"fc1.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "fc1.bias": np.zeros(2, np.float32),
      "head.weight": np.ones((1, 2), np.float32)}
EVENTUAL = ModelSettings(ConsistencyPolicy(ConsistencyMode.EVENTUAL, staleness_exponent=1.0))


def open_repo(root, **kw):
    alog = AuditLog(root / "audit.jsonl", KEY, sync=False)
    try:
        return ModelRepository(LocalStorage(root / "models", sync=False), audit=alog, **kw), alog
    except BaseException:
        alog.close()
        raise


def bias(value, n=2):
    return to_table({"fc1.bias": np.full(n, value, np.float32)})


def push(repo, fog, seq, value=1.0, base=None):
    return repo.push_delta("m", bias(value), fog=fog, seq=seq, base_clocks={"fc1": base or VectorClock()},
                           participants=2)


def test_commit_writes_version_then_audit_entry(tmp_path):
    repo, alog = open_repo(tmp_path)
    repo.register("m", to_table(W0), EVENTUAL, actor="admin")
    r = repo.push_delta("m", bias(0.5), fog="fog-a", seq=1, base_clocks={"fc1": VectorClock()}, participants=3,
                        actor="fog-a", privacy={"epsilon": 0.25, "delta": 1e-6}, transcript_sha256="ab" * 32)
    alog.close()
    entries = list(iter_entries(tmp_path / "audit.jsonl"))
    assert [e.action for e in entries] == ["audit.create", "model.register", "model.push"]
    reg, p = entries[1], entries[2]
    assert reg.actor == "admin" and reg.details["version"] == 0 and reg.details["weights_sha256"] == update_digest(W0)
    assert p.actor == "fog-a" and p.subject == "model/m"
    d = p.details
    assert (d["version"], d["parent"], d["seq"], d["participants"], d["layers"]) == (1, 0, 1, 3, ["fc1"])
    assert d["base_clocks"] == {"fc1": {}} and d["new_clocks"] == {"fc1": {"fog-a": 1}}
    assert d["privacy"] == {"epsilon": 0.25, "delta": 1e-6} and d["transcript_sha256"] == "ab" * 32
    assert d["update_sha256"] == update_digest({"fc1.bias": np.full(2, 0.5, np.float32)})
    assert d["update_norm"] == pytest.approx(np.sqrt(0.5))
    assert r.version == 1 and d["weight"] == 1.0
    assert verify_file(tmp_path / "audit.jsonl", KEY.public_key()).ok


def test_version_without_audit_entry_is_rolled_back_at_restart(tmp_path):
    repo, alog = open_repo(tmp_path)
    repo.register("m", to_table(W0), EVENTUAL, actor="admin")
    push(repo, "fog-a", 1)
    saved = {p: p.read_bytes() for p in (tmp_path / "audit.jsonl", head_path(tmp_path / "audit.jsonl"))}
    push(repo, "fog-a", 2, value=5.0)  # crash "after the manifest, before the audit entry":
    alog.close()
    for p, data in saved.items():
        p.write_bytes(data)  # the audit log as it was before version 2's entry
    repo, alog = open_repo(tmp_path)
    assert repo.head("m")["version"] == 1
    assert repo.head("m")["clocks"]["fc1"] == {"fog-a": 1}
    np.testing.assert_array_equal(to_arrays(repo.get("m").table)["fc1.bias"], np.ones(2, np.float32))
    assert sorted((tmp_path / "models" / "m" / "layers").iterdir()) == sorted(
        tmp_path / "models" / "m" / "layers" / f for f in ("fc1@0.arrow", "fc1@1.arrow", "head@0.arrow"))
    assert repo.recovered == ["model m: rolled back an unacknowledged version (no audit entry) (version 2)"]
    # the rolled-back seq is free again, and the next commit is version 2
    assert push(repo, "fog-a", 2, value=2.0).version == 2
    alog.close()
    entries = list(iter_entries(tmp_path / "audit.jsonl"))
    assert [e.action for e in entries][-2:] == ["recovery.rollback", "model.push"]
    assert entries[-2].details["version"] == 2
    assert verify_file(tmp_path / "audit.jsonl", KEY.public_key()).ok


def test_interrupted_register_and_leftovers_are_removed(tmp_path):
    repo, alog = open_repo(tmp_path)
    repo.register("m", to_table(W0), EVENTUAL, actor="admin")
    alog.close()
    models = tmp_path / "models"
    shutil.copytree(models / "m", models / "ghost")  # a register whose audit entry never came
    (models / "half" / "layers").mkdir(parents=True)  # a register that died before its manifest
    (models / "m" / "layers" / "fc1@7.arrow").write_bytes(b"orphan")  # a push that died before its manifest
    (models / "m" / "layers" / ".fc1@8.arrow.tmp-123").write_bytes(b"partial")
    repo, alog = open_repo(tmp_path)
    assert repo.models() == ["m"]
    assert not (models / "ghost").exists() and not (models / "half").exists()
    assert sorted(p.name for p in (models / "m" / "layers").iterdir()) == ["fc1@0.arrow", "head@0.arrow"]
    alog.close()


def test_manifest_behind_the_audit_log_refuses_to_start(tmp_path):
    repo, alog = open_repo(tmp_path)
    repo.register("m", to_table(W0), EVENTUAL, actor="admin")
    old = (tmp_path / "models" / "m" / "manifest.json").read_bytes()
    push(repo, "fog-a", 1)
    alog.close()
    (tmp_path / "models" / "m" / "manifest.json").write_bytes(old)  # an acknowledged version vanished
    with pytest.raises(AuditError, match="manifest is at version 0 but the audit log records 1"):
        open_repo(tmp_path)
    shutil.rmtree(tmp_path / "models" / "m")
    with pytest.raises(AuditError, match="manifest is missing|not in"):
        open_repo(tmp_path)


def test_failed_audit_entry_undoes_the_commit(tmp_path, monkeypatch):
    repo, alog = open_repo(tmp_path)
    repo.register("m", to_table(W0), EVENTUAL, actor="admin")

    def broken(*a, **k):
        raise AuditError("disk full")

    monkeypatch.setattr(alog, "append", broken)
    with pytest.raises(AuditError):
        push(repo, "fog-a", 1)
    monkeypatch.undo()
    assert repo.head("m")["version"] == 0
    assert ModelRepository(LocalStorage(tmp_path / "models", sync=False)).head("m")["version"] == 0
    assert push(repo, "fog-a", 1).version == 1  # nothing of the failed push remains, seq 1 included
    alog.close()


def test_replayed_delta_with_a_new_seq_is_refused(tmp_path):
    repo, alog = open_repo(tmp_path)
    repo.register("m", to_table(W0), EVENTUAL, actor="admin")
    push(repo, "fog-a", 1, value=0.5)
    with pytest.raises(UpdateRejected, match="replayed push: fog 'fog-a' already pushed seq 1"):
        push(repo, "fog-a", 1, value=0.5)
    with pytest.raises(UpdateRejected, match="already pushed this delta from the same base clocks"):
        push(repo, "fog-a", 2, value=0.5)
    assert push(repo, "fog-b", 1, value=0.5).version == 2  # another fog's equal delta is its own update
    alog.close()
    again, alog = open_repo(tmp_path)  # the replay memory survives a restart
    with pytest.raises(UpdateRejected, match="same base clocks"):
        push(again, "fog-a", 3, value=0.5)
    alog.close()


@pytest.mark.parametrize("make_storage", [
    lambda root: ArrowFsStorage(pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem()), "core"),
    lambda root: ArrowFsStorage(pafs._MockFileSystem(), "bucket/core"),
    lambda root: open_storage(f"file://{root}/core"),
])
def test_any_pyarrow_filesystem_holds_the_repository(tmp_path, make_storage):
    storage = make_storage(tmp_path)
    repo = ModelRepository(storage)
    repo.register("m", to_table(W0), EVENTUAL, actor="admin")
    push(repo, "fog-a", 1)
    again = ModelRepository(storage)
    assert again.head("m")["version"] == 1
    np.testing.assert_array_equal(to_arrays(again.get("m", 1).table)["fc1.bias"], np.ones(2, np.float32))
    np.testing.assert_array_equal(to_arrays(again.get("m", 0).table)["fc1.bias"], np.zeros(2, np.float32))
    assert not [n for n in storage.list("m/layers") if ".tmp-" in n]


def test_storage_uri_errors_name_the_uri():
    with pytest.raises(Exception, match="nosuch://x"):
        open_storage("nosuch://x")


pushes = st.lists(st.tuples(st.sampled_from(["fog-a", "fog-b", "fog-c"]),
                            st.sampled_from([("fc1",), ("head",), ("fc1", "head")]),
                            st.integers(0, 3),  # how many versions old the base is
                            st.booleans()),  # replay the fog's previous push instead
                  min_size=1, max_size=12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pushes)
def test_clocks_count_each_applied_update_exactly_once(tmp_path_factory, script):
    root = tmp_path_factory.mktemp("prop")
    repo = ModelRepository(LocalStorage(root, sync=False))
    repo.register("m", to_table(W0), ModelSettings(ConsistencyPolicy(ConsistencyMode.BOUNDED, max_staleness=2)),
                  actor="t")
    seqs: dict[str, int] = {}
    last: dict[str, tuple] = {}
    applied: list[tuple[str, tuple[str, ...]]] = []
    history = [repo.head("m")["clocks"]]
    for i, (fog, layers, age, replay) in enumerate(script):
        if replay and fog in last:
            args = last[fog]
        else:
            seqs[fog] = seqs.get(fog, 0) + 1
            base = history[max(0, len(history) - 1 - age)]
            delta = {n: np.full(a.shape, 0.01 * (i + 1), np.float32) for n, a in W0.items()
                     if n.split(".")[0] in layers}
            args = (fog, seqs[fog], layers, {layer: VectorClock.of(base[layer]) for layer in layers}, delta)
        fog_, seq, layers_, base_clocks, delta = args
        try:
            repo.push_delta("m", to_table(delta), fog=fog_, seq=seq, base_clocks=base_clocks, participants=1)
        except UpdateRejected as exc:
            assert args is last.get(fog) or "staleness" in str(exc), exc  # replays are always refused
            continue
        assert args is not last.get(fog), "a replayed push was applied"
        last[fog] = args
        applied.append((fog_, layers_))
        history.append(repo.head("m")["clocks"])
    clocks = repo.head("m")["clocks"]
    for layer in ("fc1", "head"):
        expected = {}
        for fog, layers in applied:
            if layer in layers:
                expected[fog] = expected.get(fog, 0) + 1
        assert clocks[layer] == expected  # per layer and per fog: updates applied, each once
    assert repo.head("m")["version"] == len(applied)
    versions = repo.versions("m")
    assert all(json.dumps(v.clocks) for v in versions)


def test_a_fog_cut_from_core_may_chain_on_its_own_pushes_and_no_further(tmp_path):
    """fog-b pushes from v0 after fog-a did: core merges them, so fog-b's own view {fog-b: 1} was never a committed
    clock; fog-b's next push from that view is accepted, a base ahead of its committed pushes or mixing in
    another fog's entry is not."""
    repo, alog = open_repo(tmp_path)
    repo.register("m", to_table(W0), EVENTUAL, actor="admin")
    push(repo, "fog-a", 1, value=0.5)
    push(repo, "fog-b", 1, value=0.25)  # from v0: committed with the merged clock {fog-a: 1, fog-b: 1}
    assert push(repo, "fog-b", 2, value=0.125, base=VectorClock.of({"fog-b": 1})).version == 3
    for fog, seq, base in (("fog-b", 3, {"fog-b": 3}), ("fog-a", 2, {"fog-a": 1, "fog-c": 1})):
        with pytest.raises(UpdateRejected, match="is not the clock of any committed version"):
            push(repo, fog, seq, value=0.0625, base=VectorClock.of(base))
    alog.close()


def test_unset_mixing_averages_the_fogs_pushing_to_a_model(tmp_path):
    """With mixing unset each push is scaled by 1 / (the fogs that have pushed to the model): a lone fog takes whole
    steps, and once two fogs push, their pushes from one base add up to their mean, not their sum."""
    repo, alog = open_repo(tmp_path)
    repo.register("m", to_table(W0), ModelSettings(ConsistencyPolicy(ConsistencyMode.EVENTUAL, staleness_exponent=0.0)),
                  actor="admin")
    assert push(repo, "fog-a", 1, value=1.0).weight == 1.0  # one fog: the whole delta
    assert push(repo, "fog-b", 1, value=3.0).weight == 0.5  # a second fog: each push counts half
    head = repo.head("m")["clocks"]["fc1"]
    base = VectorClock.of(head)
    before = to_arrays(repo.get("m").table)["fc1.bias"].copy()
    a = push(repo, "fog-a", 2, value=2.0, base=base)
    b = push(repo, "fog-b", 2, value=4.0, base=base)  # concurrent: from the same base
    assert (a.weight, b.weight) == (0.5, 0.5)
    np.testing.assert_allclose(to_arrays(repo.get("m").table)["fc1.bias"] - before, 3.0)  # the mean of 2 and 4
    assert push(repo, "fog-c", 1, value=1.0, base=VectorClock.of(repo.head("m")["clocks"]["fc1"])).weight == \
        pytest.approx(1 / 3)
    assert [v.weight for v in repo.versions("m")[1:]] == pytest.approx([1.0, 0.5, 0.5, 0.5, 1 / 3])
    alog.close()


def test_a_commit_logs_its_model_version_and_fog_as_json_fields(tmp_path):
    """`--log-format json` (HYPRSTREAM_LOG_FORMAT=json): one object per line, with the fields that let one
    update be followed across tiers (the fog's round line carries the same model_version)."""
    import io
    import logging

    from hyprstream.runtime import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("hyprstream.core")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    repo, alog = open_repo(tmp_path)
    try:
        repo.register("m", to_table(W0), EVENTUAL, actor="admin")
        push(repo, "fog-a", 1, value=0.5)
        with pytest.raises(UpdateRejected):
            push(repo, "fog-a", 1, value=0.5)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        alog.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    commit = next(e for e in lines if e["message"].startswith("model m: version 1"))
    assert {k: commit[k] for k in ("level", "logger", "model", "model_version", "fog", "seq", "participants")} == {
        "level": "INFO", "logger": "hyprstream.core", "model": "m", "model_version": 1, "fog": "fog-a", "seq": 1,
        "participants": 2}
    assert commit["time"].endswith("Z") and "T" in commit["time"]
