"""Versioned master weights, one model per directory of a :class:`~hyprstream.core.storage.Storage`.

Layout under ``<root>/<model>/``::

    layers/<layer>@<version>.arrow   the value of one layer group as committed by <version> (Arrow IPC)
    manifest.json                    lineage, per-version layer files and per-layer clocks, fog sequence numbers

A version is copy-on-write per layer: it names, for every layer group, the file holding that layer's
value. A commit is, in order:

1. the changed layers are written durably to new files (temp file, fsync, atomic rename): invisible,
   since no manifest names them yet;
2. the manifest naming them replaces the old one atomically (the new version is current);
3. the commit's audit entry is appended and fsynced (when the repository has an audit log);
4. only then is the push acknowledged.

After a crash at any point, opening the repository reconciles the manifests with the audit log: a
version whose audit entry is missing was never acknowledged and is rolled back (and the rollback is
audited); layer files no manifest names, and temporaries, are deleted. Without an audit log the
manifest replacement (2) is the commit point.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from hyprstream.config import parse, to_dict
from hyprstream.coreapi.commands import PushDelta, ReportEvaluation, claims
from hyprstream.coreapi.records import (
    NAME,
    ModelSettings,
    PushResult,
    Snapshot,
    VersionInfo,
    check_name,
)
from hyprstream.core.audit import AuditError, AuditLog, canonical, iter_entries
from hyprstream.core.evaluation import Evaluator, Guard, Score
from hyprstream.consistency import plan_merge
from hyprstream.core.storage import LocalStorage, Storage, is_temporary, read_json
from hyprstream.vector_clock import VectorClock, clocks_from_json, clocks_to_json
from hyprstream.errors import Refusal, UpdateRejected, ValidationError
from hyprstream.store import layer_table as lt

log = logging.getLogger("hyprstream.core")

MANIFEST_SCHEMA = "hyprstream.core.manifest/1"
COMMIT_ACTIONS = ("model.register", "model.push")
_NORM_CHUNK = 1 << 16  # elements per float64 block of the norm pass (512 KiB: stays in cache)


def update_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of a set of tensors, independent of row order and chunking.

    For each parameter in name order: the canonical JSON ``{"dtype":..,"name":..,"shape":[..]}``, a
    newline, then the tensor's raw little-endian C-order bytes (see ``docs/api.md``).
    """
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        a = a if a.dtype.byteorder in ("<", "|", "=") else a.astype(a.dtype.newbyteorder("<"))
        h.update(canonical({"dtype": a.dtype.name, "name": name, "shape": list(a.shape)}) + b"\n")
        h.update(memoryview(a.reshape(-1).view(np.uint8)))
    return h.hexdigest()


def sum_of_squares(a: np.ndarray) -> float:
    """Sum of squares in float64, one cache-sized block at a time; NaN or Inf when the input has them."""
    flat = a.reshape(-1)
    if flat.dtype == np.float64:
        return float(np.dot(flat, flat))
    total = 0.0
    for i in range(0, flat.size, _NORM_CHUNK):
        block = flat[i:i + _NORM_CHUNK].astype(np.float64)
        total += float(np.dot(block, block))
    return total


def _known_base(base: VectorClock, history: set[VectorClock], fog: str, current: VectorClock | None) -> bool:
    """Whether ``fog`` may name ``base``: a layer clock of some committed version, or one with only ``fog``'s own
    entry advanced, no further than its pushes committed so far (a fog cut from core trains on from its own
    buffered pushes; core may have merged them with other fogs' since, so that exact clock was never committed)."""
    if base in history:
        return True
    own = base.as_dict().get(fog, 0)
    if current is None or own > current.as_dict().get(fog, 0):
        return False
    rest = {k: v for k, v in base.as_dict().items() if k != fog}
    return any({k: v for k, v in h.as_dict().items() if k != fog} == rest for h in history)


def _replay_key(fog: str, base_clocks: Mapping[str, Any], digest: str | None) -> tuple[str, bytes, str] | None:
    return None if digest is None else (fog, canonical(base_clocks), digest)


class ModelRepository:
    """Thread-safe store of versioned models. Every public method either commits fully or changes nothing."""

    def __init__(self, root: str | Path | Storage, *, audit: AuditLog | None = None,
                 actor: str = "core", evaluators: Mapping[str, Evaluator] | None = None) -> None:
        self.storage: Storage = LocalStorage(root) if isinstance(root, (str, Path)) else root
        self.evaluators = dict(evaluators or {})  # model -> its validation rows and guard (core/evaluation.py)
        self.root = getattr(self.storage, "root", None)
        self.audit = audit
        self.actor = actor
        self._lock = threading.RLock()
        self._manifests: dict[str, dict[str, Any]] = {}
        self._applied: dict[str, set[tuple[str, bytes, str]]] = {}
        self._history: dict[str, dict[str, set[VectorClock]]] = {}
        self.recovered: list[str] = []  # what opening repaired, one line each
        self._recover()

    # --- reading ---------------------------------------------------------------------------------

    def models(self) -> list[str]:
        return [name for name in self.storage.list("") if NAME.match(name)
                and self.storage.exists(f"{name}/manifest.json")]

    def _manifest(self, model: str) -> dict[str, Any]:
        check_name("model", model)
        with self._lock:
            if model not in self._manifests:
                if not self.storage.exists(f"{model}/manifest.json"):
                    raise ValidationError(f"unknown model {model!r}")
                self._manifests[model] = read_json(
                    self.storage, f"{model}/manifest.json", what="model manifest", schema=MANIFEST_SCHEMA,
                    keys=("model", "settings", "versions", "layer_files", "clocks", "fog_seq"))
            return self._manifests[model]

    def settings(self, model: str) -> ModelSettings:
        return parse(ModelSettings, self._manifest(model)["settings"], source=f"model {model}")

    def head(self, model: str) -> dict[str, Any]:
        """Current version, its layers and their clocks, and the model's ``max_update_norm`` (None: no
        bound), which a fog adding client-level noise checks before it starts a round."""
        with self._lock:
            m = self._manifest(model)
            v = m["versions"][-1]
            return {"model": model, "version": v["version"],
                    "layers": sorted(m["layer_files"][str(v["version"])]),
                    "clocks": m["clocks"][str(v["version"])],
                    "max_update_norm": self.settings(model).max_update_norm}

    def versions(self, model: str) -> list[VersionInfo]:
        with self._lock:
            m = self._manifest(model)
            return [
                VersionInfo(
                    version=v["version"], parent=v["parent"], created=v["created"], actor=v["actor"],
                    layers=tuple(v["layers"]), participants=v.get("participants", 0),
                    staleness=v.get("staleness", {}), weight=v.get("weight", 1.0),
                    update_norm=v.get("update_norm", 0.0), fog=v.get("fog"), seq=v.get("seq"),
                    clocks=m["clocks"][str(v["version"])], update_sha256=v.get("update_sha256"),
                    privacy=v.get("privacy"), accuracy=v.get("accuracy"), loss=v.get("loss"),
                    update_bytes=v.get("update_bytes"), federated=v.get("federated"),
                )
                for v in m["versions"]
            ]

    def record_evaluation(self, report: ReportEvaluation, *, actor: str | None = None) -> None:
        """Keep a fog's federated evaluation of a version in that version's lineage entry (``federated``,
        by fog; a fog's later report of the same version replaces its earlier one), audited as
        ``model.evaluation``."""
        model = report.model
        with self._lock:
            m = self._manifest(model)
            at = next((i for i, v in enumerate(m["versions"]) if v["version"] == report.version), None)
            if at is None or report.version < 1:
                raise ValidationError(f"model {model!r} has no version {report.version} to evaluate")
            score = {"loss": report.loss, "accuracy": report.accuracy, "devices": report.devices}
            # the changed entry is a new object (entries of a written manifest are never changed in place)
            entry = json.loads(json.dumps(m["versions"][at]))
            entry.setdefault("federated", {})[report.fog] = score
            manifest = {**m, "versions": [*m["versions"][:at], entry, *m["versions"][at + 1:]]}
            self._write_manifest(model, manifest)
            self._commit_audit(model, m, actor or report.fog, "model.evaluation",
                               {"version": report.version, "fog": report.fog, **score})

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
        parts = [self.storage.read_table(f"{model}/layers/{files[name]}") for name in wanted]
        table = pa.concat_tables(parts) if parts else lt.to_table({})
        return Snapshot(model, version, table, {name: clocks.get(name, VectorClock()) for name in wanted})

    # --- writing ---------------------------------------------------------------------------------

    def register(self, model: str, table: pa.Table, settings: ModelSettings, *, actor: str) -> int:
        """Create ``model`` at version 0 from a layer table. Refuses an existing name."""
        check_name("model", model)
        table = lt.normalize(table)
        arrays = lt.to_arrays(table)  # validates byte lengths, dtypes, duplicates
        if not arrays:
            raise ValidationError("a model needs at least one parameter")
        for name, arr in arrays.items():
            if not np.issubdtype(arr.dtype, np.floating):
                raise ValidationError(f"parameter {name!r}: master weights must be floating point")
            if not np.isfinite(arr).all():
                raise ValidationError(f"parameter {name!r}: initial weights contain NaN or Inf")
        for layer in lt.layers_in(table):
            check_name("layer", layer)
        with self._lock:
            if self.storage.exists(f"{model}/manifest.json"):
                raise ValidationError(f"model {model!r} already exists")
            self.storage.makedirs(f"{model}/layers")
            evaluator = self.evaluators.get(model)
            score = evaluator.score(arrays) if evaluator is not None else None
            files = self._write_layers(model, 0, {layer: lt.select_layers(table, [layer])
                                                  for layer in lt.layers_in(table)})
            manifest = {
                "schema": MANIFEST_SCHEMA,
                "model": model,
                "settings": to_dict(settings),
                "versions": [{"version": 0, "parent": None, "created": time.time(), "actor": actor,
                              "layers": sorted(files), "participants": 0, **_scored(score)}],
                "layer_files": {"0": files},
                "clocks": {"0": {layer: {} for layer in files}},
                "fog_seq": {},
            }
            self._write_manifest(model, manifest)
            details = {"version": 0, "layers": sorted(files), "parameters": len(arrays),
                       "elements": int(sum(a.size for a in arrays.values())),
                       "weights_sha256": update_digest(arrays), "settings": to_dict(settings)}
            self._commit_audit(model, None, actor, "model.register", details)
            log.info("registered model %s with %d layer groups", model, len(files))
            return 0

    def push_delta(self, model: str, delta: pa.Table, *, fog: str, seq: int,
                   base_clocks: Mapping[str, VectorClock], participants: int, actor: str | None = None,
                   privacy: Mapping[str, float] | None = None, transcript_sha256: str | None = None) -> PushResult:
        """:meth:`push` of the record these fields make."""
        return self.push(PushDelta(model, fog, seq, dict(base_clocks), participants,
                                   None if privacy is None else dict(privacy), transcript_sha256), delta, actor=actor)

    def push(self, push: PushDelta, delta: pa.Table, *, actor: str | None = None) -> PushResult:
        """Validate and merge ``delta``, which ``push`` describes; commit a new version whose lineage entry and
        audit entry record :func:`~hyprstream.coreapi.commands.claims` of ``push``. Raises UpdateRejected."""
        model, fog, seq, base_clocks = push.model, push.fog, push.seq, push.base_clocks
        check_name("fog", fog)
        try:
            delta = lt.normalize(delta)
            arrays = lt.to_arrays(delta)
        except ValidationError as exc:
            raise UpdateRejected(str(exc), Refusal.INVALID) from None
        if not arrays:
            raise UpdateRejected("empty delta", Refusal.EMPTY)
        with self._lock:
            m = self._manifest(model)
            settings = self.settings(model)
            last_seq = m["fog_seq"].get(fog, 0)
            if seq <= last_seq:
                raise UpdateRejected(f"replayed push: fog {fog!r} already pushed seq {last_seq}, got {seq}", Refusal.REPLAY)
            head = m["versions"][-1]["version"]
            current_clocks = clocks_from_json(m["clocks"][str(head)])
            master: dict[str, np.ndarray] = {}
            layer_of: dict[str, str] = {}
            for layer, filename in m["layer_files"][str(head)].items():
                part = self.storage.read_table(f"{model}/layers/{filename}")  # memory-mapped: views, no copy
                master.update(lt.to_arrays(part))
                layer_of.update(dict.fromkeys(part.column("name").to_pylist(), layer))
            delta_layers = dict(zip(delta.column("name").to_pylist(), delta.column("layer").to_pylist(), strict=True))
            touched: list[str] = []
            sq = 0.0
            for name, d in arrays.items():
                if name not in master:
                    raise UpdateRejected(f"unknown parameter {name!r}", Refusal.UNKNOWN_PARAMETER)
                if delta_layers[name] != layer_of[name]:
                    raise UpdateRejected(f"parameter {name!r} belongs to layer {layer_of[name]!r}, not {delta_layers[name]!r}",
                                         Refusal.WRONG_LAYER)
                if d.shape != master[name].shape:
                    raise UpdateRejected(f"{name}: shape {list(d.shape)} differs from the model's {list(master[name].shape)}",
                                         Refusal.SHAPE)
                if d.dtype != master[name].dtype:
                    raise UpdateRejected(f"{name}: dtype {d.dtype} differs from the model's {master[name].dtype}",
                                         Refusal.DTYPE)
                s = sum_of_squares(d)
                if not np.isfinite(s):
                    if not np.isfinite(d).all():
                        raise UpdateRejected(f"{name}: delta contains NaN or Inf", Refusal.NOT_FINITE)
                    raise UpdateRejected(f"{name}: delta norm overflows", Refusal.NOT_FINITE)
                sq += s
                if layer_of[name] not in touched:
                    touched.append(layer_of[name])
            norm = float(np.sqrt(sq))
            if settings.max_update_norm is not None and norm > settings.max_update_norm:
                raise UpdateRejected(f"update norm {norm:.6g} exceeds the model's bound {settings.max_update_norm:.6g}",
                                     Refusal.NORM)
            history = self._clock_history(model)
            for layer in touched:
                if layer in base_clocks and not _known_base(base_clocks[layer], history.get(layer, set()), fog,
                                                            current_clocks.get(layer)):
                    raise UpdateRejected(f"layer {layer!r}: base clock {base_clocks[layer].as_dict()} is not the "
                                         f"clock of any committed version of model {model!r} (core's history), "
                                         f"nor one of them advanced by {fog!r}'s own committed pushes",
                                         Refusal.UNKNOWN_BASE)
            plan = plan_merge(settings.consistency, current_clocks, base_clocks, touched, fog,
                              fogs=len(set(m["fog_seq"]) | {fog}))
            if not plan.accept:
                raise UpdateRejected(plan.reason, Refusal.CONSISTENCY)
            base_json = clocks_to_json({layer: base_clocks[layer] for layer in touched})
            digest = update_digest(arrays)
            key = _replay_key(fog, base_json, digest)
            if key in self._applied_keys(model):
                raise UpdateRejected(f"replayed push: fog {fog!r} already pushed this delta from the same base clocks",
                                     Refusal.REPLAY)
            new_version = head + 1
            files = dict(m["layer_files"][str(head)])
            clocks = dict(m["clocks"][str(head)])
            tables = {layer: _updated_layer(layer, [n for n, lay in layer_of.items() if lay == layer], master,
                                            arrays, plan.weight) for layer in touched}
            score, regression = self._guard(model, m, master, tables)
            files.update(self._write_layers(model, new_version, tables))
            for layer in touched:
                clocks[layer] = plan.new_clocks[layer].as_dict()
            recorded = {**claims(push), "base_clocks": base_json}  # the base clocks of the layers it changed
            entry = {
                "version": new_version, "parent": head, "created": time.time(), "actor": actor or fog,
                "layers": touched, "staleness": plan.staleness, "weight": plan.weight, "update_norm": norm,
                "update_sha256": digest, "update_bytes": lt.nbytes(delta), **recorded, **_scored(score),
            }
            # The new manifest shares the old one's entries (a committed entry is never changed in place) and
            # holds the new ones as JSON gives them back: copying the whole lineage on every commit made a
            # commit's cost grow with the number of versions times the number of fogs in each clock.
            new = json.loads(json.dumps({"entry": entry, "files": files, "clocks": clocks}))
            manifest = {**m, "versions": [*m["versions"], new["entry"]],
                        "layer_files": {**m["layer_files"], str(new_version): new["files"]},
                        "clocks": {**m["clocks"], str(new_version): new["clocks"]},
                        "fog_seq": {**m["fog_seq"], fog: seq}}
            self._write_manifest(model, manifest)
            details = {
                "version": new_version, "parent": head, "layers": touched,
                "new_clocks": {layer: clocks[layer] for layer in touched}, "staleness": plan.staleness,
                "weight": plan.weight, "update_norm": norm, "update_sha256": digest, **recorded,
                "consistency": settings.consistency.mode.value,
                **_scored(score), **({"regression": True} if regression else {}),
            }
            self._commit_audit(model, m, actor or fog, "model.push", details)
            self._applied_keys(model).add(key)
            for layer in touched:
                history[layer].add(plan.new_clocks[layer])
            log.info("model %s: version %d from %s (layers %s, staleness %s)", model, new_version, fog, touched,
                     plan.staleness, extra={"model": model, "model_version": new_version, "fog": fog, "seq": seq,
                                            "participants": push.participants})
            return PushResult(new_version, plan.staleness, plan.weight, norm)

    def _guard(self, model: str, m: Mapping[str, Any], master: Mapping[str, np.ndarray],
               tables: Mapping[str, pa.Table]) -> tuple[Score | None, bool]:
        """The candidate version's score on the model's validation rows (None without an evaluation), and whether
        it is a regression the guard lets through (warn); UpdateRejected when the guard refuses it."""
        evaluator = self.evaluators.get(model)
        if evaluator is None:
            return None, False
        candidate = dict(master)
        for table in tables.values():
            candidate.update(lt.to_arrays(table))
        score = evaluator.score(candidate)
        best = max((v["accuracy"] for v in m["versions"] if v.get("accuracy") is not None), default=None)
        if not evaluator.regression(score, best):
            return score, False
        what = (f"the version would score accuracy {score.accuracy:.4f} on core's validation rows, more than "
                f"{evaluator.margin:g} below the model's best {best:.4f}")
        if evaluator.guard is Guard.REFUSE:
            raise UpdateRejected(what, Refusal.REGRESSION)
        if evaluator.guard is Guard.WARN:
            log.warning("model %s: %s (committed: the guard warns)", model, what)
        return score, evaluator.guard is Guard.WARN

    def _clock_history(self, model: str) -> dict[str, set[VectorClock]]:
        """Every clock each layer of ``model`` has had in a committed version (the bases a push may name)."""
        if model not in self._history:
            history: dict[str, set[VectorClock]] = {}
            for clocks in self._manifest(model)["clocks"].values():
                for layer, clock in clocks_from_json(clocks).items():
                    history.setdefault(layer, set()).add(clock)
            self._history[model] = history
        return self._history[model]

    def _applied_keys(self, model: str) -> set[tuple[str, bytes, str]]:
        if model not in self._applied:
            keys = (_replay_key(v.get("fog", v["actor"]), v.get("base_clocks", {}), v.get("update_sha256"))
                    for v in self._manifest(model)["versions"][1:])
            self._applied[model] = {k for k in keys if k is not None}
        return self._applied[model]

    def _commit_audit(self, model: str, previous: dict[str, Any] | None, actor: str, action: str,
                      details: dict[str, Any]) -> None:
        """Step 3 of a commit; when the audit log cannot take the entry, step 2 is undone."""
        if self.audit is None:
            return
        try:
            self.audit.append(actor, action, f"model/{model}", details=details)
        except AuditError:
            log.error("model %s: audit entry failed, undoing version %s", model, details["version"])
            try:
                if previous is None:
                    self.storage.delete(f"{model}/manifest.json")
                    self._manifests.pop(model, None)
                else:
                    self._write_manifest(model, previous)
            except OSError:
                self._manifests.pop(model, None)  # a restart's recovery rolls it back
            self._applied.pop(model, None)
            self._history.pop(model, None)
            raise

    def _write_layers(self, model: str, version: int, tables: Mapping[str, pa.Table]) -> dict[str, str]:
        """Step 1 of a commit: ``{layer: file name}`` of the new layer files, all durable on return."""

        def writer(table: pa.Table):
            def write(fh) -> None:
                with pa.ipc.new_file(fh, table.schema) as w:
                    w.write_table(table)
            return write

        files = {layer: f"{layer}@{version}.arrow" for layer in tables}
        self.storage.write_many_atomic({f"{model}/layers/{files[layer]}": writer(t) for layer, t in tables.items()})
        return files

    def _write_manifest(self, model: str, manifest: dict[str, Any]) -> None:
        data = json.dumps(manifest, separators=(",", ":")).encode()  # compact: json's C encoder
        self.storage.write_atomic(f"{model}/manifest.json", lambda fh: fh.write(data))
        self._manifests[model] = manifest

    # --- recovery --------------------------------------------------------------------------------

    def _recover(self) -> None:
        committed = self._committed_versions() if self.audit is not None else None
        names = [n for n in self.storage.list("") if NAME.match(n)]
        for model in names:
            for sub in ("", "layers"):
                for name in self.storage.list(f"{model}/{sub}".rstrip("/")):
                    if is_temporary(name):
                        self.storage.delete(f"{model}/{sub}/{name}".replace("//", "/"))
            if not self.storage.exists(f"{model}/manifest.json"):
                if committed is not None and model in committed:
                    raise AuditError(f"model {model!r}: the audit log records version {committed[model]} "
                                     f"but its manifest is missing from {self.storage.description}")
                self.storage.delete_dir(model)
                self._note(model, None, "removed a model directory without a manifest (interrupted register)")
                continue
            m = self._manifest(model)
            head = m["versions"][-1]["version"]
            if committed is not None:
                audited = committed.get(model)
                if audited is None and head == 0:
                    self.storage.delete_dir(model)
                    self._manifests.pop(model, None)
                    self._note(model, 0, "rolled back an unacknowledged register (no audit entry)")
                    continue
                if audited is not None and head == audited + 1:
                    self._write_manifest(model, _without_last_version(m))
                    self._note(model, head, "rolled back an unacknowledged version (no audit entry)")
                elif audited != head:
                    raise AuditError(f"model {model!r}: manifest is at version {head} but the audit log records "
                                     f"{audited}: refusing to start")
            self._remove_orphans(model)
        if committed is not None:
            lost = sorted(set(committed) - set(self.models()))
            if lost:
                raise AuditError(f"model(s) {lost} are in the audit log but not in {self.storage.description}")

    def _committed_versions(self) -> dict[str, int]:
        """The last version of each model that the audit log records as committed."""
        out: dict[str, int] = {}
        for e in iter_entries(self.audit.path):
            if e.outcome == "ok" and e.action in COMMIT_ACTIONS and e.subject.startswith("model/"):
                out[e.subject.removeprefix("model/")] = int(e.details["version"])
        return out

    def _remove_orphans(self, model: str) -> None:
        m = self._manifest(model)
        referenced = {f for files in m["layer_files"].values() for f in files.values()}
        for name in self.storage.list(f"{model}/layers"):
            if name not in referenced:
                self.storage.delete(f"{model}/layers/{name}")
                log.info("model %s: removed unreferenced layer file %s", model, name)

    def _note(self, model: str, version: int | None, what: str) -> None:
        self.recovered.append(f"model {model}: {what}" + (f" (version {version})" if version is not None else ""))
        log.warning("recovery: model %s: %s", model, what)
        if self.audit is not None and version is not None:
            self.audit.append(self.actor, "recovery.rollback", f"model/{model}",
                              details={"version": version, "reason": what})


