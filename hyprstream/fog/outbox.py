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
from hyprstream.coreapi.commands import SCHEMA, PushDelta, decode, encode, load_json
from hyprstream.coreapi.records import PushResult
from hyprstream.durable import write_atomic
from hyprstream.errors import Refusal, TransportError, UpdateRejected, ValidationError

log = logging.getLogger("hyprstream.fog")

_META = b"hyprstream.push"


@dataclass(frozen=True)
class Push:
    """One push: its typed record (model, fog, sequence number, base clocks, participants and, from a secure
    round, the privacy spend and transcript hash: the ``push_delta`` command core receives and records)
    and its delta."""

    record: PushDelta
    delta: pa.Table

    @property
    def seq(self) -> int:
        return self.record.seq


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
            meta = encode(push.record)
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
                result = core.push(push.record, push.delta)
                done.append(Delivery(push, Outcome.COMMITTED, result))
            except UpdateRejected as exc:
                replay = exc.code is Refusal.REPLAY
                outcome = Outcome.ALREADY_APPLIED if replay else Outcome.REFUSED
                if not replay:
                    log.warning("core refused push %d of fog %s: %s", push.seq, push.record.fog, exc)
                done.append(Delivery(push, outcome, reason=str(exc)))
            except TransportError as exc:
                log.warning("core unreachable, %d push(es) kept in the outbox: %s", len(self), exc)
                break
            self._remove(push.seq)
        return done


def _read(path: Path) -> Push:
    """A push written by :meth:`Outbox.put`, its record checked as core checks a command; ValidationError
    naming the file when it is damaged or not a push."""
    try:
        with pa.memory_map(str(path)) as src:
            table = pa.ipc.open_file(src).read_all()
        metadata = table.schema.metadata or {}
        body = load_json(metadata[_META], "push record")
        if isinstance(body, dict) and "schema" not in body:  # written before the record had the command's form
            body = {**body, "schema": SCHEMA, "command": "push_delta"}
        record = decode(json.dumps(body).encode(), expect=(PushDelta,))
    except (pa.ArrowException, KeyError, ValidationError) as exc:
        raise ValidationError(f"outbox file {path} is not a readable push: {exc}") from None
    table = table.replace_schema_metadata({k: v for k, v in metadata.items() if k != _META} or None)
    return Push(record, table)
