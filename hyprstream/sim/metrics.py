"""The metrics tables of a simulation run.

* ``metrics.parquet``: one row per fog round and one per global version (:data:`SCHEMA`).
* ``participation.parquet``: one row per agent asked to train in a fog round: did its update count,
  how many bytes it sent (:data:`PARTICIPATION_SCHEMA`).
* ``fleet.parquet``: one row per device and step: its profile, whether it was online, its strategy
  and battery level at the start of the step (:data:`FLEET_SCHEMA`).
* ``privacy.parquet``: with sample-level DP, one row per charge in a device's privacy ledger: the
  device's cumulative epsilon after that global step (:data:`PRIVACY_SCHEMA`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from hyprstream.fog.aggregator import FogRound

SCHEMA = pa.schema([
    pa.field("kind", pa.string()),  # "fog_round" or "global"
    pa.field("fog", pa.string()),  # fog name; "core" for global rows ("flat" for the flat baseline)
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
    pa.field("bytes_core", pa.int64()),  # fog -> core payload bytes (the pushed delta)
    pa.field("client_epsilon", pa.float64()),  # client-level DP: the model's epsilon at this fog (global: max)
    pa.field("device_epsilon", pa.float64()),  # sample-level DP: the largest device epsilon after this step
])

PARTICIPATION_SCHEMA = pa.schema([
    pa.field("round", pa.int64()),
    pa.field("fog", pa.string()),
    pa.field("device", pa.int64()),
    pa.field("contributed", pa.bool_()),  # its update is in the fog's aggregate
    pa.field("bytes_up", pa.int64()),
])

FLEET_SCHEMA = pa.schema([
    pa.field("round", pa.int64()),  # the global step
    pa.field("device", pa.int64()),
    pa.field("profile", pa.string()),  # its device profile (firmware-configs/<profile>.toml)
    pa.field("online", pa.bool_()),
    pa.field("strategy", pa.string()),  # full, hybrid or minimal (offline devices keep their last one)
    pa.field("battery_percent", pa.float64()),  # null for mains-powered devices
])

PRIVACY_SCHEMA = pa.schema([
    pa.field("device", pa.int64()),
    pa.field("round", pa.int64()),  # the global step the charge belongs to
    pa.field("epsilon", pa.float64()),  # the device's cumulative epsilon after it
    pa.field("delta", pa.float64()),
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
    bytes_core: int = 0
    client_epsilon: float | None = None
    device_epsilon: float | None = None


class MetricsLog:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.participation: list[dict] = []
        self.fleet: list[dict] = []
        self.privacy: list[dict] = []
        self.base_versions: dict[int, int] = {}  # global step -> the version its rounds started from

    def add_fog_round(self, r: FogRound, *, accuracy: float, loss: float, wall_s: float, sim_s: float,
                      bytes_core: int = 0, client_epsilon: float | None = None) -> Row:
        row = Row("fog_round", r.fog, r.round, r.version, accuracy, loss, r.train_loss, r.participants,
                  r.declined, r.refused, r.failed, r.bytes_up, r.bytes_down, wall_s, sim_s, bytes_core,
                  client_epsilon)
        self.rows.append(row)
        return row

    def add_global(self, step: int, version: int, *, accuracy: float, loss: float, rounds: list[FogRound],
                   wall_s: float, sim_s: float, fog: str = "core") -> Row:
        losses = [(r.train_loss, r.participants) for r in rounds if r.participants and math.isfinite(r.train_loss)]
        n = sum(p for _, p in losses)
        fog_rows = [x for x in self.rows if x.kind == "fog_round" and x.round == step]
        eps = [x.client_epsilon for x in fog_rows if x.client_epsilon is not None]
        row = Row("global", fog, step, version, accuracy, loss,
                  sum(v * p for v, p in losses) / n if n else float("nan"),
                  sum(r.participants for r in rounds), sum(r.declined for r in rounds),
                  sum(r.refused for r in rounds), sum(r.failed for r in rounds),
                  sum(r.bytes_up for r in rounds), sum(r.bytes_down for r in rounds), wall_s, sim_s,
                  sum(x.bytes_core for x in fog_rows), max(eps) if eps else None)
        self.rows.append(row)
        return row

    def add_participation(self, r: FogRound, device_of: Mapping[int, int]) -> None:
        contributed = set(r.contributors)
        times = Counter(r.nodes)  # a buffered push may hold two updates of one agent: a row each, its bytes shared
        seen: Counter = Counter()
        for node in r.nodes:
            share, extra = divmod(r.uplink.get(node, 0), times[node])
            self.participation.append({"round": r.round, "fog": r.fog, "device": device_of[node],
                                       "contributed": node in contributed,
                                       "bytes_up": share + (extra if not seen[node] else 0)})
            seen[node] += 1

    def add_fleet(self, plan, profiles: list[str]) -> None:
        """The fleet at the start of a step (a :class:`~hyprstream.sim.fleet.StepPlan`)."""
        for device, strategy in enumerate(plan.strategies):
            battery = float(plan.battery[device])
            self.fleet.append({"round": plan.step, "device": device, "profile": profiles[device],
                               "online": bool(plan.online[device]), "strategy": strategy.value,
                               "battery_percent": None if math.isnan(battery) else battery})

    def step_of_base(self, base_version: int) -> int | None:
        """The global step whose rounds started from ``base_version``."""
        for step, v in self.base_versions.items():
            if v == base_version:
                return step
        return None

    def step_of_version(self, version: int) -> int | None:
        """Buffered mode, where agents train from many versions: the first global step by whose end
        ``version`` existed (the earliest step its training can fall in, so a spend is never shown late),
        the last step for a version after every row (an update the run's end cut off: its spend is real)."""
        rows = sorted(self.global_rows(), key=lambda r: r.round)
        for row in rows:
            if row.version is not None and row.version >= version:
                return row.round
        return rows[-1].round if rows else None

    def read_device_privacy(self, devices: Path, *, step_of: Callable[[int], int | None]) -> None:
        """Each device's DP-SGD spend from its privacy ledger (``device-NNNN.privacy`` beside its store):
        one :data:`PRIVACY_SCHEMA` row per charge; global rows get the largest device epsilon so far."""
        from hyprstream.privacy.ledger import PrivacyLedger, Scope
        from hyprstream.store import Store

        if not devices.is_dir():
            return
        for path in sorted(devices.glob("device-*.privacy")):
            device = int(path.name.removeprefix("device-").removesuffix(".privacy"))
            with Store.open(path, readonly=True) as store:
                for e in PrivacyLedger(store).entries(Scope.DEVICE):
                    step = step_of(e.charge.base_version)
                    if step is not None:
                        self.privacy.append({"device": device, "round": step, "epsilon": e.epsilon,
                                             "delta": e.delta})
        if not self.privacy:
            return
        latest: dict[int, float] = {}
        by_step: dict[int, float] = {}
        for p in sorted(self.privacy, key=lambda p: (p["round"], p["device"])):
            latest[p["device"]] = p["epsilon"]
            by_step[p["round"]] = max(latest.values())
        running = None
        for i, row in enumerate(self.rows):
            if row.kind == "global":
                running = by_step.get(row.round, running)
                self.rows[i] = replace(row, device_epsilon=running)

    def table(self) -> pa.Table:
        return pa.Table.from_pylist([asdict(r) for r in self.rows], schema=SCHEMA)

    def global_rows(self) -> list[Row]:
        return [r for r in self.rows if r.kind == "global"]

    def fog_rows(self) -> list[Row]:
        return [r for r in self.rows if r.kind == "fog_round"]

    def write(self, path: Path) -> None:
        pq.write_table(self.table(), path)

    def write_run(self, out: Path) -> None:
        """``metrics.parquet``, ``participation.parquet``, ``fleet.parquet`` (when steps were planned) and,
        with DP-SGD, ``privacy.parquet`` in ``out``."""
        self.write(out / "metrics.parquet")
        pq.write_table(pa.Table.from_pylist(self.participation, schema=PARTICIPATION_SCHEMA),
                       out / "participation.parquet")
        if self.fleet:
            pq.write_table(pa.Table.from_pylist(self.fleet, schema=FLEET_SCHEMA), out / "fleet.parquet")
        if self.privacy:
            pq.write_table(pa.Table.from_pylist(self.privacy, schema=PRIVACY_SCHEMA), out / "privacy.parquet")
