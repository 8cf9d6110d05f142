"""Evaluation of every version at core, on a validation table the operator provides, and a regression guard.

For a model named in ``core.toml``'s ``[evaluation.<model>]`` (the task, an Arrow IPC or Parquet file of
rows in the task's store schema, and a guard), core scores each candidate version before it commits it:
the task's model with the version's weights, its mean loss and accuracy on those rows. Both go into the
version's lineage entry and its audit entry, and into ``/metrics``. The guard compares the candidate's
accuracy with the best of the model's versions so far:

* ``keep``: record only;
* ``warn``: commit, log a warning, and mark the push ``regression`` in its audit entry;
* ``refuse``: refuse the push (refusal code ``regression``, audited) when the accuracy falls more than
  ``margin`` below the best; the model keeps its current version and the fog's outbox drops the push.

The validation rows never leave core and never reach a fog or a device. Torch and the task are loaded
only for models that have an evaluation.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hyprstream.config import Checked, setting
from hyprstream.errors import ConfigError, HyprstreamError

log = logging.getLogger("hyprstream.core")


class Guard(enum.Enum):
    KEEP = "keep"
    WARN = "warn"
    REFUSE = "refuse"


@dataclass(frozen=True)
class EvaluationSection(Checked):
    """``[evaluation.<model>]`` of ``core.toml``."""

    task: str = setting(doc="the task whose model the weights load into (e.g. digits)")
    validation: str = setting(doc="Arrow IPC (.arrow) or Parquet file of rows in the task's store schema")
    guard: Guard = setting(Guard.WARN, doc="keep, warn or refuse a version worse than the best by > margin")
    margin: float = setting(0.02, ge=0.0, le=1.0, doc="accuracy below the best tolerated (0.02: two points)")


@dataclass(frozen=True)
class Score:
    loss: float
    accuracy: float


class Evaluator:
    """One model's validation rows and task; :meth:`score` evaluates a full set of weights."""

    def __init__(self, model: str, section: EvaluationSection, *, source: str | None = None) -> None:
        from hyprstream.learning.task import get_task

        key = f"evaluation.{model}"
        self.model, self.guard, self.margin = model, section.guard, section.margin
        try:
            self.task = get_task(section.task)
        except HyprstreamError as exc:
            raise ConfigError(str(exc), source=source, key=f"{key}.task") from None
        self.data = _read_rows(self.task, Path(section.validation), source=source, key=f"{key}.validation")
        self._lock = threading.Lock()  # one scoring at a time (torch threads are the process's)

    def score(self, weights: Mapping[str, np.ndarray]) -> Score:
        """Loss and accuracy of the task's model with ``weights``; ValidationError when they do not fit it."""
        from hyprstream.learning.trainer import evaluate, load_weights

        with self._lock:
            model = self.task.build_model(seed=0)
            load_weights(model, weights)
            loss, accuracy = evaluate(self.task, model, self.data)
        return Score(float(loss), float(accuracy))

    def regression(self, candidate: Score, best: float | None) -> bool:
        """Whether ``candidate`` falls more than the margin below the best accuracy so far."""
        return best is not None and candidate.accuracy < best - self.margin


def _read_rows(task, path: Path, *, source: str | None, key: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            table = pq.read_table(path)
        else:
            with pa.memory_map(str(path)) as f:
                table = pa.ipc.open_file(f).read_all()
        data = task.from_table(table)
    except (OSError, pa.ArrowException, HyprstreamError, KeyError, ValueError) as exc:
        raise ConfigError(f"{path}: not a table of task {task.name!r}'s rows: {exc}", source=source,
                          key=key) from None
    if len(data) == 0:
        raise ConfigError(f"{path}: no rows", source=source, key=key)
    return data


__all__ = ["EvaluationSection", "Evaluator", "Guard", "Score"]
