"""Core's audit log: JSON Lines, hash-chained, Ed25519-signed, with a signed head checkpoint.

One entry per line, written in one canonical form (keys sorted, no spaces, ASCII)::

    {"action":"model.push","actor":"fog-a","details":{...},"hash":"<hex>","outcome":"ok",
     "prev":"<hex>","schema":"hyprstream.audit/1","seq":7,"sig":"<base64>","subject":"model/m",
     "time":"2026-11-27T21:43:44.123456Z"}

* ``seq`` counts from 1 with no gaps; entry 1 is ``audit.create`` and names the signing key.
* ``hash`` is the SHA-256 of the canonical entry without ``hash`` and ``sig``; ``prev`` is the
  ``hash`` of the entry before (64 zeros for entry 1), so the entries form a chain.
* ``sig`` is the Ed25519 signature of ``b"hyprstream.audit/1\\n" + bytes.fromhex(hash)``.
* The head checkpoint (``<log>.head``, replaced atomically after every append) is a signed record of
  the last ``seq`` and its ``hash``: a log whose tail was cut no longer reaches it.

Changing any byte of a line breaks its canonical form, its hash or its signature; removing or
reordering lines breaks the ``seq`` sequence and the chain; removing the tail falls short of the
checkpoint. :func:`verify_bytes` is the pure check; :class:`AuditLog` is the single writer.
"""

from __future__ import annotations

import datetime as dt
import enum
import fcntl
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hyprstream.core import signing
from hyprstream.durable import write_bytes_atomic
from hyprstream.errors import ConfigError, HyprstreamError

log = logging.getLogger("hyprstream.core.audit")

SCHEMA = "hyprstream.audit/1"
HEAD_SCHEMA = "hyprstream.audit-head/1"
GENESIS = "0" * 64
_ENTRY_DOMAIN = b"hyprstream.audit/1\n"
_HEAD_DOMAIN = b"hyprstream.audit-head/1\n"
RESERVED_ACTORS = frozenset({"core", "anonymous", "cli"})
"""Actors the log itself writes as (core, refused logins, ``token create``): never a token's ``sub``."""
_FIELDS = frozenset({"schema", "seq", "time", "actor", "action", "subject", "outcome", "details", "prev",
                     "hash", "sig"})


class AuditError(HyprstreamError):
    """The audit log cannot be written, or it is not intact (core refuses to start on a broken log)."""


class Outcome(enum.Enum):
    OK = "ok"
    REFUSED = "refused"
    FAILED = "failed"


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    time: str
    actor: str
    action: str
    subject: str
    outcome: str
    details: Mapping[str, Any]
    prev: str
    hash: str
    sig: str

    def body(self) -> dict[str, Any]:
        """The signed content: every field but ``hash`` and ``sig``."""
        return {"schema": SCHEMA, "seq": self.seq, "time": self.time, "actor": self.actor,
                "action": self.action, "subject": self.subject, "outcome": self.outcome,
                "details": self.details, "prev": self.prev}

    def to_line(self) -> bytes:
        return canonical({**self.body(), "hash": self.hash, "sig": self.sig}) + b"\n"

    @property
    def timestamp(self) -> dt.datetime:
        return parse_time(self.time)


@dataclass(frozen=True)
class Checkpoint:
    """The signed head: the last ``seq`` of the log and its ``hash``."""

    seq: int
    hash: str
    time: str
    key: str  # base64 raw Ed25519 public key
    sig: str

    def body(self) -> dict[str, Any]:
        return {"schema": HEAD_SCHEMA, "seq": self.seq, "hash": self.hash, "time": self.time, "key": self.key}

    def to_json(self) -> dict[str, Any]:
        return {**self.body(), "sig": self.sig}


# --- pure pieces -----------------------------------------------------------------------------------

def canonical(obj: Any) -> bytes:
    """The one byte form of a JSON value: sorted keys, no spaces, ASCII, finite numbers only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def plain(value: Any) -> Any:
    """``value`` as plain JSON data: mappings with string keys, lists, finite numbers, strings."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [plain(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return plain(value.item())
    if hasattr(value, "as_dict") and callable(value.as_dict):  # VectorClock
        return plain(value.as_dict())
    return str(value)


