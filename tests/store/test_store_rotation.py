"""Key rotation of an encrypted store: every record re-encrypted under the new key, the old key refused
afterwards, a wrong old key refused with nothing changed, and a rotation killed at any point losing nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from hyprstream.errors import StoreError
from hyprstream.store import Store, StoreConfig, generate_key

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("rotate_worker.py")
SCHEMA = pa.schema([("seq", pa.int64()), ("payload", pa.string())])
CONFIG = StoreConfig(segment_bytes=16_384, wal_max_bytes=65_536)
SECRET = "reading-of-patient-"


def rows(start: int, n: int) -> pa.Table:
    seq = np.arange(start, start + n, dtype=np.int64)
    return pa.table({"seq": seq, "payload": [f"{SECRET}{i}" for i in seq]}, schema=SCHEMA)


def fill(root: Path, key: bytes, n: int = 4000) -> int:
    """A store of ``n`` rows in many segments; returns the row count."""
    with Store.open(root, create=True, key=key, config=CONFIG) as s:
        s.create_table("t", SCHEMA)
        s.append("t", rows(0, n))
        return s.num_rows("t")


def check_all(root: Path, key: bytes, total: int) -> None:
    with Store.open(root, readonly=True, key=key) as r:
        seq = r.read("t").column("seq").to_numpy()
    assert np.array_equal(seq, np.arange(total)), "rows lost, duplicated or reordered"


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "LOCK"}


def test_records_written_before_rotation_read_back_with_the_new_key(tmp_path: Path) -> None:
    old, new = generate_key(), generate_key()
    root = tmp_path / "s"
    total = fill(root, old)
    with Store.open(root, key=old, config=CONFIG) as s:
        for i in range(30):
            s.append("t", rows(total + i, 1))
        total += 30
        assert s.info("t").buffered_rows == 30  # some rows are only in the write-ahead log
        s.rotate_key(new)
        s.append("t", rows(total, 5))  # the open store goes on, under the new key
        assert s.num_rows("t") == total + 5
    check_all(root, new, total + 5)
    data = b"".join(files(root).values())
    assert SECRET.encode() not in data
    with pytest.raises(StoreError, match="retired by a key rotation"):
        Store.open(root, key=old)
    with pytest.raises(StoreError, match="retired by a key rotation"):
        Store.open(root, readonly=True, key=old)
    with Store.open(root, key=new, config=CONFIG) as s, pytest.raises(StoreError, match="retired"):
        s.rotate_key(old)  # a retired key stays retired
    check_all(root, new, total + 5)


def test_rotation_refuses_bad_keys_and_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hyprstream.cli import main

    old, new, wrong = generate_key(), generate_key(), generate_key()
    root = tmp_path / "s"
    total = fill(root, old)
    for name, key in (("old", old), ("new", new), ("wrong", wrong)):
        (tmp_path / f"{name}.key").write_bytes(key)
    before = files(root)
    assert main(["store", "rotate-key", str(root), "--key-file", str(tmp_path / "wrong.key"),
                 "--new-key-file", str(tmp_path / "new.key")]) != 0
    assert "wrong encryption key" in capsys.readouterr().err
    assert main(["store", "rotate-key", str(root), "--key-file", str(tmp_path / "old.key"),
                 "--new-key-file", str(tmp_path / "old.key")]) != 0
    assert "new key is the store's current key" in capsys.readouterr().err
    assert files(root) == before
    check_all(root, old, total)
    assert main(["store", "rotate-key", str(root), "--key-file", str(tmp_path / "old.key"),
                 "--new-key-file", str(tmp_path / "new.key")]) == 0
    assert "re-encrypted" in capsys.readouterr().out
    check_all(root, new, total)
    with pytest.raises(StoreError, match="retired"):
        check_all(root, old, total)


def start(root: Path, old: bytes, new: bytes, *mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(WORKER), str(root), old.hex(), new.hex(), *mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def opens_with(root: Path, old: bytes, new: bytes) -> bytes:
    """The one key the store opens with now (as the writer, which finishes or rolls back a rotation)."""
    fits = []
    for key in (old, new):
        try:
            Store.open(root, key=key, config=CONFIG).close()
            fits.append(key)
        except StoreError:
            pass
    assert len(fits) == 1, "exactly one of the two keys opens the store"
    return fits[0]


@pytest.mark.slow
def test_rotation_killed_midway_loses_nothing(tmp_path: Path) -> None:
    old, new = generate_key(), generate_key()
    root = tmp_path / "s"
    total = fill(root, old, n=20_000)
    n_old = len(list((root / "segments").iterdir()))
    # killed right after the commit point: the next open finishes the rotation
    proc = start(root, old, new, "commit-then-die")
    assert proc.wait(60) == -signal.SIGKILL, proc.stderr.read()
    assert (root / "ROTATION").exists()
    with pytest.raises(StoreError, match="key rotation"):
        Store.open(root, readonly=True, key=new)  # a reader waits for the writer to finish it
    assert opens_with(root, old, new) == new and not (root / "ROTATION").exists()
    check_all(root, new, total)
    old, new = new, generate_key()
    # killed while segments are being re-encrypted (after 1, 1/2 and all of them are written)
    for wait_for in (1, n_old // 2, n_old):
        first_new = max(int(p.stem) for p in (root / "segments").iterdir() if p.suffix == ".arrow")
        proc = start(root, old, new)
        while proc.poll() is None:
            written = [p for p in (root / "segments").glob("*.arrow") if int(p.stem) > first_new]
            if len(written) >= wait_for:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
        proc.wait(60)
        key = opens_with(root, old, new)
        check_all(root, key, total)
        if key == new:
            old, new = new, generate_key()
    proc = start(root, old, new)
    assert proc.wait(120) == 0, proc.stderr.read()
    check_all(root, new, total)
