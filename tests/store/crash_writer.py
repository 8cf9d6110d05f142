"""A store writer for the crash tests, run as its own process and killed with SIGKILL.

Usage: ``python crash_writer.py ROOT SEED [APPENDS]``. It continues the sequence already in the
store and prints the number of rows acknowledged after every append returns; with ``APPENDS`` it
stops after that many appends, otherwise it runs until killed.
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa

from hyprstream.store import Store, StoreConfig

SCHEMA = pa.schema([("seq", pa.int64()), ("payload", pa.string())])
# Small segments and log so that a run crosses every path: log appends, segment writes,
# direct-to-segment large appends, checkpoints and compactions.
CONFIG = StoreConfig(segment_bytes=16_384, wal_max_bytes=65_536)
SIZES = np.array([1, 7, 50, 400, 2000])


def main(root: str, seed: int, appends: int | None) -> None:
    rng = np.random.default_rng(seed)
    with Store.open(root, create=True, config=CONFIG) as store:
        store.create_table("t", SCHEMA)
        n = store.num_rows("t")
        done = 0
        while appends is None or done < appends:
            size = int(rng.choice(SIZES))
            seq = pa.array(np.arange(n, n + size, dtype=np.int64))
            store.append("t", pa.table({"seq": seq, "payload": seq.cast(pa.string())}, schema=SCHEMA))
            n += size
            print(n, flush=True)
            done += 1
            if rng.random() < 0.03:
                store.compact("t")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
