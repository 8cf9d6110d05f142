"""What Hyprstream's long-running processes share: one log line format, finding Flower's commands,
and stopping a child process."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from hyprstream.errors import HyprstreamError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMAT_ENV = "HYPRSTREAM_LOG_FORMAT"  # "text" (default) or "json"; child processes inherit it
# fields a log call may attach (``extra=``) so that one update can be followed across tiers
LOG_FIELDS = ("fog", "round", "model", "model_version", "device", "seq", "participants", "code")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, and the :data:`LOG_FIELDS`
    a call attached; an exception's traceback as ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        out.update({k: getattr(record, k) for k in LOG_FIELDS if hasattr(record, k)})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)

    converter = staticmethod(time.gmtime)  # the time field is UTC


def log_formatter() -> logging.Formatter:
    """The formatter this process's logs use: JSON lines when ``HYPRSTREAM_LOG_FORMAT=json``, else text."""
    if os.environ.get(LOG_FORMAT_ENV, "text") == "json":
        return JsonFormatter()
    return logging.Formatter(LOG_FORMAT)


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
