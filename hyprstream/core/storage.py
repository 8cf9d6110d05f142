"""Where core keeps model files: a local directory (default) or any ``pyarrow.fs`` filesystem.

Both implementations give the same guarantee for :meth:`Storage.write_atomic`: after a crash the file
is either absent (or its previous content) or complete.

* :class:`LocalStorage`: temp file, ``fsync``, atomic ``rename``, directory ``fsync``; Arrow files are
  memory-mapped on read (zero-copy).
* :class:`ArrowFsStorage`: any ``pyarrow.fs.FileSystem``. On object stores (S3, GCS, Azure) an object
  becomes visible only when its upload completes, so the final key is written directly; elsewhere a
  temporary file is written and moved over the target. Durability is the filesystem's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.fs as pafs

from hyprstream.durable import TMP_MARKER, is_temporary, write_atomic, write_many_atomic
from hyprstream.errors import ConfigError

_OBJECT_STORES = frozenset({"s3", "gcs", "abfs"})


class Storage(Protocol):
    description: str

    def exists(self, rel: str) -> bool: ...
    def read_bytes(self, rel: str) -> bytes: ...
    def read_table(self, rel: str) -> pa.Table: ...
    def write_atomic(self, rel: str, write: Callable[[Any], None]) -> None: ...
    def write_many_atomic(self, writes: dict[str, Callable[[Any], None]]) -> None: ...
    def list(self, rel_dir: str) -> list[str]: ...
    def makedirs(self, rel_dir: str) -> None: ...
    def delete(self, rel: str) -> None: ...
    def delete_dir(self, rel_dir: str) -> None: ...


class LocalStorage:
    """A local directory with fsync'd atomic writes."""

    def __init__(self, root: str | os.PathLike[str], *, sync: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.sync = sync
        self.description = str(self.root)

    def _p(self, rel: str) -> Path:
        return self.root / rel

    def exists(self, rel: str) -> bool:
        return self._p(rel).exists()

    def read_bytes(self, rel: str) -> bytes:
        return self._p(rel).read_bytes()

    def read_table(self, rel: str) -> pa.Table:
        with pa.memory_map(str(self._p(rel))) as src:
            return pa.ipc.open_file(src).read_all()

    def write_atomic(self, rel: str, write: Callable[[Any], None]) -> None:
        write_atomic(self._p(rel), write, sync=self.sync)

    def write_many_atomic(self, writes: dict[str, Callable[[Any], None]]) -> None:
        """Several files, each atomic; one directory fsync per directory (not all-or-nothing)."""
        write_many_atomic({self._p(rel): w for rel, w in writes.items()}, sync=self.sync)

    def list(self, rel_dir: str) -> list[str]:
        try:
            return sorted(os.listdir(self._p(rel_dir)))
        except FileNotFoundError:
            return []

    def makedirs(self, rel_dir: str) -> None:
        self._p(rel_dir).mkdir(parents=True, exist_ok=True)

    def delete(self, rel: str) -> None:
        self._p(rel).unlink(missing_ok=True)

    def delete_dir(self, rel_dir: str) -> None:
        import shutil

        shutil.rmtree(self._p(rel_dir), ignore_errors=True)


class ArrowFsStorage:
    """A directory ``base`` on a ``pyarrow.fs.FileSystem`` (S3, GCS, HDFS, a SubTree, ...)."""

    def __init__(self, fs: pafs.FileSystem, base: str) -> None:
        self.fs = fs
        self.base = base.rstrip("/")
        self.direct = fs.type_name in _OBJECT_STORES
        self.description = f"{fs.type_name}:{self.base}"
        self.fs.create_dir(self.base, recursive=True)

    def _p(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self._p(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._p(rel)) as src:
            return src.read()

    def read_table(self, rel: str) -> pa.Table:
        with self.fs.open_input_file(self._p(rel)) as src:
            return pa.ipc.open_file(src).read_all()

    def write_atomic(self, rel: str, write: Callable[[Any], None]) -> None:
        final = self._p(rel)
        if self.direct:
            with self.fs.open_output_stream(final) as out:
                write(out)
            return
        parent, _, name = final.rpartition("/")
        tmp = f"{parent}/.{name}{TMP_MARKER}{os.getpid()}"
        try:
            with self.fs.open_output_stream(tmp) as out:
                write(out)
            self.fs.move(tmp, final)
        finally:
            if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                self.fs.delete_file(tmp)

    def write_many_atomic(self, writes: dict[str, Callable[[Any], None]]) -> None:
        for rel, write in writes.items():
            self.write_atomic(rel, write)

    def list(self, rel_dir: str) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self._p(rel_dir), allow_not_found=True))
        return sorted(i.base_name for i in infos)

    def makedirs(self, rel_dir: str) -> None:
        self.fs.create_dir(self._p(rel_dir), recursive=True)

    def delete(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_file(self._p(rel))

    def delete_dir(self, rel_dir: str) -> None:
        if self.exists(rel_dir):
            self.fs.delete_dir(self._p(rel_dir))


def read_json(storage: Storage, rel: str, *, what: str, schema: str, keys: Collection[str]) -> dict[str, Any]:
    """The JSON object ``rel`` of ``storage``, with ``schema`` and at least ``keys``.

    ConfigError naming the file when it is not one (a file core cannot start on until it is restored).
    """
    source = f"{storage.description.rstrip('/')}/{rel}"
    try:
        obj = json.loads(storage.read_bytes(rel))
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested too deeply
        raise ConfigError(f"not a {what}: not JSON ({exc})", source=source) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", source=source) from None
    if not isinstance(obj, dict) or obj.get("schema") != schema:
        raise ConfigError(f"not a {what}: expected a JSON object with schema {schema!r}", source=source)
    missing = sorted(set(keys) - set(obj))
    if missing:
        raise ConfigError(f"not a {what}: missing {', '.join(missing)}", source=source)
    return obj


def open_storage(uri: str | os.PathLike[str], *, sync: bool = True) -> LocalStorage | ArrowFsStorage:
    """A plain path or ``file://`` URI gives :class:`LocalStorage`; any other URI ``pyarrow.fs`` knows
    (``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``) gives :class:`ArrowFsStorage`."""
    text = os.fspath(uri)
    if "://" not in text:
        return LocalStorage(text, sync=sync)
    if text.startswith("file://"):
        return LocalStorage(text.removeprefix("file://"), sync=sync)
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise ConfigError(f"not a storage URI pyarrow.fs can open: {exc}", source=text) from None
    return ArrowFsStorage(fs, path)


__all__ = ["ArrowFsStorage", "LocalStorage", "Storage", "is_temporary", "open_storage", "read_json"]
