"""Which features combine, at the deployed fog and in the simulator.

Six axes make a :class:`Cell` (192 of them, :func:`all_cells`): the schedule (sync rounds, or buffered
FedBuff), the aggregation (the weighted mean; a rule that needs each update in the clear -- trimmed_mean,
median or an installed rule --; or SecAgg+), differential privacy (none, DP-SGD on the devices,
client-level DP with central or distributed noise), the participants (every eligible agent, or the
telemetry choice of ``fleet.clients_per_round``), the devices (``full``, or ``hybrid``: fewer layer
groups trained) and the update encoding (fp32, int8).

:func:`conflict` says whether a cell runs at the deployed fog or in the simulator, or, in one line, why
not. It reads one ordered list of refusals, :data:`RULES` (the first that matches decides), and so do
``FogConfig.check`` and ``Experiment.check`` (:func:`refusals`: ``hyprstream config validate`` names the
conflict of a configuration in one line), :func:`table` (docs/fog.md, "Which features combine";
``python -m hyprstream.fog.composition`` prints it) and the tests. :data:`FAMILIES` groups the cells
that run, so that the tests covering each group can be listed.

A robust rule and SecAgg+ are two values of one axis: a configuration that asks for both is refused
with :data:`ROBUST_WITH_SECAGG` before any cell is looked at.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from hyprstream.codec import Encoding
from hyprstream.fog.config import RoundMode
from hyprstream.privacy.client_dp import NoisePlacement
from hyprstream.privacy.config import (CLIENT_DP_DISTRIBUTED_NEEDS_SECAGG, CLIENT_DP_NEEDS_THE_MEAN,
                                       PrivacyConfig)
from hyprstream.telemetry.records import Strategy


class Where(enum.Enum):
    FOG = "fog"  # the deployed fog (hyprstream fog run), configured by a kind = "fog" TOML
    SIM = "sim"  # the simulator (hyprstream simulate), configured by a kind = "experiment" TOML


class Aggregate(enum.Enum):
    MEAN = "mean"  # the weighted mean (FedAvg; staleness-weighted in buffered mode)
    ROBUST = "robust"  # needs each update in the clear: trimmed_mean, median or an installed rule
    SECAGG = "secagg"  # SecAgg+ ([privacy.secagg]): the fog learns only the sum


class Dp(enum.Enum):
    NONE = "none"
    DPSGD = "dpsgd"  # sample-level DP-SGD on the devices ([privacy.dpsgd])
    CENTRAL = "central"  # client-level DP, noise added by the fog ([privacy.client_dp] placement = "central")
    DISTRIBUTED = "distributed"  # client-level DP, noise split over the agents (placement = "distributed")


class Participants(enum.Enum):
    ALL = "all"  # every eligible agent
    SELECTED = "selected"  # the telemetry choice of fleet.clients_per_round agents


DEVICES = (Strategy.FULL, Strategy.HYBRID)  # the strategies that train (``minimal`` declines every request)
CLIENT_DP = (Dp.CENTRAL, Dp.DISTRIBUTED)


@dataclass(frozen=True)
class Cell:
    """One combination: a value of every axis."""

    schedule: RoundMode = RoundMode.SYNC
    aggregation: Aggregate = Aggregate.MEAN
    dp: Dp = Dp.NONE
    participants: Participants = Participants.ALL
    devices: Strategy = Strategy.FULL
    encoding: Encoding = Encoding.FP32

    def __post_init__(self) -> None:
        if self.devices not in DEVICES:
            raise ValueError(f"devices train in the full or hybrid strategy, not {self.devices.value!r}")


# the axes in Cell's field order, each with its values
AXES: dict[str, tuple[enum.Enum, ...]] = {
    "schedule": tuple(RoundMode), "aggregation": tuple(Aggregate), "dp": tuple(Dp),
    "participants": tuple(Participants), "devices": DEVICES, "encoding": tuple(Encoding),
}
TITLES = {"schedule": "Schedule", "aggregation": "Aggregation", "dp": "DP", "participants": "Participants",
          "devices": "Devices", "encoding": "Encoding"}
LABELS: dict[enum.Enum, str] = {
    RoundMode.SYNC: "sync", RoundMode.BUFFERED: "buffered",
    Aggregate.MEAN: "mean", Aggregate.ROBUST: "robust", Aggregate.SECAGG: "SecAgg+",
    Dp.NONE: "none", Dp.DPSGD: "DP-SGD", Dp.CENTRAL: "client DP central", Dp.DISTRIBUTED: "client DP distributed",
    Participants.ALL: "all", Participants.SELECTED: "selected",
    Strategy.FULL: "full", Strategy.HYBRID: "hybrid",
    Encoding.FP32: "fp32", Encoding.INT8: "int8",
}


def all_cells() -> tuple[Cell, ...]:
    """Every combination: the product of the axes."""
    return tuple(Cell(*values) for values in itertools.product(*AXES.values()))


@dataclass(frozen=True)
class Pattern:
    """A set of cells: the values some axes are limited to (the other axes: any value)."""

    limits: tuple[tuple[str, frozenset[enum.Enum]], ...] = ()

    def __contains__(self, cell: Cell) -> bool:
        return all(getattr(cell, axis) in values for axis, values in self.limits)

    def values(self, axis: str) -> tuple[enum.Enum, ...]:
        """The values ``axis`` takes in this set, in the axis' order."""
        allowed = dict(self.limits).get(axis)
        return tuple(v for v in AXES[axis] if allowed is None or v in allowed)


def when(**axes: enum.Enum | tuple[enum.Enum, ...]) -> Pattern:
    """The cells whose axes take the given value (or one of the given values); other axes: any."""
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
        raise ValueError(f"no such axis: {', '.join(unknown)} (axes: {', '.join(AXES)})")
    return Pattern(tuple((axis, frozenset(v if isinstance(v, tuple) else (v,))) for axis, v in axes.items()))


@dataclass(frozen=True)
class Rule:
    """A refusal: the cells ``when`` matches do not run at the places in ``at``, for ``reason``.
    ``fog_key`` / ``sim_key``: the config key ``config validate`` reports it under; None where no config
    of that kind can ask for the combination (it is set elsewhere, or arises at run time)."""

    name: str
    when: Pattern
    reason: str
    at: tuple[Where, ...] = (Where.FOG, Where.SIM)
    fog_key: str | None = None
    sim_key: str | None = None

    def key(self, where: Where) -> str | None:
        return self.fog_key if where is Where.FOG else self.sim_key


@dataclass(frozen=True)
class Family:
    """Cells that run at ``at``: a group the tests that cover it are listed for."""

    name: str
    at: Where
    when: Pattern

    @property
    def id(self) -> str:
        return f"{self.at.value}: {self.name}"


ROBUST_WITH_SECAGG = ("robust aggregation needs each update in the clear; with secure aggregation the fog sees "
                      "only the sum: use aggregation = 'mean' (clipping bounds each agent's influence)")

BUFFERED, SYNC = RoundMode.BUFFERED, RoundMode.SYNC
MEAN, ROBUST, SECAGG = Aggregate.MEAN, Aggregate.ROBUST, Aggregate.SECAGG
SELECTED, ALL = Participants.SELECTED, Participants.ALL
HYBRID, FULL = Strategy.HYBRID, Strategy.FULL
NO_DP, DPSGD = Dp.NONE, Dp.DPSGD

# In order: the first rule that matches a cell decides. A rule that a config can ask for comes after
# every rule that parsing reports first ([privacy] is checked before the config as a whole).
RULES: tuple[Rule, ...] = (
    Rule("distributed noise needs SecAgg+", when(dp=Dp.DISTRIBUTED, aggregation=(MEAN, ROBUST)),
         CLIENT_DP_DISTRIBUTED_NEEDS_SECAGG, fog_key="privacy.client_dp.placement",
         sim_key="privacy.client_dp.placement"),
    Rule("client DP needs the mean", when(dp=Dp.CENTRAL, aggregation=ROBUST), CLIENT_DP_NEEDS_THE_MEAN,
         fog_key="rounds.aggregation", sim_key="training.aggregation"),
)

# buffered operation runs the same at the deployed fog and in the simulator (the same BufferedFog)
_BUFFERED = (
    ("buffered", when(schedule=BUFFERED, aggregation=(MEAN, ROBUST), dp=(NO_DP, DPSGD))),
    ("secure buffered cohorts", when(schedule=BUFFERED, aggregation=SECAGG, dp=(NO_DP, DPSGD))),
    ("buffered client-level DP, each push clipped and noised by the fog",
     when(schedule=BUFFERED, aggregation=MEAN, dp=Dp.CENTRAL)),
    ("client-level DP over secure buffered cohorts", when(schedule=BUFFERED, aggregation=SECAGG, dp=CLIENT_DP)),
)

FAMILIES: tuple[Family, ...] = (
    Family("plain rounds", Where.FOG, when(schedule=SYNC, aggregation=(MEAN, ROBUST), dp=(NO_DP, DPSGD),
                                           devices=FULL)),
    Family("hybrid devices in plain rounds", Where.FOG,
           when(schedule=SYNC, aggregation=(MEAN, ROBUST), dp=(NO_DP, DPSGD), devices=HYBRID)),
    Family("secure rounds", Where.FOG, when(schedule=SYNC, aggregation=SECAGG, dp=(NO_DP, DPSGD), devices=FULL)),
    Family("hybrid devices in secure rounds", Where.FOG,
           when(schedule=SYNC, aggregation=SECAGG, dp=(NO_DP, DPSGD), devices=HYBRID)),
    Family("client-level DP", Where.FOG, when(schedule=SYNC, aggregation=SECAGG, dp=CLIENT_DP, participants=ALL)),
    Family("client-level DP, the fog clipping and noising a plain round", Where.FOG,
           when(schedule=SYNC, aggregation=MEAN, dp=Dp.CENTRAL)),
    Family("client-level DP over a telemetry-weighted sample", Where.FOG,
           when(schedule=SYNC, aggregation=SECAGG, dp=CLIENT_DP, participants=SELECTED)),
    *(Family(name, Where.FOG, pattern) for name, pattern in _BUFFERED),
    Family("sync steps", Where.SIM, when(schedule=SYNC, aggregation=(MEAN, ROBUST), dp=(NO_DP, DPSGD),
                                         participants=ALL)),
    Family("sync steps over a telemetry choice", Where.SIM,
           when(schedule=SYNC, aggregation=(MEAN, ROBUST), dp=(NO_DP, DPSGD), participants=SELECTED)),
    Family("client-level DP on plain steps", Where.SIM, when(schedule=SYNC, aggregation=MEAN, dp=Dp.CENTRAL)),
    Family("secure steps", Where.SIM, when(schedule=SYNC, aggregation=SECAGG, participants=ALL)),
    Family("secure steps over a telemetry choice", Where.SIM,
           when(schedule=SYNC, aggregation=SECAGG, participants=SELECTED)),
    *(Family(name, Where.SIM, pattern) for name, pattern in _BUFFERED),
)


