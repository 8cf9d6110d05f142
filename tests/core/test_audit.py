"""The audit log: chain, signatures, head checkpoint, tamper detection, recovery and reports."""

import base64
import datetime as dt
import json
import os

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hyprstream.core import audit, signing
from hyprstream.core.audit import AuditError, AuditLog, Outcome, summarize, verify_bytes, verify_file

pytestmark = pytest.mark.unit

KEY = signing.generate_key()
T0 = 1_800_000_000.0


def ticking(start=T0, step=1.5):
    t = [start - step]

    def clock():
        t[0] += step
        return t[0]
    return clock


def build_log(path, n=12):
    with AuditLog(path, KEY, clock=ticking(), sync=False) as alog:
        for i in range(n):
            actor = ["fog-a", "fog-b", "dash"][i % 3]
            action = ["model.push", "weights.read", "access.refused"][i % 3]
            outcome = Outcome.REFUSED if action == "access.refused" else Outcome.OK
            alog.append(actor, action, "model/m", outcome=outcome,
                        details={"version": i, "norm": 0.25 * i, "clocks": {"fc1": {actor: i}}, "nan": float("nan"),
                                 "text": "é\"\n"})
    return path.read_bytes(), audit.head_path(path).read_bytes()


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return build_log(tmp_path_factory.mktemp("audit") / "audit.jsonl")


def test_entries_are_chained_signed_and_canonical(tmp_path, sample):
    data, head = sample
    lines = data.splitlines()
    assert len(lines) == 13  # audit.create + 12
    entries = [audit.parse_entry(x) for x in lines]
    assert [e.seq for e in entries] == list(range(1, 14))
    assert entries[0].action == "audit.create"
    assert entries[0].details["public_key"] == signing.public_key_text(KEY.public_key())
    assert entries[0].prev == audit.GENESIS
    for before, after in zip(entries, entries[1:]):
        assert after.prev == before.hash
    assert entries[1].details["nan"] == "nan" and entries[1].details["text"] == "é\"\n"
    assert entries[1].time == "2027-01-15T08:00:01.500000Z"
    assert json.loads(head)["seq"] == 13 and json.loads(head)["hash"] == entries[-1].hash
    result = verify_bytes(data, head, KEY.public_key())
    assert result.ok and result.last_seq == 13 and result.head_seq == 13, result
    assert verify_bytes(data, head).ok  # key taken from entry 1


def test_wrong_key_is_detected_at_seq_1(sample):
    data, head = sample
    result = verify_bytes(data, head, signing.generate_key().public_key())
    assert not result.ok and result.first_bad_seq == 1 and "not the given key" in result.reason


def test_forged_entry_with_recomputed_hash_fails_the_signature(sample):
    data, head = sample
    lines = data.splitlines()
    e = audit.parse_entry(lines[4])
    forged_body = {**e.body(), "actor": "mallory"}
    forged = audit.canonical({**forged_body, "hash": audit.entry_hash(forged_body), "sig": e.sig})
    lines[4] = forged
    result = verify_bytes(b"\n".join(lines) + b"\n", head)
    assert (result.ok, result.first_bad_seq) == (False, 5)
    # ... and even a re-signed forgery with another key breaks at seq 1 or the head
    assert "bad signature" in result.reason or "chain" in result.reason


def first_bad_expected(original: bytes, tampered: bytes) -> int:
    p = next((i for i, (a, b) in enumerate(zip(original, tampered)) if a != b), min(len(original), len(tampered)))
    return original[:p].count(b"\n") + 1


