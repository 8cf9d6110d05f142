"""The privacy ledger: an append-only, durable record of every privacy spend, with budget enforcement.

One ledger lives in a :class:`~hyprstream.store.Store` table (``privacy_ledger``), with no retention:
an entry is never changed or dropped, so the spend composes across rounds and restarts. Each entry
is one mechanism event (a :class:`~hyprstream.privacy.accountant.GaussianEvent`) charged to a
*subject* in a *scope*:

* ``device`` -- sample-level DP-SGD on one device (subject: the device id); ``base_version`` is the
  model version the device trained on (the request's), ``version`` -1: the device cannot know which
  version core will commit;
* ``model`` -- client-level DP of a model at a fog (subject: the model name); ``version`` is the
  version core committed from that round's aggregate.

A fog charges a round *before* it releases the aggregate (version -1 then: a crash can only
over-count) and binds the entry to the version core committed afterwards (:meth:`PrivacyLedger.bind`,
a second append-only table), so an entry is always bound to the model version it produced.

The epsilon of a subject is the PLD accountant's
(:class:`~hyprstream.privacy.accountant.PldAccountant`, pessimistic: an upper bound) over *all* its
entries, re-accounted from the stored events whenever the ledger is opened: an entry's ``epsilon``
is the cumulative figure reported when it was charged (entries charged before the ledger accounted
with PLD hold the larger RDP figure of their time). :meth:`PrivacyLedger.charge`
checks the budget first and refuses, raising :class:`~hyprstream.privacy.errors.BudgetExceeded`
with the reason, when the new epsilon would exceed it -- so spent never exceeds the budget. The
check and the durable append happen under one lock; the store's single-writer lock keeps other
processes out.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from dataclasses import dataclass, replace

import pyarrow as pa

from hyprstream.privacy.accountant import VALUE_DISCRETIZATION_INTERVAL, GaussianEvent, PldAccountant
from hyprstream.privacy.errors import BudgetExceeded, PrivacyViolation

TABLE = "privacy_ledger"
VERSIONS_TABLE = "privacy_ledger_versions"  # seq -> the version a charged round produced (bound later)
VERSIONS_SCHEMA = pa.schema([pa.field("seq", pa.int64(), nullable=False), pa.field("version", pa.int64(), nullable=False)])
SCHEMA = pa.schema([
    pa.field("seq", pa.int64(), nullable=False),
    pa.field("time", pa.float64(), nullable=False),
    pa.field("scope", pa.string(), nullable=False),
    pa.field("subject", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("base_version", pa.int64(), nullable=False),
    pa.field("version", pa.int64(), nullable=False),
    pa.field("round", pa.string(), nullable=False),
    pa.field("mechanism", pa.string(), nullable=False),
    pa.field("noise_multiplier", pa.float64(), nullable=False),
    pa.field("sample_rate", pa.float64(), nullable=False),
    pa.field("steps", pa.int64(), nullable=False),
    pa.field("delta", pa.float64(), nullable=False),
    pa.field("epsilon", pa.float64(), nullable=False),
    pa.field("budget", pa.float64(), nullable=False),
    pa.field("unit", pa.string(), nullable=False),
])
# Ledgers written before the ``unit`` column stay in their schema: their entries read with the
# default unit, and new entries are appended without it.
LEGACY_SCHEMA = pa.schema([f for f in SCHEMA if f.name != "unit"])


class Scope(enum.Enum):
    DEVICE = "device"
    MODEL = "model"


@dataclass(frozen=True)
class Budget:
    """An (epsilon, delta) budget; ``epsilon = inf`` means account but never refuse."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not self.epsilon > 0 or math.isnan(self.epsilon):
            raise ValueError(f"budget epsilon must be > 0, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"budget delta must lie in (0, 1), got {self.delta}")


@dataclass(frozen=True)
class Charge:
    """What a spend is for: the mechanism event and the model version it is bound to."""

    event: GaussianEvent
    model: str
    base_version: int
    round: str
    mechanism: str
    version: int = -1
    unit: str = "example"  # what the spend protects: "example", "reading (group of 256 examples)", "device"


@dataclass(frozen=True)
class Entry:
    seq: int
    time: float
    scope: Scope
    subject: str
    charge: Charge
    delta: float
    epsilon: float  # the subject's cumulative epsilon at ``delta`` after this entry
    budget: float

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (for the core's audit entry of the version and for telemetry)."""
        e = self.charge.event
        return {"scope": self.scope.value, "subject": self.subject, "model": self.charge.model,
                "base_version": self.charge.base_version, "version": self.charge.version,
                "round": self.charge.round, "mechanism": self.charge.mechanism,
                "noise_multiplier": e.noise_multiplier, "sample_rate": e.sample_rate, "steps": e.steps,
                "delta": self.delta, "epsilon": self.epsilon, "budget": self.budget, "seq": self.seq,
                "unit": self.charge.unit}


def check_budget(spent: float, would_be: float, budget: Budget, what: str) -> None:
    """Raise BudgetExceeded when ``would_be`` exceeds the budget (pure rule, tested on its own)."""
    if not would_be <= budget.epsilon:
        raise BudgetExceeded(
            f"privacy budget: {what} would raise epsilon from {spent:.4g} to {would_be:.4g} "
            f"(delta {budget.delta:g}), over the budget of {budget.epsilon:.4g}",
            spent=spent, would_be=would_be, budget=budget.epsilon)


class PrivacyLedger:
    """The ledger table of one store. Not thread-safe across stores; one instance per store."""

    def __init__(self, store, interval: float = VALUE_DISCRETIZATION_INTERVAL) -> None:
        from hyprstream.store import Retention

        self.store = store
        self.interval = interval  # the PLD's value discretization interval
        self._lock = threading.Lock()
        for table in (TABLE, VERSIONS_TABLE):
            if table in store.tables() and store.retention(table) != Retention():
                raise PrivacyViolation(f"the {table} table has a retention limit: spends may have been forgotten")
        self._schema = store.schema(TABLE) if TABLE in store.tables() else SCHEMA
        if not any(self._schema.equals(s, check_metadata=False) for s in (SCHEMA, LEGACY_SCHEMA)):
            raise PrivacyViolation(f"the {TABLE} table has columns {self._schema.names}, not a privacy ledger's")
        if not store.readonly:
            store.create_table(TABLE, self._schema, Retention())
            store.create_table(VERSIONS_TABLE, VERSIONS_SCHEMA, Retention())
        self._accountants: dict[tuple[Scope, str], PldAccountant] = {}
        self._entries: list[Entry] = []
        if TABLE in store.tables():
            bound = {}
            if VERSIONS_TABLE in store.tables():
                bound = {r["seq"]: r["version"] for r in store.read(VERSIONS_TABLE).to_pylist()}
            self._entries = [_entry(row, bound) for row in store.read(TABLE).to_pylist()]
        for e in self._entries:
            self._accountant(e.scope, e.subject).compose(e.charge.event)

    def _accountant(self, scope: Scope, subject: str) -> PldAccountant:
        key = (scope, subject)
        if key not in self._accountants:
            self._accountants[key] = PldAccountant(interval=self.interval)
        return self._accountants[key]

    def entries(self, scope: Scope | None = None, subject: str | None = None) -> list[Entry]:
        return [e for e in self._entries
                if (scope is None or e.scope is scope) and (subject is None or e.subject == subject)]

    def history(self, scope: Scope, subject: str) -> list[GaussianEvent]:
        return [e.charge.event for e in self.entries(scope, subject)]

    def spent(self, scope: Scope, subject: str, delta: float) -> float:
        return self._accountant(scope, subject).epsilon(delta)

    def would_spend(self, scope: Scope, subject: str, event: GaussianEvent, delta: float) -> float:
        return self._accountant(scope, subject).epsilon_if(event, delta)

    def check(self, scope: Scope, subject: str, event: GaussianEvent, budget: Budget, what: str = "this round") -> float:
        """The epsilon after ``event``; raises BudgetExceeded when it would exceed ``budget``."""
        acc = self._accountant(scope, subject)
        spent, would_be = acc.epsilon(budget.delta), acc.epsilon_if(event, budget.delta)
        check_budget(spent, would_be, budget, what)
        return would_be

    def charge(self, scope: Scope, subject: str, charge: Charge, budget: Budget) -> Entry:
        """Check the budget and append the entry durably; raises BudgetExceeded and records nothing when over."""
        with self._lock:
            would_be = self.check(scope, subject, charge.event, budget,
                                  f"{charge.mechanism} for {charge.model} v{charge.base_version}")
            seq = (self._entries[-1].seq + 1) if self._entries else 1
            entry = Entry(seq, time.time(), scope, subject, charge, budget.delta, would_be, budget.epsilon)
            self.store.append(TABLE, pa.Table.from_pylist([_row(entry)], schema=self._schema))
            self._entries.append(entry)
            self._accountant(scope, subject).compose(charge.event)
            return entry

    def bind(self, seq: int, version: int) -> Entry:
        """Bind entry ``seq`` (charged with version -1) to the ``version`` its round produced."""
        with self._lock:
            pos = next((i for i, e in enumerate(self._entries) if e.seq == seq), None)
            if pos is None:
                raise PrivacyViolation(f"no privacy ledger entry {seq}")
            old = self._entries[pos]
            if old.charge.version != -1:
                raise PrivacyViolation(f"privacy ledger entry {seq} is already bound to version {old.charge.version}")
            self.store.append(VERSIONS_TABLE, pa.Table.from_pylist([{"seq": seq, "version": version}],
                                                                   schema=VERSIONS_SCHEMA))
            new = replace(old, charge=replace(old.charge, version=version))
            self._entries[pos] = new
            return new


def _row(e: Entry) -> dict[str, object]:
    ev = e.charge.event
    return {"seq": e.seq, "time": e.time, "scope": e.scope.value, "subject": e.subject, "model": e.charge.model,
            "base_version": e.charge.base_version, "version": e.charge.version, "round": e.charge.round,
            "mechanism": e.charge.mechanism, "noise_multiplier": ev.noise_multiplier,
            "sample_rate": ev.sample_rate, "steps": ev.steps, "delta": e.delta, "epsilon": e.epsilon,
            "budget": e.budget, "unit": e.charge.unit}


def _entry(r: dict[str, object], bound: dict[int, int]) -> Entry:
    event = GaussianEvent(float(r["noise_multiplier"]), float(r["sample_rate"]), int(r["steps"]))
    version = int(r["version"]) if int(r["version"]) != -1 else int(bound.get(int(r["seq"]), -1))
    charge = Charge(event, str(r["model"]), int(r["base_version"]), str(r["round"]), str(r["mechanism"]), version,
                    str(r.get("unit", Charge.unit)))
    return Entry(int(r["seq"]), float(r["time"]), Scope(r["scope"]), str(r["subject"]), charge,
                 float(r["delta"]), float(r["epsilon"]), float(r["budget"]))


__all__ = ["SCHEMA", "TABLE", "VERSIONS_SCHEMA", "VERSIONS_TABLE", "Budget", "Charge", "Entry", "PrivacyLedger",
           "Scope", "check_budget"]
