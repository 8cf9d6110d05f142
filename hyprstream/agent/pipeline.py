"""The ingest pipeline: records in, rows stored, inference run, predictions stored.

:class:`Pipeline` is the sink of every ingestion source (:mod:`hyprstream.agent.ingest`). For one
batch of records it

1. turns them into rows of the task's store table (``samples``; a missing label is stored as
   :data:`~hyprstream.learning.task.UNLABELLED`) and appends them durably;
2. when a model is loaded, computes the model inputs (with each key's previous rows in front when the
   task needs context, e.g. a sensor's previous reading), runs the inference engine and appends one
   row per record to the ``predictions`` table: time, source, task, model version, prediction, score.
   A failed inference leaves the stored rows in place and answers without predictions.

Store tables are created with retention from the profile's ``[store]`` section: ``samples`` may take
75 % of ``max_mb`` and ``predictions`` 25 %, and rows older than ``max_age_days`` go where the table
has a time column.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from hyprstream.agent.ingest import IngestResult
from hyprstream.agent.profile import StoreRetention
from hyprstream.errors import HyprstreamError
from hyprstream.store import Retention, Store

__all__ = ["PREDICTIONS_SCHEMA", "PREDICTIONS_TABLE", "Pipeline", "create_tables"]

log = logging.getLogger("hyprstream.agent.ingest")

PREDICTIONS_TABLE = "predictions"
PREDICTIONS_SCHEMA = pa.schema([
    pa.field("time", pa.timestamp("ms", tz="UTC"), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("model_version", pa.int64(), nullable=False),
    pa.field("prediction", pa.int32(), nullable=False),
    pa.field("score", pa.float32(), nullable=False),
])
MAX_CONTEXT_KEYS = 10_000
SAMPLES_SHARE = 0.75


def create_tables(store: Store, task, retention: StoreRetention) -> None:
    """Create (or keep) the task's ``samples`` table and ``predictions`` with the profile's retention."""
    total = retention.max_mb << 20
    max_age = retention.max_age_days * 86_400.0
    store.create_table(task.table, task.schema, Retention(
        max_bytes=int(total * SAMPLES_SHARE), max_age_s=max_age if task.time_column else None,
        time_column=task.time_column))
    store.create_table(PREDICTIONS_TABLE, PREDICTIONS_SCHEMA, Retention(
        max_bytes=int(total * (1 - SAMPLES_SHARE)), max_age_s=max_age, time_column="time"))


class Pipeline:
    """Sink of the ingestion sources (see the module docstring). Thread-safe."""

    def __init__(self, task, store: Store, engine=None, *, clock: Callable[[], float] = time.time) -> None:
        self.task = task
        self.store = store
        self.engine = engine
        self._clock = clock
        self._lock = threading.Lock()
        self._context: OrderedDict[Any, pa.Table] = OrderedDict()
        self.records = 0
        self.rejected = 0

    def __call__(self, source: str, records: list[Mapping[str, Any]]) -> IngestResult:
        return self.ingest(source, records)

    def ingest(self, source: str, records: list[Mapping[str, Any]]) -> IngestResult:
        if not records:
            return IngestResult(0)
        try:
            rows = self.task.records_to_table(records)
        except HyprstreamError:
            with self._lock:
                self.rejected += len(records)
            raise
        with self._lock:  # one batch at a time: context rows and appends stay in order
            inputs = self._inputs(rows)
            self.store.append(self.task.table, rows)
            self.records += rows.num_rows
        engine = self.engine
        if engine is None or not engine.ready:
            return IngestResult(rows.num_rows)
        try:
            version, pred, score = engine.classify(inputs)
        except Exception as exc:  # the rows are stored: report them accepted, without predictions
            log.warning("inference on %d record(s) from %s failed: %s", rows.num_rows, source, exc)
            return IngestResult(rows.num_rows)
        now = pa.array(np.full(len(pred), int(self._clock() * 1000), np.int64)).cast(pa.timestamp("ms", tz="UTC"))
        n = len(pred)
        self.store.append(PREDICTIONS_TABLE, pa.Table.from_arrays(
            [now, pa.array([source] * n, pa.string()), pa.array([self.task.name] * n, pa.string()),
             pa.array(np.full(n, version, np.int64)), pa.array(pred), pa.array(score)],
            schema=PREDICTIONS_SCHEMA))
        return IngestResult(rows.num_rows, version, tuple(int(p) for p in pred), tuple(float(s) for s in score))

    def _inputs(self, rows: pa.Table) -> np.ndarray:
        """Model inputs of ``rows``; with context rows of their keys in front when the task needs them."""
        key, keep = self.task.context_key, self.task.context_rows
        if not key or keep <= 0:
            return self.task.features(rows)
        keys = rows.column(key).to_pylist()
        ctx = [self._context[k] for k in dict.fromkeys(keys) if k in self._context]
        full = pa.concat_tables([*ctx, rows]) if ctx else rows
        feats = self.task.features(full)[full.num_rows - rows.num_rows:]
        self._remember(full, keys)
        return feats

    def _remember(self, full: pa.Table, keys: list) -> None:
        key, keep, tcol = self.task.context_key, self.task.context_rows, self.task.time_column
        column = np.asarray(full.column(key).to_pylist(), dtype=object)
        times = full.column(tcol).cast(pa.int64()).to_numpy() if tcol else np.arange(full.num_rows)
        for k in dict.fromkeys(keys):
            idx = np.flatnonzero(column == k)
            idx = idx[np.argsort(times[idx], kind="stable")][-keep:]
            self._context[k] = full.take(pa.array(idx))
            self._context.move_to_end(k)
        while len(self._context) > MAX_CONTEXT_KEYS:
            self._context.popitem(last=False)

    def stats(self) -> tuple[int, int]:
        with self._lock:
            return self.records, self.rejected