@st.composite
def tamperings(draw, data: bytes):
    n = len(data)
    kind = draw(st.sampled_from(["change", "delete", "reorder", "drop_tail", "drop_lines"]))
    if kind == "change":
        a = draw(st.integers(0, n - 1))
        b = draw(st.integers(a + 1, min(n, a + 40)))
        new = draw(st.binary(min_size=b - a, max_size=b - a))
        return kind, data[:a] + new + data[b:]
    if kind == "delete":
        a = draw(st.integers(0, n - 1))
        b = draw(st.integers(a + 1, n))
        return kind, data[:a] + data[b:]
    if kind == "reorder":
        a = draw(st.integers(0, n - 2))
        b = draw(st.integers(a + 1, n - 1))
        c = draw(st.integers(b + 1, n))
        return kind, data[:a] + data[b:c] + data[a:b] + data[c:]
    lines = data.splitlines(keepends=True)
    if kind == "drop_tail":
        k = draw(st.integers(1, len(lines)))
        return kind, b"".join(lines[:-k])
    i = draw(st.integers(0, len(lines) - 1))
    j = draw(st.integers(i + 1, len(lines)))
    return kind, b"".join(lines[:i] + lines[j:])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_tampering_is_detected_at_the_first_changed_entry(sample, data):
    original, head = sample
    kind, tampered = data.draw(tamperings(original), label="tampering")
    assume(tampered != original)
    result = verify_bytes(tampered, head, KEY.public_key())
    assert not result.ok, (kind, result)
    assert result.first_bad_seq == first_bad_expected(original, tampered), (kind, result)


def test_tampered_or_missing_head_is_detected(sample):
    data, head = sample
    cp = json.loads(head)
    older = json.dumps({**cp, "seq": 5}).encode()
    assert verify_bytes(data, older).first_bad_seq == 5  # signature no longer matches
    assert not verify_bytes(data, None).ok
    assert "no head checkpoint" in verify_bytes(data, None).reason
    assert not verify_bytes(data, b"{}").ok


def test_appends_continue_the_chain_after_reopen(tmp_path):
    path = tmp_path / "audit.jsonl"
    build_log(path, n=3)
    with AuditLog(path, KEY, sync=False) as alog:
        assert alog.last_seq == 4
        e = alog.append("admin", "token.issue", "token/x", details={"role": "fog"})
        assert e.seq == 5
    assert verify_file(path, KEY.public_key()).ok


def test_reopen_with_another_key_is_refused(tmp_path):
    path = tmp_path / "audit.jsonl"
    build_log(path, n=2)
    with pytest.raises(AuditError, match="not the given key"):
        AuditLog(path, signing.generate_key(), sync=False)


def test_second_writer_is_refused(tmp_path):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, KEY, sync=False):
        with pytest.raises(AuditError, match="in use by another process"):
            AuditLog(path, KEY, sync=False)


def test_torn_last_line_is_cut_and_the_cut_recorded(tmp_path):
    path = tmp_path / "audit.jsonl"
    data, _ = build_log(path, n=3)
    # a crash in the middle of appending entry 5: partial bytes, checkpoint still at 4
    with open(path, "ab") as fh:
        fh.write(b'{"action":"model.push","actor":"fog-a","det')
    assert verify_file(path).first_bad_seq == 5  # `audit verify` reports it until core repairs it
    with AuditLog(path, KEY, sync=False) as alog:
        assert alog.last_seq == 5
    entries = list(audit.iter_entries(path))
    assert entries[-1].action == "audit.recover" and entries[-1].details["cut_bytes"] == 43
    assert verify_file(path, KEY.public_key()).ok


def test_tampered_log_is_refused_at_open(tmp_path):
    path = tmp_path / "audit.jsonl"
    data, _ = build_log(path, n=3)
    path.write_bytes(data.replace(b'"fog-b"', b'"fog-c"', 1))
    with pytest.raises(AuditError, match="seq 3"):
        AuditLog(path, KEY, sync=False)
    build_log(tmp_path / "b.jsonl", n=3)
    lines = (tmp_path / "b.jsonl").read_bytes().splitlines(keepends=True)
    (tmp_path / "b.jsonl").write_bytes(b"".join(lines[:-1]))  # tail removed: checkpoint catches it
    with pytest.raises(AuditError, match="seq 4: missing"):
        AuditLog(tmp_path / "b.jsonl", KEY, sync=False)


