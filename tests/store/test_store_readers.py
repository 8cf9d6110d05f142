"""Readers combine a manifest with the log consistently, even when the writer commits in between."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from hyprstream.store import Store, StoreConfig
from hyprstream.store import manifest as manifests
from hyprstream.store import store as store_module
from hyprstream.store.store import _follows
from hyprstream.store.wal import WalEntry

SCHEMA = pa.schema([("x", pa.int64())])
EMPTY = pa.table({"x": pa.array([], pa.int64())})


def entries(*seqs: int) -> list[WalEntry]:
    return [WalEntry(seq=s, table="t", rows=EMPTY) for s in seqs]


@pytest.mark.unit
def test_follows_accepts_known_and_consecutive_records_only() -> None:
    assert _follows(entries(), 5)
    assert _follows(entries(3, 4, 6, 7), 5)
    assert _follows(entries(6, 7, 8), 5)
    assert not _follows(entries(6, 8), 5)
    assert not _follows(entries(7), 5)


@pytest.mark.integration
def test_reader_with_a_stale_manifest_retries_instead_of_missing_a_direct_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = StoreConfig(segment_bytes=1000)
    writer = Store.open(tmp_path / "s", create=True, config=cfg)
    writer.create_table("t", SCHEMA)
    writer.append("t", pa.table({"x": [0, 1]}))                     # log
    reader = Store.open(tmp_path / "s", readonly=True, config=cfg)
    assert reader.read("t").column("x").to_pylist() == [0, 1]
    stale = manifests.load(writer.root)
    writer.append("t", pa.table({"x": list(range(2, 202))}))        # straight to a segment
    writer.append("t", pa.table({"x": [202]}))                      # log again
    loads = []
    real_load = manifests.load

    def load_stale_once(root: Path) -> manifests.Manifest:
        loads.append(root)
        return stale if len(loads) == 1 else real_load(root)

    monkeypatch.setattr(store_module.manifests, "load", load_stale_once)
    assert reader.read("t").column("x").to_pylist() == list(range(203))
    assert len(loads) >= 2
    writer.close()
    reader.close()
