"""Acceptance tests with real processes: SIGKILLed writers, concurrent readers, the writer lock."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from hyprstream.errors import StoreError
from hyprstream.store import Store

pytestmark = pytest.mark.integration

WRITER = Path(__file__).with_name("crash_writer.py")


def start_writer(root: Path, seed: int, appends: int | None = None) -> subprocess.Popen[str]:
    args = [sys.executable, str(WRITER), str(root), str(seed)] + ([str(appends)] if appends else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_contiguous(store: Store, acked: int) -> int:
    table = store.read("t")
    seq = table.column("seq").to_numpy()
    assert np.array_equal(seq, np.arange(len(seq))), "rows lost, duplicated or reordered"
    assert len(seq) >= acked, f"{acked} rows acknowledged but only {len(seq)} present"
    assert table.column("payload").equals(table.column("seq").cast(pa.string()))
    return len(seq)


@pytest.mark.slow
def test_sigkilled_writer_never_loses_acknowledged_rows(tmp_path: Path) -> None:
    root = tmp_path / "s"
    rnd = random.Random(20240607)
    acked = 0
    for run in range(20):
        proc = start_writer(root, seed=run)
        if run % 5 == 4:
            time.sleep(rnd.uniform(0.0, 1.0))  # may land in start-up and recovery
        else:
            first = proc.stdout.readline()
            assert first, f"writer exited early: {proc.stderr.read()}"
            acked = max(acked, int(first))
            time.sleep(rnd.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, f"writer failed by itself: {err}"
        acked = max([acked, *(int(line) for line in out.split())])
        with Store.open(root, readonly=True) as reader:
            check_contiguous(reader, acked)
    with Store.open(root) as store:
        total = check_contiguous(store, acked)
    assert acked > 0 and total >= acked


def test_reader_process_sees_every_acknowledged_row_while_writer_runs(tmp_path: Path) -> None:
    root = tmp_path / "s"
    proc = start_writer(root, seed=1, appends=300)
    reader = None
    try:
        for line in proc.stdout:
            acked = int(line)
            if reader is None:
                reader = Store.open(root, readonly=True)
            check_contiguous(reader, acked)
        assert proc.wait() == 0, proc.stderr.read()
        check_contiguous(reader, acked)
        with Store.open(root, readonly=True) as fresh:
            assert fresh.num_rows("t") == acked
    finally:
        proc.kill()
        proc.wait()
        if reader is not None:
            reader.close()


def test_second_writer_process_is_refused_naming_the_holder(tmp_path: Path) -> None:
    root = tmp_path / "s"
    proc = start_writer(root, seed=2)
    try:
        assert proc.stdout.readline(), proc.stderr.read()
        with pytest.raises(StoreError, match=f"another process \\(pid {proc.pid}\\)"):
            Store.open(root)
        with Store.open(root, readonly=True) as reader:
            assert reader.num_rows("t") > 0
    finally:
        proc.kill()
        proc.wait()
    with Store.open(root) as store:  # the lock died with the holder
        assert os.getpid() == int((root / "LOCK").read_text())
        assert store.num_rows("t") > 0