def _scored(score: Score | None) -> dict[str, float]:
    """A lineage entry's evaluation fields (none without an evaluation)."""
    return {} if score is None else {"accuracy": score.accuracy, "loss": score.loss}


def _updated_layer(layer: str, names: list[str], master: Mapping[str, np.ndarray],
                   delta: Mapping[str, np.ndarray], weight: float) -> pa.Table:
    """The layer table of ``master + weight * delta`` for ``names``, computed straight into one buffer.

    Same arithmetic as ``master + weight * delta`` in the master's dtype (the weight is rounded to that
    dtype first, as numpy does for a Python float), without a temporary per tensor or a concatenation.
    """
    sizes = [master[n].nbytes for n in names]
    offsets = np.zeros(len(names) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    values = np.empty(int(offsets[-1]), dtype=np.uint8)
    for i, n in enumerate(names):
        m = master[n]
        out = values[offsets[i]:offsets[i + 1]].view(m.dtype).reshape(m.shape)
        d = delta.get(n)
        if d is None:
            np.copyto(out, m)
        elif weight == 1.0:
            np.add(m, d, out=out)
        else:
            np.multiply(d, m.dtype.type(weight), out=out)
            np.add(m, out, out=out)
    data = pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(names),
                                            [None, pa.py_buffer(offsets), pa.py_buffer(values)])
    return pa.Table.from_arrays(
        [pa.array([layer] * len(names), pa.string()), pa.array(names, pa.string()),
         pa.array([master[n].dtype.name for n in names], pa.string()),
         pa.array([list(master[n].shape) for n in names], pa.list_(pa.int64())), data],
        schema=lt.LAYER_SCHEMA)


def _without_last_version(m: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(m))
    last = out["versions"].pop()
    out["layer_files"].pop(str(last["version"]), None)
    out["clocks"].pop(str(last["version"]), None)
    seqs: dict[str, int] = {}
    for v in out["versions"][1:]:
        fog = v.get("fog", v["actor"])
        seqs[fog] = max(seqs.get(fog, 0), int(v.get("seq", 0)))
    out["fog_seq"] = seqs
    return out