def format_time(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> dt.datetime:
    """An ISO 8601 date or date-time; naive values are taken as UTC."""
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def entry_hash(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(body)).hexdigest()


def seal(prev: AuditEntry | None, key: signing.Ed25519PrivateKey, *, time_s: float, actor: str, action: str,
         subject: str, outcome: Outcome = Outcome.OK, details: Mapping[str, Any] | None = None) -> AuditEntry:
    """The entry that follows ``prev`` (None for the first), hashed and signed."""
    seq = 1 if prev is None else prev.seq + 1
    unsigned = AuditEntry(seq, format_time(time_s), str(actor), str(action), str(subject), outcome.value,
                          plain(dict(details or {})), GENESIS if prev is None else prev.hash, "", "")
    h = entry_hash(unsigned.body())
    sig = signing.b64encode(key.sign(_ENTRY_DOMAIN + bytes.fromhex(h)))
    return AuditEntry(**{**unsigned.__dict__, "hash": h, "sig": sig})


def sign_checkpoint(entry: AuditEntry | None, key: signing.Ed25519PrivateKey, *, time_s: float) -> Checkpoint:
    body = Checkpoint(0 if entry is None else entry.seq, GENESIS if entry is None else entry.hash,
                      format_time(time_s), signing.public_key_text(key.public_key()), "")
    sig = signing.b64encode(key.sign(_HEAD_DOMAIN + canonical(body.body())))
    return Checkpoint(body.seq, body.hash, body.time, body.key, sig)


def parse_entry(raw: bytes) -> AuditEntry:
    """One line (without its newline) as an entry; ValueError says why it is not one."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(obj, dict) or set(obj) != _FIELDS or obj.get("schema") != SCHEMA:
        raise ValueError(f"not a {SCHEMA} entry")
    types = {"seq": int, "time": str, "actor": str, "action": str, "subject": str, "outcome": str,
             "details": dict, "prev": str, "hash": str, "sig": str}
    for name, tp in types.items():
        if not isinstance(obj[name], tp) or isinstance(obj[name], bool):
            raise ValueError(f"field {name!r} has the wrong type")
    obj.pop("schema")
    return AuditEntry(**obj)


def parse_checkpoint(raw: bytes) -> Checkpoint:
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"head checkpoint is not JSON ({exc})") from None
    want = {"schema", "seq", "hash", "time", "key", "sig"}
    if not isinstance(obj, dict) or set(obj) != want or obj["schema"] != HEAD_SCHEMA:
        raise ValueError(f"head checkpoint is not a {HEAD_SCHEMA} record")
    if not isinstance(obj["seq"], int) or isinstance(obj["seq"], bool) or not all(
            isinstance(obj[k], str) for k in ("hash", "time", "key", "sig")):
        raise ValueError("head checkpoint has a field of the wrong type")
    obj.pop("schema")
    return Checkpoint(**obj)


def checkpoint_valid(cp: Checkpoint, key: signing.Ed25519PublicKey) -> bool:
    try:
        sig = signing.b64decode(cp.sig)
    except ValueError:
        return False
    return cp.key == signing.public_key_text(key) and signing.verify(key, sig, _HEAD_DOMAIN + canonical(cp.body()))


@dataclass(frozen=True)
class Verification:
    """The result of checking a log: ``ok``, or the first bad ``seq`` and why."""

    ok: bool
    last_seq: int  # last seq of the intact prefix
    first_bad_seq: int | None = None
    reason: str = ""
    head_seq: int | None = None
    key_fingerprint: str | None = None
    key_source: str = ""  # "given" or "log" (the key named by entry 1)

    def message(self) -> str:
        if self.ok:
            return (f"ok: {self.last_seq} entries, chain and signatures intact, head checkpoint at seq "
                    f"{self.head_seq} (key {self.key_fingerprint}, {self.key_source})")
        where = f"seq {self.first_bad_seq}: " if self.first_bad_seq is not None else ""
        return f"{where}{self.reason}"


def _entry_signature_ok(entry: AuditEntry, key: signing.Ed25519PublicKey) -> bool:
    try:
        sig = signing.b64decode(entry.sig)
    except ValueError:
        return False
    try:
        digest = bytes.fromhex(entry.hash)
    except ValueError:
        return False
    return signing.verify(key, sig, _ENTRY_DOMAIN + digest)


class ChainCheck:
    """Checks a log's entries as they come, a whole log at once or the lines added since the last call
    (:meth:`feed`): order, canonical bytes, the hash chain, each signature. :meth:`against` then checks
    what was fed against a head checkpoint. A failure of the chain is final; a head that does not match
    yet (its seq is past what was fed) is not.

    With ``key`` None, signatures are checked against the key that entry 1 records (which proves the
    log is self-consistent, not who wrote it: pass the core's public key for that).
    """

    def __init__(self, key: signing.Ed25519PublicKey | None = None, *, check_signatures: bool = True,
                 window: int = 4096) -> None:
        self.pub = key
        self.key_source = "given" if key is not None else "log"
        self.check_signatures = check_signatures
        self.prev_hash, self.last = GENESIS, 0
        self.window = window  # the hashes of the last this many entries are kept, and the expected head's
        self.hashes: dict[int, str] = {}
        self._recent: deque[int] = deque()
        self.failed: Verification | None = None
        self.head_seq: int | None = None  # the expected head's seq: its hash is kept; reported with a failure

    def _bad(self, seq: int, reason: str) -> Verification:
        return Verification(False, self.last, seq, reason, self.head_seq,
                            signing.fingerprint(self.pub) if self.pub else None, self.key_source)

    def feed(self, lines: Iterable[bytes]) -> Verification | None:
        """Check the next complete lines (without their newline); the chain's failure, or None."""
        if self.failed is not None:
            return self.failed
        for raw in lines:
            self.failed = self._entry(raw)
            if self.failed is not None:
                return self.failed
        return None

    def _entry(self, raw: bytes) -> Verification | None:
        expected = self.last + 1
        try:
            entry = parse_entry(raw)
        except ValueError as exc:
            return self._bad(expected, f"unreadable entry: {exc}")
        if entry.seq != expected:
            return self._bad(expected, f"entry out of order or missing (found seq {entry.seq} in its place)")
        try:
            if canonical({**entry.body(), "hash": entry.hash, "sig": entry.sig}) != raw:
                return self._bad(expected, "bytes differ from the entry's canonical form (the line was edited)")
        except ValueError:
            return self._bad(expected, "entry holds a non-finite number")
        if entry.prev != self.prev_hash:
            return self._bad(expected, "chain broken: 'prev' is not the hash of the entry before")
        if entry_hash(entry.body()) != entry.hash:
            return self._bad(expected, "hash mismatch: the entry's content was changed")
        if expected == 1:
            if entry.action != "audit.create" or not isinstance(entry.details.get("public_key"), str):
                return self._bad(1, "entry 1 is not the audit.create entry naming the signing key")
            try:
                log_key = signing.public_key_from_text(entry.details["public_key"])
            except ValueError as exc:
                return self._bad(1, str(exc))
            if self.pub is None:
                self.pub = log_key
            elif signing.public_key_text(self.pub) != entry.details["public_key"]:
                return self._bad(1, f"log was created with key {signing.fingerprint(log_key)}, "
                                    f"not the given key {signing.fingerprint(self.pub)}")
        if self.check_signatures and not _entry_signature_ok(entry, self.pub):
            return self._bad(expected, "bad signature")
        self.hashes[expected] = entry.hash
        self._recent.append(expected)
        if len(self._recent) > self.window:  # memory stays bounded however long the log
            old = self._recent.popleft()
            if old != self.head_seq:
                del self.hashes[old]
        self.prev_hash, self.last = entry.hash, expected
        return None

    def expect_head(self, head: bytes | None) -> tuple[Checkpoint | None, str]:
        """The head checkpoint (None when missing or unreadable) and the problem with it. Given before the
        entries are fed, the hash of the entry it names is kept whatever its age; failures report its seq."""
        if head is None:
            return None, "no head checkpoint: a removed tail could not be detected"
        try:
            checkpoint = parse_checkpoint(head)
        except ValueError as exc:
            return None, str(exc)
        self.head_seq = checkpoint.seq
        return checkpoint, ""

    def against(self, head: bytes | None, *, torn: bool = False) -> Verification:
        """The verdict on what was fed so far, against ``head`` (bytes of the head checkpoint, or None)."""
        checkpoint, head_problem = self.expect_head(head)
        if self.failed is not None:
            return self.failed
        if torn:
            return self._bad(self.last + 1, "incomplete last line (a torn write or a cut)")
        if self.last == 0:
            return self._bad(1, "the log is empty")
        if checkpoint is None:
            return self._bad(self.last + 1, head_problem) if head is not None else Verification(
                False, self.last, None, head_problem, None, signing.fingerprint(self.pub), self.key_source)
        if not checkpoint_valid(checkpoint, self.pub):
            return self._bad(checkpoint.seq if 1 <= checkpoint.seq <= self.last else self.last + 1,
                             "head checkpoint signature is not valid for the log's key")
        if checkpoint.seq > self.last:
            return self._bad(self.last + 1, f"missing: the signed head checkpoint records seq {checkpoint.seq}, "
                                            f"the log ends at {self.last}")
        if checkpoint.seq >= 1 and checkpoint.seq not in self.hashes:
            return self._bad(checkpoint.seq, f"the signed head checkpoint names entry {checkpoint.seq}, older than the "
                                             f"last {self.window} checked: give the head before the entries")
        if checkpoint.seq >= 1 and self.hashes[checkpoint.seq] != checkpoint.hash:
            return self._bad(checkpoint.seq, "entry differs from the signed head checkpoint")
        return Verification(True, self.last, None, "", checkpoint.seq, signing.fingerprint(self.pub),
                            self.key_source)


def verify_bytes(data: bytes, head: bytes | None, key: signing.Ed25519PublicKey | None = None, *,
                 check_signatures: bool = True) -> Verification:
    """Check a whole log (its bytes) against its head checkpoint (bytes, or None when there is none);
    see :class:`ChainCheck`."""
    complete, _, torn = data.rpartition(b"\n")
    check = ChainCheck(key, check_signatures=check_signatures)
    check.expect_head(head)
    check.feed(complete.split(b"\n") if complete else [])
    return check.against(head, torn=bool(torn))


def head_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".head")


def verify_file(path: str | os.PathLike[str], key: signing.Ed25519PublicKey | None = None, *,
                head: str | os.PathLike[str] | None = None) -> Verification:
    """:func:`verify_bytes` over the files ``path`` and ``head`` (default ``<path>.head``)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        return Verification(False, 0, None, f"cannot read {p}: {exc.strerror or exc}")
    hp = Path(head) if head is not None else head_path(p)
    try:
        head_bytes: bytes | None = hp.read_bytes()
    except FileNotFoundError:
        head_bytes = None
    except OSError as exc:
        return Verification(False, 0, None, f"cannot read {hp}: {exc.strerror or exc}")
    return verify_bytes(data, head_bytes, key)


def iter_entries(path: str | os.PathLike[str]) -> Iterator[AuditEntry]:
    """The complete, parseable entries of a log, in order (no checks: see :func:`verify_file`)."""
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                return
            try:
                yield parse_entry(raw[:-1])
            except ValueError:
                return


# --- report ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Report:
    since: str | None
    until: str | None
    first_seq: int | None
    last_seq: int | None
    total: int
    rows: tuple[tuple[str, str, int, int, int], ...]  # actor, action, ok, refused, failed

    def to_json(self) -> dict[str, Any]:
        return {"since": self.since, "until": self.until, "first_seq": self.first_seq, "last_seq": self.last_seq,
                "total": self.total,
                "operations": [{"actor": a, "action": b, "ok": o, "refused": r, "failed": f}
                               for a, b, o, r, f in self.rows]}

    def to_markdown(self) -> str:
        span = f"{self.since or 'start'} .. {self.until or 'end'}"
        seqs = f"seq {self.first_seq}-{self.last_seq}" if self.total else "no entries"
        out = [f"# Audit report ({span})", "", f"{self.total} entries, {seqs}.", "",
               "| actor | action | ok | refused | failed |", "| --- | --- | ---: | ---: | ---: |"]
        out += [f"| {a} | {b} | {o} | {r} | {f} |" for a, b, o, r, f in self.rows]
        return "\n".join(out) + "\n"


def summarize(entries: Iterator[AuditEntry] | list[AuditEntry], *, since: dt.datetime | None = None,
              until: dt.datetime | None = None) -> Report:
    """Counts per (actor, action) and outcome of the entries with ``since <= time < until``."""
    counts: Counter[tuple[str, str, str]] = Counter()
    first = last = None
    total = 0
    for e in entries:
        t = e.timestamp
        if (since is not None and t < since) or (until is not None and t >= until):
            continue
        counts[(e.actor, e.action, e.outcome)] += 1
        first = e.seq if first is None else first
        last = e.seq
        total += 1
    keys = sorted({(a, b) for a, b, _ in counts})
    rows = tuple((a, b, counts[(a, b, "ok")], counts[(a, b, "refused")], counts[(a, b, "failed")])
                 for a, b in keys)
    return Report(since.isoformat() if since else None, until.isoformat() if until else None, first, last,
                  total, rows)


# --- the writer ------------------------------------------------------------------------------------

class AuditLog:
    """The single writer of an audit log file. Thread-safe; one process at a time (a file lock).

    Opening checks the existing log (canonical form, chain, checkpoint; signatures of the last entry and
    of the checkpoint) and refuses a broken one, except for what a crash can leave: an incomplete last
    line beyond the checkpoint is cut off, and the cut is itself recorded (``audit.recover``).
    Every append is fsynced before it returns, then the checkpoint is replaced atomically.
    """

    def __init__(self, path: str | os.PathLike[str], key: signing.Ed25519PrivateKey, *,
                 actor: str = "core", clock: Callable[[], float] = time.time, sync: bool = True) -> None:
        self.path = Path(path)
        self.head_path = head_path(self.path)
        self._key = key
        self._clock = clock
        self._sync = sync
        self._lock = threading.Lock()
        # called with each entry once it is durable, under the log's lock (keep them cheap; errors are logged)
        self.listeners: list[Callable[[AuditEntry], None]] = []
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot open the audit log: {exc.strerror or exc}", source=str(self.path)) from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise AuditError(f"{self.path}: in use by another process (is a core already running?)") from None
        try:
            self._last, cut = self._open_existing()
            self._fh = open(self.path, "ab", buffering=0)  # noqa: SIM115 - lives as long as the log
            if self._last is None:
                pub = key.public_key()
                self._append_locked(actor, "audit.create", "audit", Outcome.OK,
                                    {"public_key": signing.public_key_text(pub), "key": signing.fingerprint(pub)})
            elif cut:
                self._append_locked(actor, "audit.recover", "audit", Outcome.OK,
                                    {"cut_bytes": cut, "reason": "incomplete last line after a crash"})
            elif self._checkpoint_seq != self._last.seq:
                self._write_checkpoint(self._last, self._clock())
        except BaseException:
            os.close(self._lock_fd)
            raise

    @property
    def public_key(self) -> signing.Ed25519PublicKey:
        return self._key.public_key()

    @property
    def last_seq(self) -> int:
        return 0 if self._last is None else self._last.seq

    def _open_existing(self) -> tuple[AuditEntry | None, int]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror or exc}", source=str(self.path)) from None
        try:
            head: bytes | None = self.head_path.read_bytes()
        except FileNotFoundError:
            head = None
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror or exc}", source=str(self.head_path)) from None
        if head is not None:
            try:
                parse_checkpoint(head)
            except ValueError as exc:
                raise ConfigError(str(exc), source=str(self.head_path)) from None
        self._checkpoint_seq = 0
        if not data:
            if head is not None and parse_checkpoint(head).seq > 0:
                raise AuditError(f"{self.path}: empty, but its head checkpoint records entries: the log was removed")
            return None, 0
        pub = self._key.public_key()
        result = verify_bytes(data, head, pub, check_signatures=False)
        cut = 0
        if not result.ok and result.reason.startswith("incomplete last line") and (
                head is None or result.head_seq is None or result.head_seq <= result.last_seq):
            cut = len(data) - (data.rfind(b"\n") + 1)
            log.warning("%s: cutting an incomplete last line of %d bytes (left by a crash)", self.path, cut)
            with open(self.path, "r+b") as fh:
                fh.truncate(len(data) - cut)
                os.fsync(fh.fileno())
            data = data[:len(data) - cut]
            if not data:  # the crash cut the very first entry: start the log afresh
                return None, 0
            result = verify_bytes(data, head, pub, check_signatures=False)
        if not result.ok and head is None and result.first_bad_seq is None and result.last_seq == 1:
            result = Verification(True, 1, None, "", 0)  # crash between creating the log and its first checkpoint
        if not result.ok:
            raise AuditError(f"{self.path}: not intact, refusing to append: {result.message()}")
        last_line = data[:-1].rsplit(b"\n", 1)[-1]
        last = parse_entry(last_line)
        if not _entry_signature_ok(last, pub):
            raise AuditError(f"{self.path}: last entry is not signed by the configured key "
                             f"{signing.fingerprint(pub)}")
        self._checkpoint_seq = result.head_seq or 0
        return last, cut

    def append(self, actor: str, action: str, subject: str, *, outcome: Outcome = Outcome.OK,
               details: Mapping[str, Any] | None = None) -> AuditEntry:
        """Append one signed entry; durable (fsynced) when this returns. Raises AuditError."""
        with self._lock:
            return self._append_locked(actor, action, subject, outcome, details)

    def _append_locked(self, actor, action, subject, outcome, details) -> AuditEntry:
        if self._fh is None:
            raise AuditError(f"{self.path}: closed")
        now = self._clock()
        entry = seal(self._last, self._key, time_s=now, actor=actor, action=action, subject=subject,
                     outcome=outcome, details=details)
        line = entry.to_line()
        try:
            written = self._fh.write(line)
            if written != len(line):
                raise OSError(f"short write ({written} of {len(line)} bytes)")
            if self._sync:
                os.fsync(self._fh.fileno())
        except OSError as exc:
            self._fail(exc)
        self._last = entry
        self._write_checkpoint(entry, now)
        for listener in self.listeners:
            try:
                listener(entry)
            except Exception:  # noqa: BLE001 - a listener (metrics) must never fail the append it watches
                log.exception("audit listener %r failed", listener)
        return entry

    @property
    def writable(self) -> bool:
        """Whether appends can still succeed (False once a write failed or the log was closed)."""
        return self._fh is not None

    def _write_checkpoint(self, entry: AuditEntry, now: float) -> None:
        cp = sign_checkpoint(entry, self._key, time_s=now)
        try:
            write_bytes_atomic(self.head_path, canonical(cp.to_json()) + b"\n", sync=self._sync)
        except OSError as exc:
            self._fail(exc)
        self._checkpoint_seq = entry.seq

    def _fail(self, exc: OSError):
        # The file may now end in a partial line: stop writing; a restart cuts it off and records it.
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()
        raise AuditError(f"{self.path}: cannot write the audit log: {exc}") from None

    def checkpoint(self) -> Checkpoint:
        with self._lock:
            return sign_checkpoint(self._last, self._key, time_s=self._clock())

    def read_lines(self, since_seq: int = 1, limit: int | None = None) -> list[bytes]:
        """Raw lines (without newline) from ``since_seq`` on, up to ``limit`` of them."""
        with self._lock:
            end = self.last_seq
        out: list[bytes] = []
        with open(self.path, "rb") as fh:
            for n, raw in enumerate(fh, start=1):
                if n > end or (limit is not None and len(out) >= limit):
                    break
                if n >= since_seq:
                    out.append(raw.rstrip(b"\n"))
        return out

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
