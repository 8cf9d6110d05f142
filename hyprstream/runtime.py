"""What Hyprstream's long-running processes share: one log line format, finding Flower's commands,
and stopping a child process."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

from hyprstream.errors import HyprstreamError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def executable(name: str) -> str:
    """A Flower command: beside this Python (its virtual environment) first, then on PATH."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.is_file() else shutil.which(name)
    if path is None:
        raise HyprstreamError(f"{name!r} not found on PATH (it comes with flwr, a dependency of hyprstream)")
    return path


def stop_process(proc: subprocess.Popen | None, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``; by PID, the process we started."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)