def refusal(cell: Cell, where: Where | str) -> Rule | None:
    """The rule that refuses ``cell`` at ``where`` (the first that matches), None when the combination runs."""
    where = Where(where)
    return next((rule for rule in RULES if where in rule.at and cell in rule.when), None)


def conflict(cell: Cell, where: Where | str) -> str | None:
    """None when ``cell`` runs at ``where`` ("fog" or "sim"), else one line: what conflicts, and why."""
    rule = refusal(cell, where)
    return None if rule is None else rule.reason


def refusals(cells: Iterable[Cell], where: Where | str) -> Iterator[tuple[str, str]]:
    """``(config key, reason)`` of the first of a configuration's cells that does not run at ``where``:
    at most one pair, so that ``config validate`` names one conflict in one line."""
    where = Where(where)
    for cell in cells:
        rule = refusal(cell, where)
        if rule is not None:
            yield rule.key(where) or "", rule.reason
            return


def dp_values(privacy: PrivacyConfig, *, devices: bool) -> tuple[Dp, ...]:
    """The DP axis' values a ``[privacy]`` table asks for (DP-SGD and client-level DP compose: each is a
    cell to check). ``devices``: whether its ``[privacy.dpsgd]`` reaches the devices (an experiment's
    does; at a deployed fog each device's own profile decides)."""
    values = []
    if devices and privacy.dpsgd is not None:
        values.append(Dp.DPSGD)
    if privacy.client_dp is not None:
        values.append(Dp.CENTRAL if privacy.client_dp.placement is NoisePlacement.CENTRAL else Dp.DISTRIBUTED)
    return tuple(values) or (Dp.NONE,)


def family_of(cell: Cell, where: Where | str) -> Family | None:
    """The family of running cells that holds ``cell`` at ``where`` (None for a refused cell)."""
    where = Where(where)
    return next((f for f in FAMILIES if f.at is where and cell in f.when), None)


# ------------------------------------------------------------------------------------------- the table
TARGETS = {Where.FOG: "Deployed fog (`kind = \"fog\"`, `hyprstream fog run`)",
           Where.SIM: "Simulator (`kind = \"experiment\"`, `hyprstream simulate`)"}


def _values(pattern: Pattern, axis: str) -> str:
    values = pattern.values(axis)
    return "any" if len(values) == len(AXES[axis]) else ", ".join(LABELS[v] for v in values)


def _row(name: str, pattern: Pattern, cells: int, verdict: str) -> str:
    columns = [name, *(_values(pattern, axis) for axis in AXES), str(cells), verdict.replace("|", "\\|")]
    return "| " + " | ".join(columns) + " |"


def _target(where: Where) -> list[str]:
    """One target's table: the families that run, then the refusals in order with the cells each decides."""
    cells = all_cells()
    decided = [refusal(cell, where) for cell in cells]
    runs = decided.count(None)
    lines = [f"**{TARGETS[where]}**: {runs} of {len(cells)} combinations run.", "",
             "| Family | " + " | ".join(TITLES.values()) + " | Cells | Verdict |",
             "|" + "---|" * (len(AXES) + 3)]
    for family in (f for f in FAMILIES if f.at is where):
        count = sum(1 for cell in cells if cell in family.when)
        lines.append(_row(family.name, family.when, count, "runs"))
    for rule in RULES:
        count = sum(1 for r in decided if r is rule)
        if count:
            lines.append(_row(rule.name, rule.when, count, f"refused: {rule.reason}"))
    return lines


def table() -> str:
    """The tables of docs/fog.md ("Which features combine"), one per target, as Markdown."""
    lines: list[str] = []
    for where in Where:
        lines += [*_target(where), ""]
    return "\n".join(lines)


__all__ = ["AXES", "CLIENT_DP", "DEVICES", "FAMILIES", "ROBUST_WITH_SECAGG", "RULES", "Aggregate",
           "Cell", "Dp", "Family", "Participants", "Pattern", "Rule", "Where", "all_cells", "conflict", "dp_values",
           "family_of", "refusal", "refusals", "table", "when"]


if __name__ == "__main__":
    print(table(), end="")
