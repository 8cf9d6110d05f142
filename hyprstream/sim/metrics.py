"""The metrics table of a simulation run: one row per fog round and one per global version."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from hyprstream.fog.aggregator import FogRound

SCHEMA = pa.schema([
    pa.field("kind", pa.string()),  # "fog_round" or "global"
    pa.field("fog", pa.string()),  # fog name; "core" for global rows
    pa.field("round", pa.int64()),  # global step the row belongs to
    pa.field("version", pa.int64()),  # version committed (fog rows: by that fog; null if nothing pushed)
    pa.field("accuracy", pa.float64()),  # held-out accuracy of the model after this row's update
    pa.field("loss", pa.float64()),  # held-out loss, same model
    pa.field("train_loss", pa.float64()),
    pa.field("participants", pa.int64()),
    pa.field("declined", pa.int64()),
    pa.field("refused", pa.int64()),
    pa.field("failed", pa.int64()),
    pa.field("bytes_up", pa.int64()),  # agent -> fog payload bytes
    pa.field("bytes_down", pa.int64()),  # fog -> agent payload bytes
    pa.field("wall_s", pa.float64()),  # seconds since the run started
    pa.field("sim_s", pa.float64()),  # virtual seconds on the simulated fleet (see hyprstream.sim.clock)
])


@dataclass(frozen=True)
class Row:
    kind: str
    fog: str
    round: int
    version: int | None
    accuracy: float
    loss: float
    train_loss: float
    participants: int
    declined: int
    refused: int
    failed: int
    bytes_up: int
    bytes_down: int
    wall_s: float
    sim_s: float


class MetricsLog:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add_fog_round(self, r: FogRound, *, accuracy: float, loss: float, wall_s: float, sim_s: float) -> Row:
        row = Row("fog_round", r.fog, r.round, r.version, accuracy, loss, r.train_loss, r.participants,
                  r.declined, r.refused, r.failed, r.bytes_up, r.bytes_down, wall_s, sim_s)
        self.rows.append(row)
        return row

    def add_global(self, step: int, version: int, *, accuracy: float, loss: float, rounds: list[FogRound],
                   wall_s: float, sim_s: float) -> Row:
        losses = [(r.train_loss, r.participants) for r in rounds if r.participants and math.isfinite(r.train_loss)]
        n = sum(p for _, p in losses)
        row = Row("global", "core", step, version, accuracy, loss,
                  sum(v * p for v, p in losses) / n if n else float("nan"),
                  sum(r.participants for r in rounds), sum(r.declined for r in rounds),
                  sum(r.refused for r in rounds), sum(r.failed for r in rounds),
                  sum(r.bytes_up for r in rounds), sum(r.bytes_down for r in rounds), wall_s, sim_s)
        self.rows.append(row)
        return row

    def table(self) -> pa.Table:
        return pa.Table.from_pylist([asdict(r) for r in self.rows], schema=SCHEMA)

    def global_rows(self) -> list[Row]:
        return [r for r in self.rows if r.kind == "global"]

    def write(self, path: Path) -> None:
        pq.write_table(self.table(), path)
