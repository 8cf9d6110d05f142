"""The store's configuration: one frozen object, given at open."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from hyprstream.errors import ValidationError


@dataclass(frozen=True)
class StoreConfig:
    """Tuning of a :class:`~hyprstream.store.Store`.

    ``segment_bytes``: target size of a segment; rows buffered in the write-ahead log are written
    out as a segment once a table has this much. ``wal_max_bytes``: past this size the log is
    checkpointed (every table's buffered rows written to segments) and started afresh. ``sync``:
    fsync on every acknowledged append and commit (turn off only for throwaway stores).
    ``verify_segments``: check each segment's CRC-32 when it is first loaded. ``clock``: seconds
    since the epoch, for age retention (pass a fake one in tests).
    """

    segment_bytes: int = 8 << 20
    wal_max_bytes: int = 64 << 20
    sync: bool = True
    verify_segments: bool = True
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        if self.segment_bytes <= 0:
            raise ValidationError(f"segment_bytes must be positive, got {self.segment_bytes}")
        if self.wal_max_bytes <= 0:
            raise ValidationError(f"wal_max_bytes must be positive, got {self.wal_max_bytes}")
