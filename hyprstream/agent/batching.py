"""Dynamic batching: requests that arrive close together run as one model call.

:class:`DynamicBatcher` takes requests of one or more rows (``submit``), and a worker thread runs
them together: it starts a batch with the first waiting request and adds whatever arrives until the
batch holds ``max_batch`` rows or ``max_wait_s`` has passed since the batch was started, then
runs the model once on the stacked rows and hands each request its own rows of the output. A
request larger than ``max_batch`` runs alone. The worker thread starts with the first request, so an
idle agent has no thread spinning (it waits on a queue).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from hyprstream.errors import HyprstreamError, ValidationError

__all__ = ["BatcherStats", "DynamicBatcher"]

log = logging.getLogger("hyprstream.agent.inference")

_STOP = object()


@dataclass(frozen=True)
class BatcherStats:
    requests: int
    rows: int
    batches: int
    errors: int


class DynamicBatcher:
    """Batches :meth:`submit` calls into calls of ``run`` (see the module docstring)."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], *, max_batch: int, max_wait_s: float,
                 name: str = "hyprstream-batcher") -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ValidationError(f"max_batch must be >= 1 and max_wait_s >= 0, got {max_batch}, {max_wait_s}")
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._name = name
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._requests = self._rows = self._batches = self._errors = 0

    def submit(self, x: np.ndarray) -> Future:
        """Queue ``x`` (shape ``(n, ...)``, n >= 1); the future gets the model's ``n`` output rows."""
        x = np.asarray(x)
        if x.ndim < 1 or len(x) == 0:
            raise ValidationError("an inference request needs at least one row")
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise HyprstreamError("the inference batcher is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker, name=self._name, daemon=True)
                self._thread.start()
            self._requests += 1
            self._rows += len(x)
        self._queue.put((x, fut))
        return fut

    def __call__(self, x: np.ndarray, timeout_s: float | None = None) -> np.ndarray:
        """Submit ``x`` and wait for its outputs."""
        return self.submit(x).result(timeout_s)

    def stats(self) -> BatcherStats:
        with self._lock:
            return BatcherStats(self._requests, self._rows, self._batches, self._errors)

    def close(self, timeout_s: float = 10.0) -> None:
        """Run what is queued, then stop the worker."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout_s)

    def _worker(self) -> None:
        carry = None
        while True:
            item = carry if carry is not None else self._queue.get()
            carry = None
            if item is _STOP:
                return
            batch = [item]
            rows = len(item[0])
            deadline = time.monotonic() + self.max_wait_s
            stop = False
            while rows < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                if rows + len(nxt[0]) > self.max_batch:
                    carry = nxt
                    break
                batch.append(nxt)
                rows += len(nxt[0])
            self._execute(batch)
            if stop:
                return

    def _execute(self, batch: list[tuple[np.ndarray, Future]]) -> None:
        live = [(x, f) for x, f in batch if f.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            stacked = live[0][0] if len(live) == 1 else np.concatenate([x for x, _ in live])
            out = self._run(stacked)
            if len(out) != len(stacked):
                raise HyprstreamError(f"the model returned {len(out)} rows for {len(stacked)}")
        except Exception as exc:  # handed to every waiting caller; the worker keeps serving
            with self._lock:
                self._errors += 1
            log.warning("inference batch of %d request(s) failed: %s", len(live), exc)
            for _, f in live:
                f.set_exception(exc)
            return
        with self._lock:
            self._batches += 1
        start = 0
        for x, f in live:
            f.set_result(out[start:start + len(x)])
            start += len(x)
