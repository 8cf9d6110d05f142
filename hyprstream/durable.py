"""Crash-safe file writes: temp file, fsync, atomic rename, directory fsync; new private files (mode 0600)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from hyprstream.errors import ConfigError

TMP_MARKER = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[BinaryIO], None], *, sync: bool = True) -> None:
    """Write ``path`` so that a crash leaves either the old file or the complete new one."""
    tmp = path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if sync:
        fsync_dir(path.parent)


def write_many_atomic(paths: dict[Path, Callable[[BinaryIO], None]], *, sync: bool = True) -> None:
    """:func:`write_atomic` for several files: each is fsynced and renamed, then each directory once."""
    done: list[Path] = []
    try:
        for path, write in paths.items():
            tmp = path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}")
            done.append(tmp)
            with open(tmp, "wb") as fh:
                write(fh)
                fh.flush()
                if sync:
                    os.fsync(fh.fileno())
        for tmp, path in zip(done, paths, strict=True):
            os.replace(tmp, path)
    finally:
        for tmp in done:
            tmp.unlink(missing_ok=True)
    if sync:
        for directory in dict.fromkeys(p.parent for p in paths):
            fsync_dir(directory)


def write_bytes_atomic(path: Path, data: bytes, *, sync: bool = True) -> None:
    write_atomic(path, lambda fh: fh.write(data), sync=sync)


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a leftover of an interrupted :func:`write_atomic`."""
    return name.startswith(".") and TMP_MARKER in name


def write_private_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Create ``path`` with mode 0600 (never replacing a file), write ``data`` and fsync it."""
    _write_new(path, data, 0o600)


def write_public_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Create ``path`` with mode 0644 (never replacing a file), write ``data`` and fsync it."""
    _write_new(path, data, 0o644)


def create_once(path: str | os.PathLike[str], make: Callable[[], bytes]) -> bytes:
    """The content of the private file ``path``, made on first use from ``make()``: written whole to a
    temporary file and linked into place, so that processes racing to make it agree on one content and no
    reader ever sees it partly written."""
    p = Path(path)
    if not p.exists():
        tmp = p.with_name(f"{p.name}{TMP_MARKER}{os.getpid()}-{os.urandom(4).hex()}")
        write_private_file(tmp, make())
        try:
            with contextlib.suppress(FileExistsError):  # another process linked its own first: that one holds
                os.link(tmp, p)
            fsync_dir(p.parent)
        finally:
            tmp.unlink()
    return p.read_bytes()


def _write_new(path: str | os.PathLike[str], data: bytes, mode: int) -> None:
    p = Path(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ConfigError("refusing to overwrite an existing file", source=str(p)) from None
    except OSError as exc:
        raise ConfigError(f"cannot create: {exc.strerror or exc}", source=str(p)) from None
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed, never widened, the mode; be explicit
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
