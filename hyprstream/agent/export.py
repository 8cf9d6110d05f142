"""Export of a global model version to ONNX (fp32) and its int8 variant, for ONNX Runtime.

* fp32: ``torch.onnx.export`` (TorchScript exporter, opset 17), one input ``input`` and one output
  ``output``, both with a dynamic batch dimension.
* int8: with ``onnxruntime.quantization``. A graph with convolutions is quantized statically in QDQ
  format (per-channel weights, activations calibrated with MinMax on real inputs: rows from the
  device's store, else the task's example inputs); a graph of linear layers only (MLPs,
  transformers) is quantized dynamically (int8 weights, activations quantized at run time).

The agent daemon never imports torch itself: it runs the export in a child process
(:func:`export_in_subprocess`, ``python -m hyprstream.agent.export``), at a lower CPU priority and
with a thread limit, so a model update never takes the device's cores from its own job and the
daemon's memory stays small.

Device data stays off the disk: calibration inputs are asked for only when the static quantizer needs
them (the child writes ``calibration`` on its stdout; the daemon answers with a ``.npy`` array on its
stdin), and the exporter and quantizer work in a private scratch directory in memory (``/dev/shm``
where there is one with room for the model; else the system's temporary directory), removed when the
export ends. The finished files are written with
:func:`~hyprstream.agent.handoff.write_private`: sealed with the store key when the store is encrypted.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hyprstream._extras import require
from hyprstream.errors import HyprstreamError, ValidationError
from hyprstream.learning.export import INPUT, export_onnx
from hyprstream.store.crypto import KEY_ENV_VAR, load_key

__all__ = ["ModelFiles", "export_in_subprocess", "export_onnx", "export_version", "quantize_int8"]

log = logging.getLogger("hyprstream.agent.inference")

MANIFEST = "manifest.json"
CALIBRATION_REQUEST = b"calibration"
SCRATCH_ROOT = Path("/dev/shm")

Calibration = np.ndarray | Callable[[], np.ndarray | None] | None
"""Calibration inputs, or a function that gives them when (and only if) static quantization needs them."""


@dataclass(frozen=True)
class ModelFiles:
    """The ONNX files of one model version."""

    task: str
    version: int
    fp32: Path
    int8: Path | None
    quantization: str  # "static-qdq", "dynamic" or "none"
    weights: Path | None = None  # the layer-table file exported from (torch fallback)

    def to_json(self) -> dict:
        return {"task": self.task, "version": self.version, "fp32": str(self.fp32),
                "int8": str(self.int8) if self.int8 else None, "quantization": self.quantization,
                "weights": str(self.weights) if self.weights else None}

    @classmethod
    def from_json(cls, data: Mapping) -> ModelFiles:
        try:
            return cls(str(data["task"]), int(data["version"]), Path(data["fp32"]),
                       Path(data["int8"]) if data.get("int8") else None, str(data["quantization"]),
                       Path(data["weights"]) if data.get("weights") else None)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidationError(f"bad model manifest: {exc}") from None


def scratch_dir(need_bytes: int) -> tempfile.TemporaryDirectory:
    """A private temporary directory (mode 0700) in memory (``/dev/shm``) where the system has one with
    ``need_bytes`` free, else in the system's temporary directory."""
    root = None
    if SCRATCH_ROOT.is_dir() and os.access(SCRATCH_ROOT, os.W_OK | os.X_OK):
        if shutil.disk_usage(SCRATCH_ROOT).free >= need_bytes:
            root = SCRATCH_ROOT
        else:
            log.warning("%s has less than %d MB free: the export works in %s", SCRATCH_ROOT, need_bytes >> 20,
                        tempfile.gettempdir())
    return tempfile.TemporaryDirectory(prefix="hyprstream-export-", dir=root)


def scratch_bytes(weights: Mapping[str, np.ndarray]) -> int:
    """Room the export of ``weights`` needs: the fp32 model, its pre-processed copy, the quantizer's
    augmented model and the int8 model, with margin."""
    return 4 * sum(np.asarray(w).nbytes for w in weights.values()) + (64 << 20)


def _has_convolutions(path: Path) -> bool:
    onnx = require("onnx", extra="onnx", feature="int8 model export")
    graph = onnx.load(str(path), load_external_data=False).graph
    return any(node.op_type in {"Conv", "ConvTranspose"} for node in graph.node)


def quantize_int8(fp32: Path, int8: Path, *, calibration: Calibration) -> str:
    """Write the int8 variant of ``fp32``; returns the method (``static-qdq`` or ``dynamic``).
    ``calibration`` is read (called) only for static quantization."""
    q = require("onnxruntime.quantization", extra="onnx", feature="int8 quantization")
    source = int8.with_name(int8.stem + ".prep.onnx")
    try:  # shape inference and graph optimisation first, as onnxruntime recommends
        q.quant_pre_process(str(fp32), str(source))
    except Exception as exc:  # optional step; its failures are onnx/onnxruntime errors of many kinds
        log.debug("quantization pre-processing skipped: %s", exc)
        source = fp32
    try:
        return _quantize(q, source, int8, calibration)
    finally:
        if source != fp32:
            source.unlink(missing_ok=True)


def _quantize(q, fp32: Path, int8: Path, calibration: Calibration) -> str:
    if _has_convolutions(fp32):
        if callable(calibration):
            calibration = calibration()
        if calibration is None or len(calibration) == 0:
            raise ValidationError("static quantization needs calibration inputs")

        class Reader(q.CalibrationDataReader):
            def __init__(self, data: np.ndarray, batch: int = 32) -> None:
                self._batches = iter([{INPUT: data[i:i + batch]} for i in range(0, len(data), batch)])

            def get_next(self):
                return next(self._batches, None)

        q.quantize_static(str(fp32), str(int8), Reader(calibration), quant_format=q.QuantFormat.QDQ,
                          per_channel=True, activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8)
        return "static-qdq"
    q.quantize_dynamic(str(fp32), str(int8), weight_type=q.QuantType.QInt8)
    return "dynamic"


def export_version(task_name: str, version: int, weights: Mapping[str, np.ndarray], out_dir: Path, *,
                   calibration: Calibration = None, int8: bool = True,
                   weights_file: Path | None = None, key: bytes | None = None) -> ModelFiles:
    """Export ``weights`` of ``task_name`` at ``version`` into ``out_dir`` (fp32 and, if asked, int8).

    ``calibration``: device inputs for static int8 quantization (fewer than 8 rows: the task's example
    inputs). ``key``: the store key; the model files are then sealed with it (see the module docstring).
    """
    from hyprstream.agent.handoff import write_private
    from hyprstream.learning.task import get_task
    from hyprstream.learning.trainer import load_weights

    task = get_task(task_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = task.build_model(seed=0)
    load_weights(model, weights)

    def calibration_inputs() -> np.ndarray:
        data = calibration() if callable(calibration) else calibration
        return data if data is not None and len(data) >= 8 else task.example_input(128, seed=version)

    fp32, int8_path, method = out_dir / "model.fp32.onnx", None, "none"
    with scratch_dir(scratch_bytes(weights)) as scratch:
        work = Path(scratch)
        export_onnx(task, model, work / fp32.name)
        if int8:
            int8_path = out_dir / "model.int8.onnx"
            method = quantize_int8(work / fp32.name, work / int8_path.name, calibration=calibration_inputs)
        for path in (fp32, int8_path):
            if path is not None:
                write_private(path, (work / path.name).read_bytes(), key)
    files = ModelFiles(task.name, version, fp32, int8_path, method, weights_file)
    (out_dir / MANIFEST).write_text(json.dumps(files.to_json()))
    return files


def read_manifest(out_dir: Path) -> ModelFiles:
    try:
        return ModelFiles.from_json(json.loads((out_dir / MANIFEST).read_text()))
    except (OSError, ValueError) as exc:
        raise ValidationError(f"{out_dir}: no readable model manifest: {exc}") from None


def export_in_subprocess(task_name: str, version: int, weights_file: Path, out_dir: Path, *,
                         calibration: Callable[[], np.ndarray | None] | None = None, int8: bool = True,
                         key: bytes | None = None, threads: int = 1, nice: int = 10, timeout_s: float = 900.0,
                         cancel: threading.Event | None = None) -> ModelFiles:
    """Run :func:`export_version` in a child Python process (see the module docstring).

    ``calibration`` is called (in a helper thread) only when the child asks for calibration inputs;
    ``key`` (the store key) reaches the child in its environment. The child is killed when ``cancel``
    is set or after ``timeout_s``; either raises HyprstreamError.
    """
    cmd = [sys.executable, "-m", "hyprstream.agent.export", "--task", task_name, "--version", str(version),
           "--weights", str(weights_file), "--out", str(out_dir), "--threads", str(threads), "--nice", str(nice)]
    if calibration is not None:
        cmd.append("--calibration-pipe")
    if not int8:
        cmd.append("--no-int8")
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV_VAR}
    env.update({"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"})
    if key is not None:
        env[KEY_ENV_VAR] = key.hex()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, env=env)
        feeder = threading.Thread(target=_answer_calibration, args=(proc, calibration),
                                  name="hyprstream-export-calibration", daemon=True)
        feeder.start()
        try:
            while True:
                try:
                    proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if cancel is not None and cancel.is_set():
                        raise HyprstreamError(f"exporting {task_name} v{version} was cancelled") from None
                    if time.monotonic() - started > timeout_s:
                        raise HyprstreamError(f"exporting {task_name} v{version} took over {timeout_s:.0f} s") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            feeder.join()
            proc.stdout.close()
        if proc.returncode != 0:
            errors.seek(0)
            lines = errors.read().decode(errors="replace").strip().splitlines()
            raise HyprstreamError(f"exporting {task_name} v{version} failed: {lines[-1] if lines else proc.returncode}")
    files = read_manifest(out_dir)
    log.info("exported %s v%d to ONNX (int8: %s) in %.1f s", task_name, version, files.quantization,
             time.monotonic() - started)
    return files


