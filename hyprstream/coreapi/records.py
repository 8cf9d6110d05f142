"""The records core and its clients exchange: a model's settings, a version's lineage entry, a pulled
snapshot, a push's result and what a push claims beyond its delta; and the name rule every model,
layer, fog and token name follows."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from hyprstream.consistency import ConsistencyPolicy
from hyprstream.errors import ValidationError
from hyprstream.vector_clock import VectorClock

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}\Z")  # models, layers, fogs, tokens


@dataclass(frozen=True)
class ModelSettings:
    consistency: ConsistencyPolicy = field(default_factory=ConsistencyPolicy)
    max_update_norm: float | None = None  # refuse deltas whose L2 norm exceeds this


@dataclass(frozen=True)
class VersionInfo:
    version: int
    parent: int | None
    created: float
    actor: str
    layers: tuple[str, ...]  # layer groups this version changed
    participants: int = 0
    staleness: Mapping[str, int] = field(default_factory=dict)
    weight: float = 1.0
    update_norm: float = 0.0
    fog: str | None = None  # the fog whose push made this version (None for version 0)
    seq: int | None = None
    clocks: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # every layer's clock at this version
    update_sha256: str | None = None
    privacy: Mapping[str, float] | None = None  # the privacy the push's round spent (e.g. epsilon, delta), if any
    accuracy: float | None = None  # on core's validation rows, when the model has an evaluation
    loss: float | None = None
    update_bytes: int | None = None  # payload bytes of the pushed delta (None for version 0)
    # federated evaluation on the agents' held-out splits, by fog: {"loss", "accuracy", "devices"}
    federated: Mapping[str, Mapping[str, float]] | None = None

    @property
    def federated_score(self) -> dict[str, float] | None:
        return federated_score(self.federated)


def federated_score(federated: Mapping[str, Mapping[str, float]] | None) -> dict[str, float] | None:
    """A version's federated evaluations (by fog) together: loss and accuracy averaged over all the devices
    that scored it; None when no fog reported one."""
    if not federated:
        return None
    n = sum(s["devices"] for s in federated.values())
    return {"loss": sum(s["loss"] * s["devices"] for s in federated.values()) / n,
            "accuracy": sum(s["accuracy"] * s["devices"] for s in federated.values()) / n, "devices": n}


@dataclass(frozen=True)
class Snapshot:
    """A model version: its layer table (only the layers asked for) and the clocks of those layers."""

    model: str
    version: int
    table: pa.Table
    clocks: dict[str, VectorClock]


@dataclass(frozen=True)
class PushResult:
    version: int
    staleness: dict[str, int]
    weight: float
    update_norm: float


def quote(value: Any) -> str:
    """``repr(value)`` cut to 64 characters: a refusal names what it got without echoing megabytes."""
    text = repr(value)
    return text if len(text) <= 64 else text[:60] + "...)"


def check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise ValidationError(f"invalid {kind} name {quote(value)}: use 1-128 letters, digits, '_', '.', '-'")
    return value


__all__ = ["NAME", "ModelSettings", "PushResult", "Snapshot", "VersionInfo", "check_name", "quote"]
