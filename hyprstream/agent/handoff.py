"""What the agent daemon and its ClientApp processes hand each other through the agent's state directory.

The Flower SuperNode runs the ClientApp in a fresh process per message, so the daemon and the
ClientApp share no memory. They meet in files, each written atomically (write, fsync, rename):

``<state>/policy.json``
    The daemon's current strategy, written on every monitor tick; the ClientApp plans (or declines)
    train requests by it. A file older than its ``valid_s`` means the daemon is not running: the
    ClientApp then declines.
``<state>/models/<task>/v<version>.arrow``
    The global model of each version a train request brought (an Arrow layer table); the daemon
    exports the newest one to ONNX for inference.

With the store encrypted, model files (these and the ONNX exports) are written with
:func:`write_private`: sealed with the store key (:func:`hyprstream.store.crypto.seal`), bound to their
name and the two directories above it, and read back into memory only (:func:`read_private`). A file
that fails to decrypt (tampered, moved or swapped, or a plaintext file put in its place) is an error
naming it, never loaded.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hyprstream.agent.profile import Strategy
from hyprstream.errors import ValidationError
from hyprstream.store.crypto import Cipher, seal, unseal
from hyprstream.store.files import write_atomic

__all__ = ["PolicyState", "latest_model", "load_model", "prune_models", "read_policy", "read_private", "save_model",
           "write_policy", "write_private"]

POLICY_FILE = "policy.json"
MODELS_DIR = "models"
POLICY_SCHEMA = "hyprstream.agent-policy/1"
_MODEL_FILE = re.compile(r"v(\d+)\.arrow")


@dataclass(frozen=True)
class PolicyState:
    """The daemon's decision as the ClientApp needs it."""

    strategy: Strategy
    time: float  # when written (seconds since the epoch)
    valid_s: float  # the state is stale after time + valid_s
    gpu_usable: bool
    reason: str
    profile: str  # path of the device profile the daemon runs with

    def fresh(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) <= self.time + self.valid_s


def write_policy(state_dir: Path, state: PolicyState) -> None:
    data = {"schema": POLICY_SCHEMA, "strategy": state.strategy.value, "time": state.time, "valid_s": state.valid_s,
            "gpu_usable": state.gpu_usable, "reason": state.reason, "profile": state.profile}
    write_atomic(state_dir / POLICY_FILE, json.dumps(data).encode(), sync=False)


def read_policy(state_dir: Path) -> PolicyState | None:
    """The daemon's last policy state; ``None`` when there is none. ValidationError when unreadable."""
    path = state_dir / POLICY_FILE
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValidationError(f"{path}: unreadable agent policy state: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != POLICY_SCHEMA:
        raise ValidationError(f"{path}: not a {POLICY_SCHEMA} file")
    try:
        return PolicyState(Strategy(data["strategy"]), float(data["time"]), float(data["valid_s"]),
                           bool(data["gpu_usable"]), str(data["reason"]), str(data["profile"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValidationError(f"{path}: bad agent policy state: {exc}") from None


def _place(path: Path) -> bytes:
    """What a private file is bound to: its name and the two directories above it."""
    return "/".join(path.parts[-3:]).encode()


def write_private(path: Path, data: bytes | memoryview, key: bytes | None) -> None:
    """Write ``data`` to ``path`` atomically and durably; sealed with ``key`` (the store key) when given."""
    write_atomic(path, seal(data, Cipher(key), aad=_place(path)) if key is not None else data, sync=True)


def read_private(path: Path, key: bytes | None) -> bytes:
    """The contents of a file written by :func:`write_private` with the same ``key``.

    StoreError naming the file when it cannot be decrypted or is plain where a key is given;
    ValidationError when it cannot be read.
    """
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ValidationError(f"{path}: cannot read: {exc.strerror}") from None
    return unseal(blob, Cipher(key) if key is not None else None, aad=_place(path), what=str(path))


def _model_dir(state_dir: Path, task: str) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", task):
        raise ValidationError(f"bad task name {task!r}")
    return state_dir / MODELS_DIR / task


def save_model(state_dir: Path, task: str, version: int, weights: Mapping[str, np.ndarray], *,
               layer_of=None, key: bytes | None = None) -> Path | None:
    """Write the global model of ``version`` unless it is already there; returns the new file or None.
    ``key``: the store key of an encrypted store (the file is then sealed with it)."""
    import pyarrow as pa

    from hyprstream.store import layer_table

    if version < 0:
        raise ValidationError(f"model version must be >= 0, got {version}")
    directory = _model_dir(state_dir, task)
    path = directory / f"v{version}.arrow"
    if path.exists():
        return None
    directory.mkdir(parents=True, exist_ok=True)
    table = layer_table.to_table(weights, layer=layer_of or layer_table.layer_of)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    write_private(path, sink.getvalue(), key)
    return path


def latest_model(state_dir: Path, task: str) -> tuple[int, Path] | None:
    """``(version, path)`` of the newest saved global model of ``task``."""
    directory = _model_dir(state_dir, task)
    found = []
    if directory.is_dir():
        for p in directory.iterdir():
            m = _MODEL_FILE.fullmatch(p.name)
            if m:
                found.append((int(m.group(1)), p))
    return max(found) if found else None


def load_model(path: Path, key: bytes | None = None) -> dict[str, np.ndarray]:
    """The weights saved by :func:`save_model` (with the same ``key``)."""
    import pyarrow as pa

    from hyprstream.store import layer_table

    data = read_private(path, key)
    try:
        table = pa.ipc.open_file(pa.py_buffer(data)).read_all()
    except pa.ArrowInvalid as exc:
        raise ValidationError(f"{path}: unreadable model file: {exc}") from None
    return layer_table.to_arrays(table, copy=True)


def prune_models(state_dir: Path, task: str, keep: int = 2) -> list[Path]:
    """Delete all but the ``keep`` newest saved models of ``task``; returns the deleted files."""
    directory = _model_dir(state_dir, task)
    if not directory.is_dir():
        return []
    versions = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _MODEL_FILE.fullmatch(p.name)))
    gone = [p for _, p in versions[:-keep]] if keep > 0 else [p for _, p in versions]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone
