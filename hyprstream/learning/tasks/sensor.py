"""Sensor anomaly detection on humidity/temperature motes (the single-hop sensor network data set of
Suthaharan et al. 2010: four motes, labelled anomalies; data CC BY 4.0).

Each reading is classified normal (0) or anomalous (1) by a small MLP over four features that say how
far the reading is from its own mote's recent normal (:func:`window_features`): the robust z-scores
of humidity and temperature against the median and MAD of the mote's last :data:`WINDOW` readings,
and the size of the change since the mote's previous reading. Being relative to each mote, the same
model serves an indoor mote (humidity within a few points) and an outdoor one (swinging by 20).
The window needs the mote's earlier readings, so the task declares ``context_key = "mote_id"`` and
``context_rows = WINDOW - 1``: the agent keeps them and passes them in front of new readings.
Anomalies are rare (under 1 % of the readings), so the loss weights the anomalous class up.
One reading enters up to :data:`WINDOW` training examples (its own and, through the window and the
change feature, the next ``WINDOW - 1`` of its mote): DP-SGD accounts a reading as that group
(``examples_per_record``; docs/privacy.md, "The unit of privacy").

Ingested records: ``{"mote_id": int, "timestamp": seconds since the epoch, "humidity": %,
"temperature": C, "label": 0/1 (optional)}``. Store rows hold the raw readings; rows made from
ready features (:meth:`SensorAnomalyTask.to_table`, the simulator's partitions) carry them in the
``features`` column instead. The reference data come from ``hyprstream.data.sensors.load_motes()``
(a table with ``mote_id``, ``timestamp``, ``humidity``, ``temperature`` and ``label``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hyprstream.learning.task import UNLABELLED, Dataset, Task, register, seeded
from hyprstream.learning.tasks._records import integer, label_column, number
from hyprstream.errors import HyprstreamError, ValidationError

N_FEATURES = 4
N_CLASSES = 2
WINDOW = 256  # readings of a mote's recent history (the current one included) that define its normal
ANOMALY_WEIGHT = 20.0  # weight of the anomalous class in the loss (~1 anomaly per 125 readings)
_FLOOR = (0.5, 0.2)  # smallest robust spread of humidity (%RH) and temperature (C): sensor resolution
_STEP = (5.0, 2.0)  # scale of a reading-to-reading change of humidity and temperature
_Z_MAX = 20.0
_CHUNK = 4096


def _rolling(values: np.ndarray, window: int, floor: float, step: float) -> tuple[np.ndarray, np.ndarray]:
    """|robust z| of each value against the last ``window`` values (itself included), and |change| / step."""
    from numpy.lib.stride_tricks import sliding_window_view

    n = len(values)
    z = np.empty(n)
    padded = np.concatenate([np.full(window - 1, np.nan), values])
    for start in range(0, n, _CHUNK):  # bounded memory: CHUNK x window at a time
        stop = min(n, start + _CHUNK)
        win = sliding_window_view(padded[start:stop + window - 1], window)
        med = np.nanmedian(win, axis=1)
        mad = np.nanmedian(np.abs(win - med[:, None]), axis=1)
        z[start:stop] = (values[start:stop] - med) / np.maximum(1.4826 * mad, floor)
    change = np.abs(np.diff(values, prepend=values[:1])) / step
    return np.minimum(np.abs(z), _Z_MAX), change


def window_features(mote: np.ndarray, time: np.ndarray, humidity: np.ndarray, temperature: np.ndarray,
                    *, window: int = WINDOW) -> np.ndarray:
    """The four features of each reading, in input order (pure function).

    For each reading, with the readings of the same mote ordered by time: ``|h - median| / max(1.4826
    MAD, 0.5)`` and ``|t - median| / max(1.4826 MAD, 0.2)`` over the mote's last ``window`` readings
    (itself included; capped at 20), then ``|dh| / 5`` and ``|dt| / 2``, the change since the mote's
    previous reading (0 for its first).
    """
    n = len(mote)
    out = np.zeros((n, N_FEATURES), np.float32)
    if n == 0:
        return out
    order = np.lexsort((np.arange(n), time, mote))  # by mote, then time, then input order
    sorted_motes = mote[order]
    bounds = np.flatnonzero(np.diff(sorted_motes)) + 1
    for rows in np.split(order, bounds):
        h = humidity[rows].astype(np.float64)
        t = temperature[rows].astype(np.float64)
        zh, dh = _rolling(h, window, _FLOOR[0], _STEP[0])
        zt, dt = _rolling(t, window, _FLOOR[1], _STEP[1])
        out[rows] = np.stack([zh, zt, dh, dt], axis=1)
    return out


@register("sensor")
class SensorAnomalyTask(Task):
    n_classes = N_CLASSES
    schema = pa.schema([
        pa.field("mote_id", pa.int32(), nullable=False),
        pa.field("timestamp", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("humidity", pa.float32(), nullable=False),
        pa.field("temperature", pa.float32(), nullable=False),
        pa.field("features", pa.list_(pa.float32(), N_FEATURES), nullable=True),
        pa.field("label", pa.int32(), nullable=False),
    ])
    time_column = "timestamp"
    context_key = "mote_id"
    context_rows = WINDOW - 1
    class_weights = (1.0, ANOMALY_WEIGHT)
    examples_per_record = WINDOW  # a reading enters its own example and the window of the next WINDOW - 1

    @property
    def privacy_unit(self) -> str:
        return f"reading (group of {WINDOW} examples)"

    def build_model(self, seed: int):
        import torch
        from torch import nn

        class SensorMLP(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc1 = nn.Linear(N_FEATURES, 32)
                self.fc2 = nn.Linear(32, 16)
                self.head = nn.Linear(16, N_CLASSES)

            def forward(self, x):
                x = torch.relu(self.fc1(x))
                x = torch.relu(self.fc2(x))
                return self.head(x)

        return seeded(seed, SensorMLP)

    def load_reference_data(self, seed: int) -> tuple[Dataset, Dataset]:
        try:
            from hyprstream.data.sensors import load_motes
        except ImportError:
            raise HyprstreamError("the sensor task's reference data need hyprstream.data.sensors.load_motes "
                                  "(the four-motes data set), which this installation lacks") from None
        table = self.normalise(load_motes())
        data = self.from_table(table)  # features over each mote's whole history, then the split
        # hold out contiguous blocks of 50 readings (a random quarter), not single readings: neighbours
        # of a test reading would otherwise sit in the training set
        rng = np.random.default_rng(seed)
        block = np.arange(len(data)) // 50
        is_test = (rng.random(block.max() + 1) < 0.25)[block]
        return Dataset(data.x[~is_test], data.y[~is_test]), Dataset(data.x[is_test], data.y[is_test])

    def normalise(self, table: pa.Table) -> pa.Table:
        """``table`` with exactly this task's schema (casts numeric types; seconds -> timestamps)."""
        missing = [f.name for f in self.schema if f.name != "features" and f.name not in table.column_names]
        if missing:
            raise ValidationError(f"sensor data lack column(s) {missing}")
        cols = []
        for f in self.schema:
            if f.name == "features":
                cols.append(pa.nulls(table.num_rows, f.type))
                continue
            col = table.column(f.name)
            if f.name == "timestamp" and not pa.types.is_timestamp(col.type):
                col = pc.cast(pc.multiply(pc.cast(col, pa.float64()), 1000.0), pa.int64()).cast(f.type)
            elif f.name == "label":
                col = pc.fill_null(col, UNLABELLED)
            cols.append(pc.cast(col, f.type))
        return pa.Table.from_arrays(cols, schema=self.schema)

    def to_table(self, data: Dataset) -> pa.Table:
        """Rows carrying ready features (no raw reading: mote -1, time 0, NaN humidity/temperature)."""
        x = np.ascontiguousarray(data.x, dtype=np.float32)
        n = len(x)
        return pa.Table.from_arrays(
            [pa.array(np.full(n, -1, np.int32)), pa.array(np.zeros(n, np.int64)).cast(pa.timestamp("ms", tz="UTC")),
             pa.array(np.full(n, np.nan, np.float32)), pa.array(np.full(n, np.nan, np.float32)),
             pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), N_FEATURES),
             pa.array(np.asarray(data.y).astype(np.int32))], schema=self.schema)

    def _check(self, table: pa.Table) -> pa.Table:
        if not table.schema.equals(self.schema, check_metadata=False):
            raise ValidationError(f"sensor data must have schema {self.schema}, got {table.schema}")
        return table

    def features(self, table: pa.Table) -> np.ndarray:
        table = self._check(table).combine_chunks()
        given = table.column("features")
        raw = np.asarray(given.is_null().to_numpy(zero_copy_only=False))
        out = np.zeros((table.num_rows, N_FEATURES), np.float32)
        if (~raw).any():
            ready = given.filter(pa.array(~raw)).combine_chunks()
            out[~raw] = ready.flatten().to_numpy(zero_copy_only=False).reshape(-1, N_FEATURES)
        if raw.any():
            readings = table.filter(pa.array(raw))
            out[raw] = window_features(
                readings.column("mote_id").to_numpy(), readings.column("timestamp").cast(pa.int64()).to_numpy(),
                readings.column("humidity").to_numpy(), readings.column("temperature").to_numpy())
        return out

    def records_to_table(self, records: Sequence[Mapping[str, Any]]) -> pa.Table:
        motes = [integer(r, i, "mote_id") for i, r in enumerate(records)]
        ts = [round(number(r, i, "timestamp", lo=0.0) * 1000) for i, r in enumerate(records)]
        hum = [number(r, i, "humidity", lo=0.0, hi=100.0) for i, r in enumerate(records)]
        tmp = [number(r, i, "temperature", lo=-80.0, hi=150.0) for i, r in enumerate(records)]
        labels = label_column(records, N_CLASSES)
        return pa.Table.from_arrays(
            [pa.array(motes, pa.int32()), pa.array(ts, pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
             pa.array(hum, pa.float32()), pa.array(tmp, pa.float32()), pa.nulls(len(records), self.schema.field(
                 "features").type), pa.array(labels.astype(np.int32))],
            schema=self.schema)

    def example_input(self, batch: int, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return np.abs(rng.standard_normal((batch, N_FEATURES)) * [1.5, 1.5, 0.2, 0.2]).astype(np.float32)
