"""Checked field access for ingested records (JSON objects); every error names the record and field."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hyprstream.learning.task import UNLABELLED
from hyprstream.errors import ValidationError


def _get(record: Mapping[str, Any], i: int, key: str) -> Any:
    if not isinstance(record, Mapping):
        raise ValidationError(f"record {i}: must be a JSON object, got {type(record).__name__}")
    if key not in record:
        raise ValidationError(f"record {i}: lacks {key!r}")
    return record[key]


def number(record: Mapping[str, Any], i: int, key: str, *, lo: float | None = None, hi: float | None = None) -> float:
    value = _get(record, i, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValidationError(f"record {i}: {key!r} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValidationError(f"record {i}: {key!r} must lie in [{lo}, {hi}], got {value!r}")
    return float(value)


def integer(record: Mapping[str, Any], i: int, key: str) -> int:
    value = _get(record, i, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"record {i}: {key!r} must be an integer, got {value!r}")
    return value


def text(record: Mapping[str, Any], i: int, key: str, *, max_chars: int = 10_000) -> str:
    value = _get(record, i, key)
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"record {i}: {key!r} must be a non-empty string")
    if len(value) > max_chars:
        raise ValidationError(f"record {i}: {key!r} is longer than {max_chars} characters")
    return value


def number_list(record: Mapping[str, Any], i: int, key: str, length: int, *, lo: float, hi: float) -> np.ndarray:
    value = _get(record, i, key)
    if not isinstance(value, list) or len(value) != length:
        raise ValidationError(f"record {i}: {key!r} must be a list of {length} numbers")
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValidationError(f"record {i}: {key!r} must be a list of {length} numbers") from None
    if any(isinstance(v, bool) for v in value) or not np.isfinite(arr).all() or arr.min() < lo or arr.max() > hi:
        raise ValidationError(f"record {i}: {key!r} values must be finite numbers in [{lo}, {hi}]")
    return arr


def label_column(records: Sequence[Mapping[str, Any]], n_classes: int) -> np.ndarray:
    """Labels of ``records`` (``label`` optional; absent or null is :data:`UNLABELLED`)."""
    labels = np.full(len(records), UNLABELLED, np.int64)
    for i, r in enumerate(records):
        if isinstance(r, Mapping) and r.get("label") is not None:
            value = integer(r, i, "label")
            if not 0 <= value < n_classes:
                raise ValidationError(f"record {i}: 'label' must lie in [0, {n_classes}), got {value}")
            labels[i] = value
    return labels