def _answer_calibration(proc: subprocess.Popen, calibration: Callable[[], np.ndarray | None] | None) -> None:
    """Parent side of the calibration pipe: answer the child's request (if it makes one), then close its stdin."""
    try:
        for line in proc.stdout:
            if line.strip() == CALIBRATION_REQUEST and calibration is not None:
                try:
                    data = calibration()
                except HyprstreamError as exc:  # the child then fails, naming the missing inputs
                    log.warning("no calibration inputs for the export: %s", exc)
                    break
                buf = io.BytesIO()
                np.save(buf, data if data is not None else np.empty((0,), np.float32), allow_pickle=False)
                proc.stdin.write(buf.getvalue())
                break
    except OSError:  # the child is gone (killed or failed): its exit status tells why
        pass
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass


def _request_calibration() -> np.ndarray:
    """Child side of the calibration pipe: ask the parent for the inputs and read them from stdin."""
    sys.stdout.buffer.write(CALIBRATION_REQUEST + b"\n")
    sys.stdout.buffer.flush()
    data = sys.stdin.buffer.read()
    if not data:
        raise HyprstreamError("the agent sent no calibration inputs")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise HyprstreamError(f"unreadable calibration inputs from the agent: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyprstream.agent.export",
                                     description="Export a saved global model version to ONNX (fp32 and int8).")
    parser.add_argument("--task", required=True)
    parser.add_argument("--version", type=int, required=True)
    parser.add_argument("--weights", type=Path, required=True, help="layer-table file (Arrow IPC)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calibration-pipe", action="store_true",
                        help="ask for calibration inputs on stdout and read them (.npy) from stdin when needed")
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nice", type=int, default=0)
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    import warnings

    import torch

    from hyprstream.agent.handoff import load_model

    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, args.threads))
    try:
        key = load_key()
        weights = load_model(args.weights, key)
        with scratch_dir(scratch_bytes(weights)) as scratch:
            tempfile.tempdir = scratch  # onnxruntime's quantizer keeps its own temporary models there
            export_version(args.task, args.version, weights, args.out,
                           calibration=_request_calibration if args.calibration_pipe else None,
                           int8=not args.no_int8, weights_file=args.weights, key=key)
    except HyprstreamError as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
