"""Fog aggregation throughput: Hyprstream's weighted mean against Flower's FedAvg and a plain copy.

    python bench/bench_aggregation.py            # K = 100 client deltas of 1M float32 (400 MB)
    python bench/bench_aggregation.py --quick    # small sizes: a CI smoke run
    python bench/bench_aggregation.py -K 50 -n 4000000 --repeats 7

On the same K deltas (one float32 parameter of n values per client, integer example counts as
weights), timed in interleaved rounds in this one process:

(a) Hyprstream, the fog's weighted-mean path: a fresh ``UpdateSum`` per round, ``add`` of every
    delta (names, shape, finiteness, norm bound checked; then added to the running weighted sum, one
    BLAS axpy), then ``mean()``. Ingest and aggregate are timed separately; total = ingest +
    aggregate of the same round.
(a') the same, fed from the very RecordDicts of (b): each delta is a zero-copy ``np.frombuffer``
    view of the ``.npy`` bytes in the ``Array`` (header parsed in the timed region), so (a') and (b)
    start from identical inputs; (a) starts from decoded numpy arrays, as (b') does.
(b) Flower 1.42 FedAvg: ``aggregate_arrayrecords(records, "num-examples")`` over the K
    ``RecordDict``\\ s that FedAvg.aggregate_train hands it (an ``ArrayRecord`` with the delta, a
    ``MetricRecord`` with the weight). Building the records is not timed; decoding the arrays
    (``Array.numpy()``) happens inside Flower's function, so it is timed.
(b') for reference, Flower's loop body over the already-decoded arrays (the inputs (a) gets):
    separates Flower's decoding cost from its arithmetic. Not Flower's API.
(c) Memory-bandwidth bound: ``np.copyto`` of the whole K*n float32 buffer into another
    preallocated (and already faulted-in) one.
(d) for reference, the robust rules' path: a fresh ``UpdateMatrix`` per round (every delta checked
    and copied into its row of a (K, n) matrix), then ``mean()`` (one gemv).

Bandwidth: GB/s = delta bytes (K * n * 4) / seconds for (a), (a'), (b), (b'), i.e. the bytes of input
each one reads; for (c) bytes copied (K * n * 4) / seconds. The two are directly comparable: a
memory-bound pass that reads the deltas once (a gemv) can beat the copy, which also writes them.

Memory: the deltas (one K*n buffer, the inputs of (a) are row views of it), Flower's serialized
records (a second copy) and a third K*n buffer alive one case at a time (the copy's destination,
or the UpdateMatrix rows of (d)): about 3 * K * n * 4 bytes at peak, plus Flower's per-record
temporaries. (a) itself holds one n-value sum.
"""

from __future__ import annotations

import io
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Case, base_parser, emit, gbps, header, measure_interleaved, peak_rss_bytes  # noqa: E402

from hyprstream.fog.aggregate import UpdateMatrix, UpdateSum  # noqa: E402

WEIGHT_KEY = "num-examples"  # FedAvg's default weighted_by_key
PARAM = "w"


def build_inputs(k: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    deltas = rng.standard_normal((k, n), dtype=np.float32)
    deltas *= np.float32(1e-2)  # the scale of a round's weight delta
    weights = rng.integers(50, 5000, size=k)  # examples seen by each client this round
    return deltas, weights


def build_flower_records(deltas: np.ndarray, weights: np.ndarray) -> list:
    """The reply contents FedAvg.aggregate_train passes to aggregate_arrayrecords (flwr 1.42)."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    return [
        RecordDict({"arrays": ArrayRecord({PARAM: Array(d)}), "metrics": MetricRecord({WEIGHT_KEY: int(w)})})
        for d, w in zip(deltas, weights, strict=True)
    ]


def npy_view(array) -> np.ndarray:
    """Zero-copy, read-only view of a flwr ``Array``'s ``.npy`` bytes (what ``Array.numpy()`` copies)."""
    fmt = np.lib.format
    buf = io.BytesIO(array.data)  # shares the bytes in CPython; only the header is read
    version = fmt.read_magic(buf)
    read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran_order, dtype = read_header(buf)
    flat = np.frombuffer(array.data, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)), offset=buf.tell())
    return flat.reshape(shape, order="F" if fortran_order else "C")


