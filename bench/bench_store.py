"""Local store throughput: ingest, exact vector search and a rolling-window query, each against a baseline.

    python bench/bench_store.py            # 10M readings, 100k x 384 embeddings
    python bench/bench_store.py --quick    # small sizes: a CI smoke run

Three parts, each timed in interleaved rounds in this one process, the baseline measured alongside:

1. Ingest of scalar sensor readings (ts timestamp[ms], sensor int32, value float64: 20 bytes a row)
   into a fresh store, fsync on (the default): every append durable when it returns.
   (a) ``Store.append`` of 100k-row batches (b) of 1k-row batches, each a write-ahead-log record
   with its own fsync; baseline (c): the same rows written as one Arrow IPC file and fsynced, i.e.
   the disk's cost for the bytes without any store logic. Timed: the appends (a, b) or the write
   and fsync (c); creating the store directory and table is the untimed setup.
2. Exact top-10 search over 100k x 384 float32 embeddings kept in the store (memory-mapped
   segments). Baseline: a bare numpy matrix-vector product over the same matrix in memory,
   ``argpartition`` for the top 10 and a sort of those 10. Single queries: 20 per round, one at a
   time; batched: 1000 queries in one call (baseline: blocks of 256 queries, matrix-matrix
   product, argpartition per row). Store results checked equal to the baseline's before timing.
3. Rolling mean, standard deviation and count per sensor over a 1-hour window for every one of
   the 10M readings (100 sensors, one reading each per 10 s), sorted by sensor and time:
   ``timeseries.rolling_stats`` over the store vs the same query hand-written in plain DuckDB over
   an in-memory Arrow table of the same rows. Outputs checked equal before timing.

Memory: the readings as one in-memory Arrow table (200 MB) and again in the store (page cache, memory-
mapped), one query result at a time (about 0.5 GB); the embedding matrix (154 MB) in memory and in
the store; one block of at most 2**24 float32 scores (64 MB) in the search.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Case, Timing, base_parser, emit, header, measure_interleaved, peak_rss_bytes  # noqa: E402

from hyprstream.store import Store  # noqa: E402
from hyprstream.store import timeseries  # noqa: E402

READINGS = pa.schema([("ts", pa.timestamp("ms")), ("sensor", pa.int32()), ("value", pa.float64())])
SENSORS = 100
PERIOD_MS = 10_000
K = 10
BLOCK = 256


def build_readings(n: int, seed: int) -> pa.Table:
    """``n`` readings, time-ordered, ``SENSORS`` sensors each reading every ``PERIOD_MS``."""
    rng = np.random.default_rng(seed)
    steps = n // SENSORS
    ts = np.repeat(np.arange(steps, dtype=np.int64) * PERIOD_MS, SENSORS)
    sensor = np.tile(np.arange(SENSORS, dtype=np.int32), steps)
    value = 20 + 5 * np.sin(ts / 3.6e6) + rng.normal(0, 1, steps * SENSORS)
    return pa.table({"ts": pa.array(ts, pa.timestamp("ms")), "sensor": sensor, "value": value}, schema=READINGS)


def fresh_store(parent: Path, name: str, schema: pa.Schema) -> Store:
    path = parent / name
    shutil.rmtree(path, ignore_errors=True)
    store = Store.open(path, create=True)
    store.create_table("t", schema)
    return store


def ingest(store: Store, batches: list[pa.Table]) -> None:
    for b in batches:
        store.append("t", b)


def ipc_file_baseline(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def numpy_top_k(matrix: np.ndarray, q: np.ndarray) -> np.ndarray:
    scores = matrix @ q
    top = np.argpartition(scores, -K)[-K:]
    return top[np.argsort(-scores[top])]


def numpy_top_k_batch(matrix: np.ndarray, queries: np.ndarray) -> np.ndarray:
    out = np.empty((len(queries), K), np.int64)
    for i in range(0, len(queries), BLOCK):
        scores = queries[i : i + BLOCK] @ matrix.T
        top = np.argpartition(scores, -K, axis=1)[:, -K:]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[i : i + BLOCK] = np.take_along_axis(top, order, axis=1)
    return out


BASELINE_ROLLING_SQL = """
SELECT sensor, ts, value,
       avg(value) OVER w AS mean, stddev_samp(value) OVER w AS std, count(value) OVER w AS count
