"""Inference engine: the current global model on ONNX Runtime (CUDA or CPU, fp32 or int8), batched.

:class:`InferenceEngine` holds the ONNX files of the newest model version (:mod:`hyprstream.agent.export`
writes them) and runs one of them as the policy says (:class:`~hyprstream.agent.policy.InferencePlan`):

* execution provider: CUDA when the plan asks for it and ONNX Runtime has a working CUDA provider
  (``onnxruntime-gpu``), else the CPU; a session that silently fell back is reported as CPU;
* variant: fp32 or int8 (int8 only when the export produced one; fp32 otherwise);
* torch fallback: when ONNX Runtime is not installed or cannot load the model, the model runs in
  torch eager mode (fp32, CPU or CUDA) from the saved weights;
* encrypted model files (the engine's ``key``, the store key): decrypted into memory and handed to
  ONNX Runtime as bytes; a file that fails to decrypt is refused (StoreError naming it), with no
  fallback: the model served before stays;
* requests go through a :class:`~hyprstream.agent.batching.DynamicBatcher` with the profile's
  ``max_batch_size`` and ``max_batch_wait_ms``;
* offload: when the plan says so (the ``minimal`` strategy with a fog endpoint configured),
  :meth:`InferenceEngine.classify` sends the rows to the fog (:class:`~hyprstream.agent.offload.OffloadClient`)
  and answers with the fog's predictions and model version; when the fog cannot be reached it falls
  back to the local model, if there is one.

onnxruntime and torch are imported when a model is loaded, never before: an agent without a model
stays light.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from hyprstream._extras import require
from hyprstream.agent.batching import DynamicBatcher
from hyprstream.agent.export import ModelFiles
from hyprstream.agent.policy import InferencePlan
from hyprstream.agent.profile import ExecutionProvider, InferenceSettings, ModelVariant
from hyprstream.errors import HyprstreamError, MissingExtraError, StoreError, ValidationError
from hyprstream.learning.predictor import TorchPredictor

__all__ = [
    "EngineStats",
    "InferenceEngine",
    "OrtPredictor",
    "Predictor",
    "TorchPredictor",
    "cuda_available",
    "ort_session",
]

log = logging.getLogger("hyprstream.agent.inference")

_CUDA_EP, _CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"


class Predictor(Protocol):
    provider: ExecutionProvider
    variant: ModelVariant
    backend: str  # "onnxruntime" or "torch"

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


def cuda_available() -> bool:
    """Whether ONNX Runtime here has the CUDA execution provider (``onnxruntime-gpu``)."""
    try:
        ort = require("onnxruntime", extra="onnx", feature="ONNX inference")
    except MissingExtraError:
        return False
    return _CUDA_EP in ort.get_available_providers()


def ort_session(path: Path | bytes, provider: ExecutionProvider, *, threads: int = 0):
    """An ONNX Runtime session for the model file ``path`` (or the model's bytes) on ``provider`` (CUDA
    falls back to the CPU for the ops it lacks)."""
    ort = require("onnxruntime", extra="onnx", feature="ONNX inference")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    providers = [_CUDA_EP, _CPU_EP] if provider is ExecutionProvider.CUDA else [_CPU_EP]
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=opts, providers=providers)


class OrtPredictor:
    """One ONNX Runtime session."""

    backend = "onnxruntime"

    def __init__(self, path: Path | bytes, provider: ExecutionProvider, variant: ModelVariant, *, threads: int = 0,
                 name: str = "") -> None:
        self.session = ort_session(path, provider, threads=threads)
        used = self.session.get_providers()[0]
        self.provider = ExecutionProvider.CUDA if used == _CUDA_EP else ExecutionProvider.CPU
        if provider is ExecutionProvider.CUDA and self.provider is not ExecutionProvider.CUDA:
            log.warning("ONNX Runtime could not use CUDA for %s; running on the CPU",
                        name or getattr(path, "name", "the model"))
        self.variant = variant
        self._input = self.session.get_inputs()[0].name
        self._dtype = np.int64 if "int64" in self.session.get_inputs()[0].type else np.float32

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input: np.ascontiguousarray(x, dtype=self._dtype)})[0]


@dataclass(frozen=True)
class EngineStats:
    version: int | None
    backend: str | None
    provider: ExecutionProvider | None
    variant: ModelVariant | None
    requests: int
    rows: int
    batches: int
    errors: int
    offloaded: int = 0  # rows answered by the fog's offload endpoint
    offload_errors: int = 0  # offload calls that failed (answered locally when a model was loaded)


class InferenceEngine:
    """The agent's inference model (see the module docstring). Thread-safe."""

    def __init__(self, task, settings: InferenceSettings, *, cuda_allowed: bool = True, offload=None,
                 key: bytes | None = None) -> None:
        self.task = task
        self._key = key  # the store key: model files are sealed with it
        self.settings = settings
        self.cuda_allowed = cuda_allowed
        self.offload = offload  # an OffloadClient, used while the plan says offload
        self._offloaded = self._offload_errors = 0
        self._lock = threading.Lock()
        self._files: ModelFiles | None = None
        self._plan: InferencePlan | None = None
        self._predictor: Predictor | None = None
        self._batcher = DynamicBatcher(self._run, max_batch=settings.max_batch_size,
                                       max_wait_s=settings.max_batch_wait_ms / 1000.0)

    @property
    def version(self) -> int | None:
        files = self._files
        return None if files is None else files.version

    @property
    def ready(self) -> bool:
        return self._files is not None or self._offloading

    @property
    def _offloading(self) -> bool:
        plan = self._plan
        return self.offload is not None and plan is not None and plan.offload

    def load(self, files: ModelFiles) -> None:
        """Serve ``files`` from now on (the session is built now, for the current plan)."""
        if files.task != self.task.name:
            raise HyprstreamError(f"model files of task {files.task!r} given to the {self.task.name!r} engine")
        with self._lock:
            plan = self._plan or InferencePlan(ExecutionProvider.CPU, self.settings.model_variant)
            predictor = self._build(files, plan)
            self._files, self._predictor, self._plan = files, predictor, plan
        log.info("inference model %s v%d on %s (%s, %s)", files.task, files.version, predictor.provider.value,
                 predictor.backend, predictor.variant.value)

    def apply(self, plan: InferencePlan) -> None:
        """Switch provider/variant when ``plan`` differs from the current one (no-op otherwise)."""
        with self._lock:
            if plan == self._plan:
                return
            previous, self._plan = self._plan, plan
            if self._files is None:
                return
            if previous is not None and (previous.provider, previous.variant) == (plan.provider, plan.variant):
                return  # only offload changed: the local session stays
            predictor = self._build(self._files, plan)
            self._predictor = predictor
        log.info("inference now on %s (%s, %s)", predictor.provider.value, predictor.backend, predictor.variant.value)

    def _build(self, files: ModelFiles, plan: InferencePlan) -> Predictor:
        provider = plan.provider
        if provider is ExecutionProvider.CUDA and not (self.cuda_allowed and cuda_available()):
            provider = ExecutionProvider.CPU
        path, variant = files.fp32, ModelVariant.FP32
        if plan.variant is ModelVariant.INT8 and files.int8 is not None:
            path, variant = files.int8, ModelVariant.INT8
        from hyprstream.agent.handoff import load_model, read_private

        try:
            model = read_private(path, self._key) if self._key is not None else path
        except StoreError as exc:  # tampered, swapped, sealed under another key or plaintext: never run it
            raise StoreError(f"refusing model file {exc}") from None
        except ValidationError:
            model = path  # unreadable: ONNX Runtime fails on it below, and torch serves
        try:
            return OrtPredictor(model, provider, variant, threads=self.settings.intra_op_threads, name=path.name)
        except Exception as exc:  # MissingExtraError, onnxruntime's own errors (no common base class)
            if files.weights is None:
                raise HyprstreamError(f"ONNX Runtime cannot run {path.name} and there are no weights to "
                                      f"fall back on: {exc}") from exc
            log.warning("ONNX Runtime cannot run %s (%s); falling back to torch", path.name, exc)
            device = "cuda" if provider is ExecutionProvider.CUDA else "cpu"
            try:
                weights = load_model(files.weights, self._key)
            except StoreError as exc:
                raise StoreError(f"refusing model file {exc}") from None
            return TorchPredictor(self.task, weights, device=device)

    def _run(self, x: np.ndarray) -> np.ndarray:
        predictor = self._predictor
        if predictor is None:
            raise HyprstreamError("no inference model loaded yet")
        return predictor(x)

    def predict(self, x: np.ndarray, timeout_s: float | None = 60.0) -> np.ndarray:
        """The model's outputs for the rows of ``x`` (batched with concurrent requests)."""
        if self._predictor is None:
            raise HyprstreamError("no inference model loaded yet")
        return self._batcher(x, timeout_s)

    def classify(self, x: np.ndarray, timeout_s: float | None = 60.0) -> tuple[int | None, np.ndarray, np.ndarray]:
        """``(model version, predictions, scores)`` for the rows of ``x``: from the fog while the plan
        offloads (falling back to the local model when the fog cannot answer), else from the local model."""
        from hyprstream.errors import AuthError, TransportError

        if self._offloading:
            try:
                answer = self.offload.infer(self.task.name, np.asarray(x))
            except (TransportError, AuthError, ValidationError) as exc:
                with self._lock:
                    self._offload_errors += 1
                if self._predictor is None:
                    raise HyprstreamError(f"offload failed and no local model is loaded: {exc}") from None
                log.warning("offload failed, answering locally: %s", exc)
            else:
                with self._lock:
                    self._offloaded += len(answer.predictions)
                return answer.version, answer.predictions, answer.scores
        version = self.version
        pred, score = self.task.interpret(self.predict(x, timeout_s))
        return version, pred, score

    def stats(self) -> EngineStats:
        b = self._batcher.stats()
        p = self._predictor
        return EngineStats(self.version, p.backend if p else None, p.provider if p else None,
                           p.variant if p else None, b.requests, b.rows, b.batches, b.errors,
                           self._offloaded, self._offload_errors)

    def close(self) -> None:
        self._batcher.close()
