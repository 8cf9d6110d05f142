"""Versioned master weights on disk, one model per directory.

Layout under ``root/<model>/``::

    layers/<layer>@<version>.arrow   the value of one layer group as committed by <version> (Arrow IPC)
    manifest.json                    current version, per-version lineage, per-layer clocks, fog sequence numbers

A version is copy-on-write per layer: it names, for every layer group, the file holding that layer's
value. Committing writes the new layer files durably first and then replaces the manifest atomically,
so a crash leaves the previous version current and never a half-written one.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from hyprstream.core.consistency import ConsistencyPolicy, decide
from hyprstream.core.durable import write_atomic, write_bytes_atomic
from hyprstream.core.vector_clock import VectorClock, clocks_from_json
from hyprstream.config import parse, to_dict
from hyprstream.errors import UpdateRejected, ValidationError
from hyprstream.store import layer_table as lt

log = logging.getLogger("hyprstream.core")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


@dataclass(frozen=True)
class ModelSettings:
    consistency: ConsistencyPolicy = field(default_factory=ConsistencyPolicy)
    max_update_norm: float | None = None  # refuse deltas whose L2 norm exceeds this


@dataclass(frozen=True)
class VersionInfo:
    version: int
    parent: int | None
    created: float
    actor: str
    layers: tuple[str, ...]  # layer groups this version changed
    participants: int = 0
    staleness: Mapping[str, int] = field(default_factory=dict)
    weight: float = 1.0
    update_norm: float = 0.0


@dataclass(frozen=True)
class Snapshot:
    """A model version: its layer table (only the layers asked for) and the clocks of those layers."""

    model: str
    version: int
    table: pa.Table
    clocks: dict[str, VectorClock]


@dataclass(frozen=True)
class PushResult:
    version: int
    staleness: dict[str, int]
    weight: float
    update_norm: float


def check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValidationError(f"invalid {kind} name {value!r}: use 1-128 letters, digits, '_', '.', '-'")
    return value


class ModelRepository:
    """Thread-safe store of versioned models. Every public method either commits fully or changes nothing."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._manifests: dict[str, dict[str, Any]] = {}

    # --- reading ---------------------------------------------------------------------------------

    def models(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / "manifest.json").exists())

    def _manifest(self, model: str) -> dict[str, Any]:
        check_name("model", model)
        with self._lock:
            if model not in self._manifests:
                path = self.root / model / "manifest.json"
                if not path.exists():
                    raise ValidationError(f"unknown model {model!r}")
                self._manifests[model] = json.loads(path.read_text())
            return self._manifests[model]

    def settings(self, model: str) -> ModelSettings:
        return parse(ModelSettings, self._manifest(model)["settings"], source=f"model {model}")

    def head(self, model: str) -> dict[str, Any]:
        """Current version, its layers and their clocks."""
        m = self._manifest(model)
        v = m["versions"][-1]
        return {"model": model, "version": v["version"], "layers": sorted(m["layer_files"][str(v["version"])]),
                "clocks": m["clocks"][str(v["version"])]}

    def versions(self, model: str) -> list[VersionInfo]:
        return [
            VersionInfo(
                version=v["version"], parent=v["parent"], created=v["created"], actor=v["actor"],
                layers=tuple(v["layers"]), participants=v.get("participants", 0),
                staleness=v.get("staleness", {}), weight=v.get("weight", 1.0),
                update_norm=v.get("update_norm", 0.0),
            )
            for v in self._manifest(model)["versions"]
        ]

    def get(self, model: str, version: int | None = None, layers: Iterable[str] | None = None) -> Snapshot:
        with self._lock:
            m = self._manifest(model)
            if version is None:
                version = m["versions"][-1]["version"]
            key = str(version)
            if key not in m["layer_files"]:
                raise ValidationError(f"model {model!r} has no version {version}")
            files: dict[str, str] = m["layer_files"][key]
            clocks = clocks_from_json(m["clocks"][key])
        wanted = list(files) if layers is None else list(dict.fromkeys(layers))
        unknown = [name for name in wanted if name not in files]
        if unknown:
            raise ValidationError(f"model {model!r} has no layer(s) {unknown}")
        parts = [self._read_layer(model, files[name]) for name in wanted]
        table = pa.concat_tables(parts) if parts else lt.to_table({})
        return Snapshot(model, version, table, {name: clocks.get(name, VectorClock()) for name in wanted})

    def _read_layer(self, model: str, filename: str) -> pa.Table:
        with pa.memory_map(str(self.root / model / "layers" / filename)) as src:
            return pa.ipc.open_file(src).read_all()

    # --- writing ---------------------------------------------------------------------------------

    def register(self, model: str, table: pa.Table, settings: ModelSettings, *, actor: str) -> int:
        """Create ``model`` at version 0 from a layer table. Refuses an existing name."""
        check_name("model", model)
        table = lt.normalize(table)
        arrays = lt.to_arrays(table)  # validates byte lengths, dtypes, duplicates
        for name, arr in arrays.items():
            if not np.issubdtype(arr.dtype, np.floating):
                raise ValidationError(f"parameter {name!r}: master weights must be floating point")
            if not np.isfinite(arr).all():
                raise ValidationError(f"parameter {name!r}: initial weights contain NaN or Inf")
        with self._lock:
            mdir = self.root / model
            if (mdir / "manifest.json").exists():
                raise ValidationError(f"model {model!r} already exists")
            (mdir / "layers").mkdir(parents=True, exist_ok=True)
            files = {}
            for layer in lt.layers_in(table):
                check_name("layer", layer)
                files[layer] = self._write_layer(model, layer, 0, lt.select_layers(table, [layer]))
            manifest = {
                "schema": "hyprstream.core.manifest/1",
                "model": model,
                "settings": to_dict(settings),
                "versions": [{"version": 0, "parent": None, "created": time.time(), "actor": actor,
                              "layers": sorted(files), "participants": 0}],
                "layer_files": {"0": files},
                "clocks": {"0": {layer: {} for layer in files}},
                "fog_seq": {},
            }
            self._write_manifest(model, manifest)
            log.info("registered model %s with %d layer groups", model, len(files))
            return 0

    def push_delta(self, model: str, delta: pa.Table, *, fog: str, seq: int,
                   base_clocks: Mapping[str, VectorClock], participants: int) -> PushResult:
        """Validate and merge a layer-wise delta; commit a new version. Raises UpdateRejected."""
        check_name("fog", fog)
        try:
            delta = lt.normalize(delta)
            arrays = lt.to_arrays(delta)
        except ValidationError as exc:
            raise UpdateRejected(str(exc)) from None
        if not arrays:
            raise UpdateRejected("empty delta")
        with self._lock:
            m = self._manifest(model)
            settings = self.settings(model)
            if seq <= m["fog_seq"].get(fog, 0):
                raise UpdateRejected(f"replayed push: fog {fog!r} already pushed seq {m['fog_seq'][fog]}, got {seq}")
            head = m["versions"][-1]["version"]
            current = self.get(model, head)
            master = lt.to_arrays(current.table)
            layer_of = dict(zip(current.table.column("name").to_pylist(),
                                current.table.column("layer").to_pylist(), strict=True))
            delta_layers = dict(zip(delta.column("name").to_pylist(), delta.column("layer").to_pylist(), strict=True))
            touched: list[str] = []
            sq = 0.0
            for name, d in arrays.items():
                if name not in master:
                    raise UpdateRejected(f"unknown parameter {name!r}")
                if delta_layers[name] != layer_of[name]:
                    raise UpdateRejected(f"parameter {name!r} belongs to layer {layer_of[name]!r}, not {delta_layers[name]!r}")
                if d.shape != master[name].shape:
                    raise UpdateRejected(f"{name}: shape {list(d.shape)} differs from the model's {list(master[name].shape)}")
                if d.dtype != master[name].dtype:
                    raise UpdateRejected(f"{name}: dtype {d.dtype} differs from the model's {master[name].dtype}")
                if not np.isfinite(d).all():
                    raise UpdateRejected(f"{name}: delta contains NaN or Inf")
                sq += float(np.square(d, dtype=np.float64).sum())
                if layer_of[name] not in touched:
                    touched.append(layer_of[name])
            norm = float(np.sqrt(sq))
            if settings.max_update_norm is not None and norm > settings.max_update_norm:
                raise UpdateRejected(f"update norm {norm:.6g} exceeds the model's bound {settings.max_update_norm:.6g}")
            staleness, weight = {}, 1.0
            for layer in touched:
                if layer not in base_clocks:
                    raise UpdateRejected(f"push lacks the base clock of layer {layer!r}")
                decision = decide(settings.consistency, base_clocks[layer], current.clocks[layer])
                if not decision.accept:
                    raise UpdateRejected(f"layer {layer!r}: {decision.reason}")
                staleness[layer] = decision.staleness
                weight = min(weight, decision.weight)
            new_version = head + 1
            files = dict(m["layer_files"][str(head)])
            clocks = dict(m["clocks"][str(head)])
            for layer in touched:
                names = [n for n, lay in layer_of.items() if lay == layer]
                updated = {n: (master[n] + weight * arrays[n]).astype(master[n].dtype, copy=False)
                           if n in arrays else master[n] for n in names}
                files[layer] = self._write_layer(model, layer, new_version, lt.to_table(updated, layer=lambda _: layer))
                clocks[layer] = current.clocks[layer].increment(fog).as_dict()
            manifest = json.loads(json.dumps(m))
            manifest["versions"].append({
                "version": new_version, "parent": head, "created": time.time(), "actor": fog,
                "layers": touched, "participants": participants, "staleness": staleness,
                "weight": weight, "update_norm": norm, "seq": seq,
            })
            manifest["layer_files"][str(new_version)] = files
            manifest["clocks"][str(new_version)] = clocks
            manifest["fog_seq"][fog] = seq
            self._write_manifest(model, manifest)
            log.info("model %s: version %d from %s (layers %s, staleness %s)", model, new_version, fog, touched, staleness)
            return PushResult(new_version, staleness, weight, norm)

    def _write_layer(self, model: str, layer: str, version: int, table: pa.Table) -> str:
        filename = f"{layer}@{version}.arrow"

        def write(fh) -> None:
            with pa.ipc.new_file(fh, table.schema) as writer:
                writer.write_table(table)

        write_atomic(self.root / model / "layers" / filename, write)
        return filename

    def _write_manifest(self, model: str, manifest: dict[str, Any]) -> None:
        write_bytes_atomic(self.root / model / "manifest.json", json.dumps(manifest, indent=1).encode())
        self._manifests[model] = manifest
