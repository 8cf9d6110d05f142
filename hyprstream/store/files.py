"""Crash-safe file primitives of the store: fsync, atomic replace, directory sync.

A file written with :func:`write_atomic` is, after a crash at any point, either absent (or its
previous version) or complete: the bytes go to a temporary sibling, are fsynced, renamed over the
target, and the directory entry is fsynced too.
"""

from __future__ import annotations

import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (creations, renames, deletions) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | memoryview, *, sync: bool = True) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync:
        fsync_dir(path.parent)


def remove_temporaries(directory: Path) -> list[Path]:
    """Delete the leftovers of interrupted :func:`write_atomic` calls in ``directory``."""
    removed = []
    for p in directory.glob(f".*{TMP_SUFFIX}"):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed
