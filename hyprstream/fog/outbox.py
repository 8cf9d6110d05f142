"""The fog's durable outbox: pushes to core that have not been acknowledged yet.

A push is written to the outbox (Arrow IPC file: temp file, fsync, atomic rename) before it is sent,
and removed only once core has answered for it. While core is unreachable pushes accumulate and are
delivered in order when it is back. Each push keeps the sequence number it was given, so a push whose
acknowledgement was lost is refused by core as a replay when it is sent again: nothing is applied
twice, and nothing acknowledged is lost.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import pyarrow as pa

from hyprstream.coreapi.client import CoreClient
from hyprstream.durable import write_atomic
from hyprstream.coreapi.records import PushResult
from hyprstream.vector_clock import VectorClock, clocks_from_json, clocks_to_json
from hyprstream.errors import Refusal, TransportError, UpdateRejected

log = logging.getLogger("hyprstream.fog")

_META = b"hyprstream.push"


@dataclass(frozen=True)
class Push:
    seq: int
    model: str
    fog: str
    delta: pa.Table
    base_clocks: dict[str, VectorClock]
    participants: int
    privacy: dict[str, float] | None = None  # client-level DP spend of a secure round, for core's audit
    transcript_sha256: str | None = None  # a secure round's transcript hash, for core's audit


class Outcome(Enum):
    COMMITTED = "committed"  # core made a new version of it
    ALREADY_APPLIED = "already_applied"  # core had it already (an earlier send's answer was lost)
    REFUSED = "refused"  # core refused it (e.g. too stale for the model's consistency mode)


@dataclass(frozen=True)
class Delivery:
    push: Push
    outcome: Outcome
    result: PushResult | None = None
    reason: str = ""


class Outbox:
    """Pending pushes, in sequence order; on disk under ``directory`` (in memory when None)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._pending: dict[int, Push] = {}
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            for path in sorted(self.directory.glob("push-*.arrow")):
                push = _read(path)
                self._pending[push.seq] = push

    def __len__(self) -> int:
        return len(self._pending)

    def pending(self) -> list[Push]:
        return [self._pending[s] for s in sorted(self._pending)]

    def put(self, push: Push) -> None:
        if push.seq in self._pending:
            raise ValueError(f"push {push.seq} is already in the outbox")
        if self.directory is not None:
            meta = json.dumps({"seq": push.seq, "model": push.model, "fog": push.fog,
                               "base_clocks": clocks_to_json(push.base_clocks),
                               "participants": push.participants, "privacy": push.privacy,
                               "transcript_sha256": push.transcript_sha256}).encode()
            table = push.delta.replace_schema_metadata({**(push.delta.schema.metadata or {}), _META: meta})

            def write(fh) -> None:
                with pa.ipc.new_file(fh, table.schema) as writer:
                    writer.write_table(table)

            write_atomic(self._path(push.seq), write)
        self._pending[push.seq] = push

    def _remove(self, seq: int) -> None:
        self._pending.pop(seq)
        if self.directory is not None:
            self._path(seq).unlink(missing_ok=True)

    def _path(self, seq: int) -> Path:
        assert self.directory is not None
        return self.directory / f"push-{seq:020d}.arrow"

    def flush(self, core: CoreClient) -> list[Delivery]:
        """Send pending pushes in order until one cannot reach core; returns what core answered."""
        done: list[Delivery] = []
        for push in self.pending():
            try:
                result = core.push_delta(push.model, push.delta, fog=push.fog, seq=push.seq,
                                         base_clocks=push.base_clocks, participants=push.participants,
                                         privacy=push.privacy, transcript_sha256=push.transcript_sha256)
                done.append(Delivery(push, Outcome.COMMITTED, result))
            except UpdateRejected as exc:
                replay = exc.code is Refusal.REPLAY
                outcome = Outcome.ALREADY_APPLIED if replay else Outcome.REFUSED
                if not replay:
                    log.warning("core refused push %d of fog %s: %s", push.seq, push.fog, exc)
                done.append(Delivery(push, outcome, reason=str(exc)))
            except TransportError as exc:
                log.warning("core unreachable, %d push(es) kept in the outbox: %s", len(self), exc)
                break
            self._remove(push.seq)
        return done


def _read(path: Path) -> Push:
    with pa.memory_map(str(path)) as src:
        table = pa.ipc.open_file(src).read_all()
    meta = json.loads(table.schema.metadata[_META])
    table = table.replace_schema_metadata({k: v for k, v in table.schema.metadata.items() if k != _META} or None)
    return Push(meta["seq"], meta["model"], meta["fog"], table, clocks_from_json(meta["base_clocks"]),
                meta["participants"], meta.get("privacy"), meta.get("transcript_sha256"))
