"""Every simulated device's local data in one Arrow table, partitioned by device id (the batched engine's
store): memory grows with the data, not with the number of devices.

The table holds the task's store rows (:meth:`Task.to_table <hyprstream.learning.task.Task.to_table>`, what
a device's own store would hold) and a ``device`` column, rows grouped by device in ascending order. It is
written once per run (``devices.arrow``, an Arrow IPC file) and decoded with the task's own
:meth:`~hyprstream.learning.task.Task.from_table`, as an agent decodes its store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hyprstream.errors import ValidationError
from hyprstream.learning.task import Dataset, Task

DEVICE_COLUMN = "device"


@dataclass(frozen=True)
class FleetData:
    """Devices' training examples: device ``i`` holds rows ``offsets[i]:offsets[i + 1]`` of ``x`` and ``y``."""

    x: np.ndarray
    y: np.ndarray
    offsets: np.ndarray  # (devices + 1,), int64, non-decreasing, from 0 to len(y)

    def __post_init__(self) -> None:
        o = self.offsets
        if o.ndim != 1 or len(o) < 1 or o[0] != 0 or o[-1] != len(self.y) or len(self.x) != len(self.y) \
                or (np.diff(o) < 0).any():
            raise ValidationError("device offsets must rise from 0 to the number of rows")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def sizes(self) -> np.ndarray:
        """Each device's number of examples (computed once)."""
        sizes = self.__dict__.get("_sizes")
        if sizes is None:
            sizes = np.diff(self.offsets)
            sizes.flags.writeable = False
            object.__setattr__(self, "_sizes", sizes)
        return sizes

    def dataset(self, device: int) -> Dataset:
        lo, hi = int(self.offsets[device]), int(self.offsets[device + 1])
        return Dataset(self.x[lo:hi], self.y[lo:hi])

    @classmethod
    def from_parts(cls, data: Dataset, parts: Sequence[np.ndarray]) -> FleetData:
        """Device ``i`` holding ``data``'s rows ``parts[i]``."""
        idx = np.concatenate(parts) if len(parts) else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        return cls(data.x[idx], data.y[idx], offsets)

    def to_table(self, task: Task):
        """The Arrow table of these devices: the task's store rows and the ``device`` column."""
        import pyarrow as pa

        table = task.to_table(Dataset(self.x, self.y))
        device = np.repeat(np.arange(len(self), dtype=np.uint32), self.sizes)
        return table.append_column(DEVICE_COLUMN, pa.array(device, pa.uint32()))

    @classmethod
    def from_table(cls, task: Task, table, devices: int) -> FleetData:
        """The devices of ``table`` (rows grouped by ``device``, ascending, every id below ``devices``),
        decoded by the task as an agent decodes its store; anything else is refused by name."""
        if DEVICE_COLUMN not in table.column_names:
            raise ValidationError(f"the device table has no {DEVICE_COLUMN!r} column")
        ids = table.column(DEVICE_COLUMN).to_numpy().astype(np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= devices):
            raise ValidationError(f"device ids must lie in [0, {devices})")
        if (np.diff(ids) < 0).any():
            raise ValidationError("the device table's rows must be grouped by device, in ascending order")
        data = task.from_table(table.drop_columns([DEVICE_COLUMN]))
        if len(data) != len(ids):
            raise ValidationError(f"the device table holds {len(ids) - len(data)} unlabelled row(s): devices "
                                  "train on labelled examples")
        offsets = np.searchsorted(ids, np.arange(devices + 1), side="left").astype(np.int64)
        return cls(data.x, data.y, offsets)

    def save(self, task: Task, path: Path) -> None:
        import pyarrow as pa

        from hyprstream.durable import write_atomic

        table = self.to_table(task)

        def write(fh) -> None:
            with pa.ipc.new_file(fh, table.schema) as writer:
                writer.write_table(table, max_chunksize=1 << 20)

        write_atomic(path, write, sync=False)

    @classmethod
    def load(cls, task: Task, path: Path, devices: int) -> FleetData:
        import pyarrow as pa

        try:
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_file(source).read_all()
        except (OSError, pa.ArrowInvalid) as exc:
            raise ValidationError(f"{path}: not a readable device table: {exc}") from None
        return cls.from_table(task, table, devices)


__all__ = ["DEVICE_COLUMN", "FleetData"]