def test_failed_write_is_an_audit_error_and_stops_the_writer(tmp_path, monkeypatch):
    path = tmp_path / "audit.jsonl"
    alog = AuditLog(path, KEY, sync=True)
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(AuditError, match="No space left"):
        alog.append("fog-a", "model.push", "model/m")
    monkeypatch.undo()
    with pytest.raises(AuditError, match="closed"):
        alog.append("fog-a", "model.push", "model/m")
    alog.close()


def test_private_files_are_0600_and_never_overwritten(tmp_path):
    signing.write_private_key(tmp_path / "k.pem", KEY)
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    assert signing.fingerprint(signing.load_private_key(tmp_path / "k.pem")) == signing.fingerprint(KEY)
    with pytest.raises(Exception, match="refusing to overwrite"):
        signing.write_private_key(tmp_path / "k.pem", KEY)
    os.chmod(tmp_path / "k.pem", 0o644)
    with pytest.raises(Exception, match="chmod 600"):
        signing.load_private_key(tmp_path / "k.pem")


def test_report_counts_per_actor_and_action(tmp_path):
    path = tmp_path / "audit.jsonl"
    build_log(path, n=12)
    entries = list(audit.iter_entries(path))
    rep = summarize(entries)
    assert rep.total == 13 and (rep.first_seq, rep.last_seq) == (1, 13)
    rows = {(a, b): (o, r, f) for a, b, o, r, f in rep.rows}
    assert rows[("fog-a", "model.push")] == (4, 0, 0)
    assert rows[("dash", "access.refused")] == (0, 4, 0)
    assert rows[("core", "audit.create")] == (1, 0, 0)
    # seq k is at T0 + 1.5 (k - 1): [T0+3, T0+9) holds seqs 3..6 (fog-b, dash, fog-a, fog-b)
    since = dt.datetime.fromtimestamp(T0 + 3, dt.timezone.utc)
    until = dt.datetime.fromtimestamp(T0 + 9, dt.timezone.utc)
    window = summarize(entries, since=since, until=until)
    assert (window.total, window.first_seq, window.last_seq) == (4, 3, 6)
    md = window.to_markdown()
    assert "| fog-b | weights.read | 2 | 0 | 0 |" in md
    assert window.to_json()["operations"][0] == {"actor": "dash", "action": "access.refused", "ok": 0,
                                                 "refused": 1, "failed": 0}


