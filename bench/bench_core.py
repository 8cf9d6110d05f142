"""Core: pushing and committing a 10M-parameter delta against a bare Flight transfer plus fsync.

    python bench/bench_core.py            # 10M float32 parameters (40 MB delta), 7 timed rounds
    python bench/bench_core.py --quick    # 1M parameters, 2 rounds: a CI smoke run

Cases, timed in interleaved rounds in this one process (client and servers on loopback, in-process):

(a) **Hyprstream push**: ``CoreClient.push_delta`` of a delta touching every parameter (3 layer groups,
    4M + 4M + 2M float32) to a ``CoreFlightServer`` with an audit log and signed tokens, local
    storage, fsync on. Timed: the whole call, i.e. the Flight transfer, token check and rate limit,
    the delta's checks (schema, names, layers, shapes, dtypes, finiteness and L2 norm in one float64
    pass), the vector-clock decision and merge, the update hash (SHA-256), the new layer values, the
    durable commit (three layer files and the manifest: temp file, fsync, rename, directory fsync),
    the signed audit entry (fsync) and its head checkpoint, and the answer. Each round pushes from the
    current clocks (staleness 0, strong consistency), so every round commits a new version.
(b) **Bare Flight + fsync** (the baseline): a plain ``pyarrow.flight`` ``do_put`` of the same table to a
    minimal Flight server in the same process that reads it whole, writes it as one Arrow IPC file
    and fsyncs it (and the directory), then answers. No auth, no checks, no hashing.
(c) **Repository only** (for reading the figures): ``ModelRepository.push_delta`` called directly,
    with the same audit log settings: (a) minus Flight and auth.

Target: (a) / (b) <= 2 (issue 4). The script asserts before timing that a push lands exactly
(master + delta, bit for bit) and that the baseline file holds the sent bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Case, base_parser, emit, gbps, header, measure_interleaved, peak_rss_bytes  # noqa: E402

from hyprstream.core import signing, tokens  # noqa: E402
from hyprstream.core.audit import AuditLog  # noqa: E402
from hyprstream.core.auth import Authenticator, Role  # noqa: E402
from hyprstream.coreapi.client import CoreClient  # noqa: E402
from hyprstream.consistency import ConsistencyMode, ConsistencyPolicy  # noqa: E402
from hyprstream.durable import fsync_dir  # noqa: E402
from hyprstream.core.ratelimit import RateLimitPolicy  # noqa: E402
from hyprstream.core.repository import ModelRepository, ModelSettings  # noqa: E402
from hyprstream.core.server import CoreFlightServer  # noqa: E402
from hyprstream.core.storage import LocalStorage  # noqa: E402
from hyprstream.vector_clock import VectorClock  # noqa: E402
from hyprstream.store.layer_table import to_arrays, to_table  # noqa: E402

TARGET = 2.0


class BareServer(flight.FlightServerBase):
    """Receives a table, writes it as an Arrow IPC file, fsyncs: the disk's and the wire's cost alone."""

    def __init__(self, directory: Path) -> None:
        super().__init__("grpc://127.0.0.1:0")
        self.directory = directory
        self.n = 0

    def do_put(self, context, descriptor, reader, writer):
        table = reader.read_all()
        self.n += 1
        path = self.directory / f"put-{self.n % 2}.arrow"
        with open(path, "wb") as fh:
            with pa.ipc.new_file(fh, table.schema) as w:
                w.write_table(table)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(self.directory)
        writer.write(pa.py_buffer(json.dumps({"rows": table.num_rows}).encode()))


def bare_put(client: flight.FlightClient, table: pa.Table) -> dict:
    writer, reader = client.do_put(flight.FlightDescriptor.for_command(b"put"), table.schema)
    writer.write_table(table)
    writer.done_writing()
    buf = reader.read()
    writer.close()
    return json.loads(buf.to_pybytes())


def model(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = {"fc1.weight": (n * 2 // 5 // 1000, 1000), "fc2.weight": (n * 2 // 5 // 1000, 1000),
             "head.weight": (n // 5 // 1000, 1000)}
    return {name: rng.normal(0, 0.05, shape).astype(np.float32) for name, shape in sizes.items()}


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--params", type=int, default=None, help="parameters in the delta (default 10M, quick 1M)")
    args = p.parse_args(argv)
    n = args.params or (1_000_000 if args.quick else 10_000_000)
    repeats = args.repeats or (2 if args.quick else 7)
    header("Core: push + durable commit of a layer-wise delta vs bare Flight transfer + fsync")

    work = Path(tempfile.mkdtemp(prefix="bench-core-", dir=os.environ.get("BENCH_DIR")))
    audit_key, token_key = signing.generate_key(), signing.generate_key()
    w0 = model(n, 1)
    delta_arrays = {k: np.random.default_rng(2).normal(0, 1e-3, v.shape).astype(np.float32) for k, v in w0.items()}
    delta = to_table(delta_arrays)
    nbytes = sum(a.nbytes for a in delta_arrays.values())
    strong = ModelSettings(ConsistencyPolicy(ConsistencyMode.STRONG, max_staleness=0))
    servers: list[flight.FlightServerBase] = []
    logs: list[AuditLog] = []
    try:
        alog = AuditLog(work / "audit" / "audit.jsonl", audit_key)
        logs.append(alog)
        repo = ModelRepository(LocalStorage(work / "models"), audit=alog)
        core = CoreFlightServer(repo, Authenticator(None, [token_key.public_key()]),
                                rate_limit=RateLimitPolicy(requests_per_s=1000.0, burst=1000))
        servers.append(core)
        location = core.start_background()
        bare = BareServer(work / "bare")
        (work / "bare").mkdir()
        servers.append(bare)
        bare_location = f"grpc://127.0.0.1:{bare.port}"
        threading.Thread(target=bare.serve, daemon=True).start()

        now = time.time()
        admin = CoreClient(location, tokens.issue(token_key, "admin", Role.ADMIN, ttl_s=86400, now=now)[0])
        fog = CoreClient(location, tokens.issue(token_key, "fog-a", Role.FOG, ttl_s=86400, now=now)[0])
        admin.register_model("bench", to_table(w0), strong)
        repo.register("direct", to_table(w0), strong, actor="bench")
        bare_client = flight.FlightClient(bare_location)
        state = {"seq": 0, "clocks": dict(fog.head("bench")["clocks"]), "direct_seq": 0}

        def push_flight(_=None):
            state["seq"] += 1
            base = {layer: VectorClock.of(c) for layer, c in state["clocks"].items()}
            r = fog.push_delta("bench", delta, fog="fog-a", seq=state["seq"], base_clocks=base, participants=10)
            state["clocks"] = {layer: base[layer].increment("fog-a").as_dict() for layer in base}
            return r

        def push_direct(_=None):
            state["direct_seq"] += 1
            clocks = repo.head("direct")["clocks"]
            base = {layer: VectorClock.of(c) for layer, c in clocks.items()}
            return repo.push_delta("direct", delta, fog="fog-a", seq=state["direct_seq"], base_clocks=base,
                                   participants=10)

        # correctness before timing
        r = push_flight()
        assert r.version == 1 and r.staleness == {"fc1": 0, "fc2": 0, "head": 0} and r.weight == 1.0
        got = to_arrays(admin.get_weights("bench").table)
        for k in w0:
            np.testing.assert_array_equal(got[k], w0[k] + delta_arrays[k])
        assert bare_put(bare_client, delta) == {"rows": 3}
        with pa.memory_map(str(work / "bare" / "put-1.arrow")) as src:
            assert pa.ipc.open_file(src).read_all().equals(delta)
        assert np.isclose(r.update_norm, np.sqrt(sum(float(np.dot(d.ravel().astype(np.float64),
                                                                  d.ravel().astype(np.float64)))
                                                     for d in delta_arrays.values())), rtol=1e-9)

        cases = {
            "(b) bare Flight do_put + IPC write + fsync": Case(run=lambda _: bare_put(bare_client, delta)),
            "(a) Hyprstream push_delta (Flight, checks, clocks, commit, audit)": Case(run=push_flight),
            "(c) repository push_delta only (no Flight, no auth)": Case(run=push_direct),
        }
        t = measure_interleaved(cases, repeats=repeats, warmup=args.warmup)
        print(f"\n## push of a {n:,}-parameter float32 delta ({nbytes / 1e6:.0f} MB, 3 layer groups); "
              f"{repeats} timed rounds after {args.warmup} warm-up, interleaved")
        print(f"{'':66s} {'median s':>9s} {'min s':>9s} {'max s':>9s}  GB/s")
        for label, timing in t.items():
            print(f"{label:66s} {timing.median:9.4f} {timing.min:9.4f} {timing.max:9.4f}  "
                  f"{gbps(nbytes, timing.median):.3f}")
        a = t["(a) Hyprstream push_delta (Flight, checks, clocks, commit, audit)"]
        b = t["(b) bare Flight do_put + IPC write + fsync"]
        c = t["(c) repository push_delta only (no Flight, no auth)"]
        ratio = a.median / b.median
        print(f"\nHyprstream push / bare Flight + fsync: {ratio:.2f} (target <= {TARGET}: "
              f"{'met' if ratio <= TARGET else 'NOT met'})")
        print(f"repository only / bare Flight + fsync: {c.median / b.median:.2f}")
        versions = fog.head("bench")["version"]
        print(f"versions committed: {versions} (bench), {repo.head('direct')['version']} (direct); "
              f"audit entries: {alog.last_seq}")
        rss = peak_rss_bytes()
        print(f"peak RSS: {rss / 1e6:.0f} MB")
        emit({"params": n, "delta_bytes": nbytes, "repeats": repeats, "timings": t, "ratio": ratio,
              "ratio_repository_only": c.median / b.median, "target": TARGET, "met": ratio <= TARGET,
              "peak_rss_bytes": rss})
        fog.close()
        admin.close()
        bare_client.close()
    finally:
        for s in servers:
            s.shutdown()
        for lg in logs:
            lg.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