def flower_loop_decoded(arrays: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """The body of flwr's aggregate_arrayrecords, fed decoded numpy arrays instead of records."""
    total = sum(int(w) for w in weights)
    acc = None
    for a, w in zip(arrays, weights, strict=True):
        if acc is None:
            acc = a * (int(w) / total)
        else:
            acc += a * (int(w) / total)
    return acc


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("-K", "--clients", type=int, default=None, help="client deltas (default 100; --quick 8)")
    p.add_argument("-n", "--size", type=int, default=None, help="float32 values per delta (default 1M; --quick 64Ki)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    k = args.clients or (8 if args.quick else 100)
    n = args.size or (1 << 16 if args.quick else 1_000_000)
    repeats = args.repeats or (3 if args.quick else 7)

    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    header("Fog aggregation throughput")
    nbytes = k * n * 4
    print(f"inputs:  K={k} deltas x n={n} float32 = {nbytes / 1e6:.1f} MB; {args.warmup} warm-up + {repeats} timed rounds")

    deltas, weights = build_inputs(k, n, args.seed)
    rows = list(deltas)  # K row views: the arrays a fog node holds once the replies are decoded
    records = build_flower_records(deltas, weights)
    shapes = {PARAM: (n,)}
    # A clipping bound that every honest delta passes: the check runs, nothing is refused.
    max_norm = 10.0 * float(np.sqrt(n)) * 1e-2

    def hyprstream_round(kind=UpdateSum) -> tuple[dict[str, np.ndarray], float, float]:
        t0 = time.perf_counter()
        um = kind(shapes, capacity=k)  # fresh per round, as FogAggregator.finish_round does
        for row, w in zip(rows, weights, strict=True):
            um.add({PARAM: row}, float(w), max_norm=max_norm)
        t1 = time.perf_counter()
        out = um.mean()
        t2 = time.perf_counter()
        return out, t1 - t0, t2 - t1

    def hyprstream_from_records() -> dict[str, np.ndarray]:
        um = UpdateSum(shapes, capacity=k)
        for rec in records:
            arrays = next(iter(rec.array_records.values()))
            weight = next(iter(rec.metric_records.values()))[WEIGHT_KEY]
            um.add({name: npy_view(a) for name, a in arrays.items()}, float(weight), max_norm=max_norm)
        return um.mean()

    # Correctness first (untimed): Hyprstream's mean against Flower's FedAvg result.
    ours = hyprstream_round()[0][PARAM]
    theirs = aggregate_arrayrecords(records, WEIGHT_KEY)[PARAM].numpy()
    assert ours.dtype == theirs.dtype == np.float32 and ours.shape == theirs.shape
    # Both sum K float32 terms |c_k x_k| <= max|x|: each is within ~K * eps32 * max|x| of the exact mean.
    atol = 2 * k * float(np.finfo(np.float32).eps) * float(np.abs(deltas).max())
    max_diff = float(np.abs(ours.astype(np.float64) - theirs).max())
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=atol)
    np.testing.assert_allclose(hyprstream_from_records()[PARAM], ours, rtol=0, atol=0)
    np.testing.assert_allclose(hyprstream_round(UpdateMatrix)[0][PARAM], theirs, rtol=0, atol=atol)
    np.testing.assert_allclose(flower_loop_decoded(rows, weights), theirs, rtol=0, atol=atol)
    print(f"check:   Hyprstream mean == Flower FedAvg within float32 tolerance "
          f"(max |diff| {max_diff:.2e} <= atol {atol:.2e})")
    del ours, theirs

    split: dict[str, list[float]] = {"ingest": [], "aggregate": []}

    def run_hyprstream(_state: None) -> None:
        _, t_ingest, t_mean = hyprstream_round()
        split["ingest"].append(t_ingest)
        split["aggregate"].append(t_mean)

    def fresh_destination() -> np.ndarray:
        dst = np.empty_like(deltas)
        dst.fill(0)  # fault the pages in outside the timing: the copy is into a preallocated buffer
        return dst

    cases = {
        "copy": Case(run=lambda dst: np.copyto(dst, deltas), setup=fresh_destination),
        "hyprstream": Case(run=run_hyprstream),
        "hyprstream_records": Case(run=lambda _s: hyprstream_from_records()),
        "flower": Case(run=lambda _s: aggregate_arrayrecords(records, WEIGHT_KEY)),
        "flower_decoded": Case(run=lambda _s: flower_loop_decoded(rows, weights)),
        "rows": Case(run=lambda _s: hyprstream_round(UpdateMatrix)),
    }
    t = measure_interleaved(cases, repeats=repeats, warmup=args.warmup)
    ingest = np.median(split["ingest"][args.warmup:])
    aggregate = np.median(split["aggregate"][args.warmup:])
    total = t["hyprstream"].median  # median over rounds of (ingest + aggregate) of the same round
    copy, flower, flower_dec = t["copy"].median, t["flower"].median, t["flower_decoded"].median
    from_records = t["hyprstream_records"].median

    print()
    print(f"{'':36s} {'median s':>9s} {'min s':>9s} {'GB/s':>7s}")

    def line(label: str, med: float, lo: float | None) -> None:
        lo_s = f"{lo:9.4f}" if lo is not None else f"{'':9s}"
        print(f"{label:36s} {med:9.4f} {lo_s} {gbps(nbytes, med):7.2f}")

    line("(c) copy K*n float32 (bound)", copy, t["copy"].min)
    line("(a) Hyprstream ingest (add x K)", ingest, min(split["ingest"][args.warmup:]))
    line("(a) Hyprstream mean (scales the sum)", aggregate, min(split["aggregate"][args.warmup:]))
    line("(a) Hyprstream total", total, t["hyprstream"].min)
    line("(a') Hyprstream total, from records", from_records, t["hyprstream_records"].min)
    line("(b) Flower aggregate_arrayrecords", flower, t["flower"].min)
    line("(b') Flower loop, decoded arrays", flower_dec, t["flower_decoded"].min)
    line("(d) rows (UpdateMatrix) total", t["rows"].median, t["rows"].min)
    print()
    print("GB/s = delta bytes (K*n*4) read / s for (a), (a'), (b), (b'); bytes copied (K*n*4) / s for (c)")
    ratio_total, speedup = copy / total, flower / total

    def verdict(ok: bool) -> str:
        return "meets target" if ok else "BELOW target"

    print(f"ratio Hyprstream total (ingest+mean) bandwidth / copy bandwidth: {ratio_total:5.2f}  "
          f"(target >= 0.5: {verdict(ratio_total >= 0.5)})")
    print(f"speedup Hyprstream total vs Flower aggregate_arrayrecords: {speedup:5.2f}x  "
          f"(target > 1: {verdict(speedup > 1)})")
    print(f"speedup, same RecordDicts as input (a') vs (b): {flower / from_records:5.2f}x  "
          f"(target >= 1.5: {verdict(flower / from_records >= 1.5)})")
    print(f"speedup, running sum (a) vs rows (d): {t['rows'].median / total:5.2f}x")
    print(f"(for reference, (a) vs Flower's loop on decoded arrays (b'): {flower_dec / total:5.2f}x)")
    rss = peak_rss_bytes()
    print(f"peak RSS: {rss / 1e6:.0f} MB (deltas + Flower records + one K*n buffer = {3 * nbytes / 1e6:.0f} MB of arrays)")

    emit({
        "benchmark": "fog_aggregation",
        "k": k, "n": n, "bytes": nbytes, "repeats": repeats, "warmup": args.warmup,
        "seconds": {
            "copy": t["copy"], "hyprstream_total": t["hyprstream"], "hyprstream_from_records": t["hyprstream_records"],
            "hyprstream_ingest_median_s": ingest, "hyprstream_aggregate_median_s": aggregate,
            "flower": t["flower"], "flower_decoded": t["flower_decoded"], "rows": t["rows"],
        },
        "gbps": {
            "copy": gbps(nbytes, copy), "hyprstream_ingest": gbps(nbytes, ingest),
            "hyprstream_aggregate": gbps(nbytes, aggregate), "hyprstream_total": gbps(nbytes, total),
            "hyprstream_from_records": gbps(nbytes, from_records),
            "flower": gbps(nbytes, flower), "flower_decoded": gbps(nbytes, flower_dec),
        },
        "ratio_total_to_copy": ratio_total,
        "speedup_vs_flower": speedup, "speedup_vs_flower_same_records": flower / from_records, "max_abs_diff_vs_flower": max_diff, "peak_rss_bytes": rss,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