FROM readings
WINDOW w AS (PARTITION BY sensor ORDER BY ts RANGE BETWEEN INTERVAL 1 HOUR PRECEDING AND CURRENT ROW)
ORDER BY sensor, ts
"""


def duckdb_baseline(table: pa.Table) -> pa.Table:
    con = duckdb.connect(":memory:")
    try:
        con.register("readings", table)
        return con.sql(BASELINE_ROLLING_SQL).to_arrow_table()
    finally:
        con.close()


def line(label: str, t: Timing, rate: str) -> None:
    print(f"{label:52s} {t.median:9.4f} {t.min:9.4f}  {rate}")


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--readings", type=int, default=None, help="sensor readings for the rolling query")
    p.add_argument("--vectors", type=int, default=None, help="embeddings searched")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default=None, help="where the stores go (default: a temporary directory)")
    args = p.parse_args(argv)
    quick = args.quick
    n_read = args.readings or (200_000 if quick else 10_000_000)
    n_vec = args.vectors or (10_000 if quick else 100_000)
    n_ingest = 200_000 if quick else 2_000_000
    repeats = args.repeats or (3 if quick else 5)
    rolling_repeats = args.repeats or 3
    parent = Path(tempfile.mkdtemp(prefix="bench_store_", dir=args.dir))
    result: dict = {"readings": n_read, "vectors": n_vec, "dim": args.dim, "ingest_rows": n_ingest}
    header("Local store: ingest, vector search, rolling window")
    try:
        # ---------------------------------------------------------------- 1. ingest
        readings = build_readings(n_read, args.seed)
        rows = readings.slice(0, n_ingest)
        big = rows.to_batches(max_chunksize=100_000)
        small = rows.slice(0, n_ingest // 10).to_batches(max_chunksize=1_000)
        small_rows = sum(b.num_rows for b in small)
        cases = {
            "store 100k-row batches": Case(lambda s: ingest(s, big), lambda: fresh_store(parent, "big", READINGS)),
            "store 1k-row batches": Case(lambda s: ingest(s, small), lambda: fresh_store(parent, "small", READINGS)),
            "IPC file + fsync": Case(lambda path: ipc_file_baseline(path, rows), lambda: parent / "raw.arrow"),
        }
        with fresh_store(parent, "check", READINGS) as s:
            ingest(s, big)
            assert s.read("t").equals(rows.combine_chunks()), "store does not return what was ingested"
        t = measure_interleaved(cases, repeats=repeats, warmup=args.warmup)
        print(f"\n## 1. ingest ({n_ingest:,} readings, 20 B each; fsync on; {repeats} rounds)")
        print(f"{'':52s} {'median s':>9s} {'min s':>9s}  rows/s")
        rate = {name: (small_rows if "1k" in name else n_ingest) / t[name].median for name in cases}
        for name in cases:
            line(name, t[name], f"{rate[name] / 1e6:.2f} M")
        big_ratio = rate["store 100k-row batches"] / rate["IPC file + fsync"]
        print(f"ingest 100k-row batches: {rate['store 100k-row batches'] / 1e6:.2f} M rows/s "
              f"(target >= 2 M: {'met' if rate['store 100k-row batches'] >= 2e6 else 'NOT met'}); "
              f"store / IPC-file rate: {big_ratio:.2f}")
        result["ingest"] = {"timings": t, "rows_per_s": rate, "store_over_ipc": big_ratio}

        # ---------------------------------------------------------------- 2. vector search
        rng = np.random.default_rng(args.seed + 1)
        matrix = rng.standard_normal((n_vec, args.dim), dtype=np.float32)
        queries = rng.standard_normal((1000, args.dim), dtype=np.float32)
        emb_schema = pa.schema([("id", pa.int64()), ("emb", pa.list_(pa.float32(), args.dim))])
        vstore = fresh_store(parent, "vectors", emb_schema)
        for lo in range(0, n_vec, 10_000):
            part = matrix[lo : lo + 10_000]
            vstore.append("t", pa.table({"id": np.arange(lo, lo + len(part)),
                                         "emb": pa.FixedSizeListArray.from_arrays(part.reshape(-1), args.dim)},
                                        schema=emb_schema))
        vstore.flush()
        found = vstore.search("t", "emb", queries, k=K, metric="inner_product")
        got = found.column("row").to_numpy().reshape(-1, K)
        assert np.array_equal(got, numpy_top_k_batch(matrix, queries)), "store search != numpy top-k"
        assert np.array_equal(got[0], numpy_top_k(matrix, queries[0]))
        single = queries[:20]
        cases = {
            "numpy gemv + argpartition (baseline)": Case(lambda _: [numpy_top_k(matrix, q) for q in single]),
            "store.search inner product": Case(
                lambda _: [vstore.search("t", "emb", q, k=K, metric="inner_product") for q in single]),
            "store.search cosine": Case(lambda _: [vstore.search("t", "emb", q, k=K) for q in single]),
            "numpy batched (baseline), 1000 queries": Case(lambda _: numpy_top_k_batch(matrix, queries)),
            "store.search batched ip, 1000 queries": Case(
                lambda _: vstore.search("t", "emb", queries, k=K, metric="inner_product")),
            "store.search batched cosine, 1000 queries": Case(lambda _: vstore.search("t", "emb", queries, k=K)),
        }
        t = measure_interleaved(cases, repeats=repeats, warmup=args.warmup)
        print(f"\n## 2. exact top-{K} search, {n_vec:,} x {args.dim} float32 "
              f"({vstore.info('t').segments} segments; {repeats} rounds)")
        print(f"{'':52s} {'median s':>9s} {'min s':>9s}  per query / rate")
        for name in list(cases)[:3]:
            line(name + ", 20 queries", t[name], f"{t[name].median / 20 * 1e3:.2f} ms/query")
        for name in list(cases)[3:]:
            line(name, t[name], f"{1000 / t[name].median:,.0f} queries/s")
        base = t["numpy gemv + argpartition (baseline)"].median
        ip_ratio = t["store.search inner product"].median / base
        cos_ratio = t["store.search cosine"].median / base
        batched_qps = 1000 / t["store.search batched cosine, 1000 queries"].median
        batched_ip_qps = 1000 / t["store.search batched ip, 1000 queries"].median
        print(f"single query, store / numpy baseline: inner product {ip_ratio:.2f}x, cosine {cos_ratio:.2f}x "
              f"(target <= 1.5x: {'met' if max(ip_ratio, cos_ratio) <= 1.5 else 'NOT met'})")
        print(f"batched: cosine {batched_qps:,.0f} queries/s, inner product {batched_ip_qps:,.0f} queries/s "
              f"(target >= 1000: {'met' if min(batched_qps, batched_ip_qps) >= 1000 else 'NOT met'}); "
              f"numpy batched baseline {1000 / t['numpy batched (baseline), 1000 queries'].median:,.0f} queries/s")
        result["search"] = {"timings": t, "single_ratio_ip": ip_ratio, "single_ratio_cosine": cos_ratio,
                            "batched_qps_cosine": batched_qps, "batched_qps_ip": batched_ip_qps}
        vstore.close()
        del matrix, vstore

        # ---------------------------------------------------------------- 3. rolling window
        rstore = fresh_store(parent, "readings", READINGS)
        ingest(rstore, readings.to_batches(max_chunksize=100_000))
        rstore.flush()
        ours = timeseries.rolling_stats(rstore, "t", value="value", time="ts", key="sensor", window_s=3600)
        base_out = duckdb_baseline(readings)
        assert ours.num_rows == base_out.num_rows == n_read
        for col in ("sensor", "ts", "value", "count"):
            assert ours.column(col).equals(base_out.column(col)), f"column {col} differs"
        for col in ("mean", "std"):
            a = ours.column(col).to_numpy(zero_copy_only=False).astype(np.float64)
            b = base_out.column(col).to_numpy(zero_copy_only=False).astype(np.float64)
            assert np.allclose(a, b, rtol=1e-9, atol=1e-9, equal_nan=True), f"column {col} differs"
        del ours, base_out
        cases = {
            "plain DuckDB over in-memory Arrow (baseline)": Case(lambda _: duckdb_baseline(readings)),
            "timeseries.rolling_stats over the store": Case(
                lambda _: timeseries.rolling_stats(rstore, "t", value="value", time="ts", key="sensor",
                                                   window_s=3600)),
        }
        t = measure_interleaved(cases, repeats=rolling_repeats, warmup=args.warmup)
        print(f"\n## 3. 1-hour rolling mean/std/count per sensor, {n_read:,} readings "
              f"({rstore.info('t').segments} segments; {rolling_repeats} rounds)")
        print(f"{'':52s} {'median s':>9s} {'min s':>9s}  readings/s")
        for name in cases:
            line(name, t[name], f"{n_read / t[name].median / 1e6:.2f} M")
        ratio = t["timeseries.rolling_stats over the store"].median / t[
            "plain DuckDB over in-memory Arrow (baseline)"].median
        print(f"store / plain DuckDB: {ratio:.2f} (target <= 1.5: {'met' if ratio <= 1.5 else 'NOT met'})")
        result["rolling"] = {"timings": t, "ratio": ratio}
        rstore.close()
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    rss = peak_rss_bytes()
    print(f"\npeak RSS: {rss / 1e6:.0f} MB")
    result["peak_rss_bytes"] = rss
    emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
