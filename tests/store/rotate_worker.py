"""Rotates the key of a store, run as its own process and killed with SIGKILL by the rotation tests.

Usage: ``python rotate_worker.py ROOT OLD_KEY_HEX NEW_KEY_HEX [commit-then-die]``. With
``commit-then-die`` it stops dead (SIGKILL to itself) right after the rotation's commit point, before
anything is installed, so the next open must finish the rotation.
"""

from __future__ import annotations

import os
import signal
import sys

from hyprstream.store import Store, StoreConfig

CONFIG = StoreConfig(segment_bytes=16_384, wal_max_bytes=65_536)


def main(root: str, old: bytes, new: bytes, mode: str) -> None:
    store = Store.open(root, key=old, config=CONFIG)
    if mode == "commit-then-die":
        store._prepare_rotation(new)
        os.kill(os.getpid(), signal.SIGKILL)
    store.rotate_key(new)
    store.close()
    print("rotated", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "")