def test_crash_states_at_creation_and_a_lost_checkpoint(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"action":"audit.cre')  # killed while writing entry 1
    with AuditLog(path, KEY, sync=False) as alog:
        assert alog.last_seq == 1
    assert verify_file(path, KEY.public_key()).ok
    audit.head_path(path).unlink()  # killed between entry 1 and its first checkpoint
    with AuditLog(path, KEY, sync=False) as alog:
        alog.append("fog-a", "weights.read", "model/m")
    assert verify_file(path, KEY.public_key()).ok
    audit.head_path(path).unlink()  # a checkpoint missing under a longer log is not a crash state
    with pytest.raises(AuditError, match="no head checkpoint"):
        AuditLog(path, KEY, sync=False)
    assert "no head checkpoint" in verify_file(path).reason


B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def flip_unused_bits(text: str, alphabet: str = B64) -> str:
    """The same bytes spelt another way: the lowest (unused) bit of the last base64 digit flipped."""
    body = text.rstrip("=")
    return body[:-1] + alphabet[alphabet.index(body[-1]) ^ 1] + text[len(body):]


@pytest.mark.parametrize("seq", [1, 7, 13])
def test_a_respelt_entry_signature_is_detected_at_its_seq(sample, seq):
    data, head = sample
    lines = data.splitlines()
    e = audit.parse_entry(lines[seq - 1])
    respelt = flip_unused_bits(e.sig)
    assert respelt != e.sig and base64.b64decode(respelt) == base64.b64decode(e.sig)  # same bytes, other text
    lines[seq - 1] = lines[seq - 1].replace(e.sig.encode(), respelt.encode())
    result = verify_bytes(b"\n".join(lines) + b"\n", head, KEY.public_key())
    assert (result.ok, result.first_bad_seq, result.reason) == (False, seq, "bad signature")


def test_a_respelt_checkpoint_signature_is_detected(sample):
    data, head = sample
    cp = json.loads(head)
    respelt = audit.canonical({**cp, "sig": flip_unused_bits(cp["sig"])})
    result = verify_bytes(data, respelt, KEY.public_key())
    assert (result.ok, result.first_bad_seq) == (False, 13)
    assert "head checkpoint signature is not valid" in result.reason


def test_a_respelt_public_key_in_entry_1_is_refused(sample):
    data, head = sample
    lines = data.splitlines()
    e = audit.parse_entry(lines[0])
    body = {**e.body(), "details": {**e.details, "public_key": flip_unused_bits(e.details["public_key"])}}
    lines[0] = audit.canonical({**body, "hash": audit.entry_hash(body), "sig": e.sig})
    result = verify_bytes(b"\n".join(lines) + b"\n", head)
    assert (result.ok, result.first_bad_seq) == (False, 1)
    assert "not canonical base64" in result.reason


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=70), urlsafe=st.booleans())
def test_strict_base64_accepts_exactly_the_canonical_spelling(raw, urlsafe):
    text = signing.b64encode(raw, urlsafe=urlsafe)
    assert signing.b64decode(text, urlsafe=urlsafe) == raw
    assert ("=" in text) is (not urlsafe and len(raw) % 3 != 0)
    if raw:  # every other spelling of the same bytes is refused
        alphabet = B64.replace("+/", "-_") if urlsafe else B64
        others = {flip_unused_bits(text, alphabet) if len(raw) % 3 else None, text + "\n", " " + text,
                  text.rstrip("=") if not urlsafe else text + "=" * (-len(text) % 4)}
        for other in others - {None, text}:
            with pytest.raises(ValueError, match="not canonical base64"):
                signing.b64decode(other, urlsafe=urlsafe)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=B64 + "-_= \n", max_size=16), urlsafe=st.booleans())
def test_strict_base64_decodes_only_what_it_would_write(text, urlsafe):
    try:
        raw = signing.b64decode(text, urlsafe=urlsafe)
    except ValueError:
        return
    assert signing.b64encode(raw, urlsafe=urlsafe) == text


def test_an_incremental_check_keeps_bounded_memory_and_the_expected_heads_entry(tmp_path):
    """ChainCheck fed a log in pieces with a window of 3 hashes: the head given before the entries verifies
    whatever its age, memory stays at the window, a tampered entry fails for good."""
    from hyprstream.core.audit import ChainCheck

    log = AuditLog(tmp_path / "audit.jsonl", KEY)
    for i in range(12):
        log.append("fog-a", "model.push", "model/m", details={"i": i})
        if i == 1:
            old_head = (tmp_path / "audit.jsonl.head").read_bytes()  # a genuine head of an earlier moment
    log.close()
    lines = (tmp_path / "audit.jsonl").read_bytes().splitlines()
    head = (tmp_path / "audit.jsonl.head").read_bytes()
    check = ChainCheck(KEY.public_key(), window=3)
    check.expect_head(head)
    for start in range(0, len(lines), 5):
        assert check.feed(lines[start:start + 5]) is None
    verdict = check.against(head)
    assert verdict.ok and verdict.last_seq == len(lines) and len(check.hashes) <= 4
    late = ChainCheck(KEY.public_key(), window=3)  # an old head not given first: named, not mistaken for tampering
    late.feed(lines)
    assert "older than the last 3 checked" in late.against(old_head).reason
    early = ChainCheck(KEY.public_key(), window=3)  # the same old head given first: it verifies
    early.expect_head(old_head)
    early.feed(lines)
    assert early.against(old_head).ok
    tampered = ChainCheck(KEY.public_key(), window=3)
    bad = lines[4].replace(b'"i":3', b'"i":4')
    assert tampered.feed(lines[:4] + [bad]) is not None and not tampered.against(head).ok
    assert not tampered.against(head).ok  # a broken chain stays broken
