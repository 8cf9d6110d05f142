"""Inference offload: the fog runs the current global model for agents that cannot (``minimal`` strategy).

:class:`OffloadServer` serves one endpoint over HTTP (standard library ``ThreadingHTTPServer``; HTTPS
when given a certificate and key)::

    POST /v1/infer
    Authorization: Bearer <token>
    Content-Type: application/json

    {"task": "digits", "inputs": [[...], ...]}

    200 {"model": "m", "version": 7, "task": "digits", "predictions": [3, ...], "scores": [0.97, ...]}

``inputs`` is a list of rows, each of the task's input shape (``Task.example_input``). Errors are
JSON ``{"error": "..."}``: 401 without a valid token (tokens: one per line of a file, ``#`` comments;
compared with :func:`hmac.compare_digest`), 404 for another path, 413 for a body over ``max_body_bytes``
or more than ``max_rows`` rows, 400 for a body that is not JSON, names another task, or whose rows
are ragged, of the wrong shape or not finite numbers, 503 while no model could be pulled from core.

The model is the task's torch model with the master weights pulled from core
(:class:`~hyprstream.learning.predictor.TorchPredictor`, the agent's own reference engine). The fog asks
core for the model's head version at most every ``refresh_s`` seconds and pulls the weights again
when it changed; requests are answered with the version their predictions came from. Inputs and
outputs are never logged.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from hyprstream.protocol import INFER_SCHEMA
from hyprstream.coreapi.client import CoreClient
from hyprstream.observe import ServerThread
from hyprstream.errors import ConfigError, HyprstreamError, ValidationError
from hyprstream.store import layer_table as lt

log = logging.getLogger("hyprstream.fog.offload")

INFER_PATH = "/v1/infer"


def read_tokens(path: str | Path) -> tuple[str, ...]:
    """Bearer tokens, one per line (blank lines and ``#`` comments skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the token file: {exc.strerror or exc}", source=str(path)) from None
    tokens = tuple(t for t in (line.strip() for line in lines) if t and not t.startswith("#"))
    if not tokens:
        raise ConfigError("the token file holds no token", source=str(path))
    return tokens


@dataclass(frozen=True)
class ServedModel:
    version: int
    predictor: object  # TorchPredictor


class ModelSource:
    """The current global model of ``model`` at core, as a predictor; refreshed when core's head moves."""

    def __init__(self, core: CoreClient, model: str, task, *, refresh_s: float = 5.0) -> None:
        if refresh_s < 0:
            raise ValidationError(f"refresh_s must be >= 0, got {refresh_s}")
        self.core, self.model, self.task, self.refresh_s = core, model, task, refresh_s
        self._lock = threading.Lock()
        self._served: ServedModel | None = None
        self._checked = -math.inf

    def current(self) -> ServedModel:
        """The model to answer with; raises HyprstreamError while none could be pulled."""
        from hyprstream.learning.predictor import TorchPredictor

        with self._lock:  # one request pulls; the others wait for it and use its model
            if time.monotonic() - self._checked >= self.refresh_s or self._served is None:
                try:
                    head = int(self.core.head(self.model)["version"])
                    if self._served is None or head != self._served.version:
                        snapshot = self.core.get_weights(self.model, version=head)
                        weights = lt.to_arrays(snapshot.table, copy=True)
                        self._served = ServedModel(snapshot.version, TorchPredictor(self.task, weights))
                        log.info("offload: serving %s version %d", self.model, snapshot.version)
                    self._checked = time.monotonic()
                except HyprstreamError as exc:
                    if self._served is None:
                        raise HyprstreamError(f"no model to serve yet: {exc}") from None
                    log.warning("offload: cannot refresh %s from core, serving version %d: %s", self.model,
                                self._served.version, exc)
            return self._served


class _HTTPError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # connections the client dropped (an unread body refused with 413, a failed TLS handshake)
        log.debug("offload: connection from %s ended with an error", client_address[0], exc_info=True)


class OffloadServer:
    """``POST /v1/infer`` on ``host:port`` in a daemon thread (see the module docstring)."""

    def __init__(self, source: ModelSource, tokens: tuple[str, ...], *, host: str = "127.0.0.1", port: int = 0,
                 certfile: str | None = None, keyfile: str | None = None, max_rows: int = 256,
                 max_body_bytes: int = 1 << 20) -> None:
        if not tokens or any(not t for t in tokens):
            raise ConfigError("the offload endpoint needs at least one non-empty token", key="offload.token_file")
        if (certfile is None) != (keyfile is None):
            raise ConfigError("TLS needs both tls_certfile and tls_keyfile", key="offload.tls_certfile")
        if max_rows < 1 or max_body_bytes < 1:
            raise ValidationError("max_rows and max_body_bytes must be >= 1")
        self.source = source
        self._tokens = tuple(f"Bearer {t}".encode() for t in tokens)
        self.max_rows, self.max_body_bytes = max_rows, max_body_bytes
        shape = source.task.example_input(1).shape[1:]
        self.row_shape = tuple(int(d) for d in shape)
        self._counts = {"requests": 0, "refused": 0}
        self._count_lock = threading.Lock()
        handler = self._handler()
        try:
            self._server = _Server((host, port), handler)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", key="offload.port") from None
        self.tls = certfile is not None
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                context.load_cert_chain(certfile, keyfile)
            except (OSError, ssl.SSLError) as exc:
                self._server.server_close()
                raise ConfigError(f"cannot load the TLS certificate or key: {exc}",
                                  key="offload.tls_certfile") from None
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.host, self.port = self._server.server_address[:2]
        self._serving = ServerThread(self._server, "hyprstream-offload")
        self.on_stop = None  # called once by stop() (offload_server closes its core client there)

    def _count(self, name: str) -> None:
        with self._count_lock:
            self._counts[name] += 1

    def counts(self) -> dict[str, int]:
        """Requests received and refused (any 4xx/5xx answer) since the start."""
        with self._count_lock:
            return dict(self._counts)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}{INFER_PATH}"

    def start(self) -> OffloadServer:
        self._serving.start()
        log.info("offload endpoint on %s", self.url)
        return self

    def stop(self) -> None:
        self._serving.stop()
        if self.on_stop is not None:
            self.on_stop()
            self.on_stop = None

    def __enter__(self) -> OffloadServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -------------------------------------------------------------------- request handling

    def authorized(self, header: str | None) -> bool:
        got = (header or "").encode()
        ok = False
        for token in self._tokens:  # every token compared: the time does not tell which one matched
            ok |= hmac.compare_digest(got, token)
        return ok

    def infer(self, body: bytes) -> dict:
        """The answer to one request body (raises _HTTPError)."""
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _HTTPError(400, f"body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise _HTTPError(400, "body must be a JSON object")
        extra = sorted(set(data) - {"task", "inputs", "schema"})
        if extra:
            raise _HTTPError(400, f"unknown key(s) {extra}; expected 'task' and 'inputs'")
        task = self.source.task
        if data.get("task") != task.name:
            raise _HTTPError(400, f"this fog serves task {task.name!r}, not {data.get('task')!r}")
        inputs = data.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise _HTTPError(400, "'inputs' must be a non-empty list of rows")
        if len(inputs) > self.max_rows:
            raise _HTTPError(413, f"{len(inputs)} rows exceed the limit of {self.max_rows} per request")
        try:
            x = np.array(inputs, dtype=np.float32)
        except (ValueError, TypeError):
            raise _HTTPError(400, f"'inputs' must be rows of numbers of shape {list(self.row_shape)}") from None
        if x.shape[1:] != self.row_shape:
            raise _HTTPError(400, f"each row must have shape {list(self.row_shape)}, got {list(x.shape[1:])}")
        if not np.isfinite(x).all():
            raise _HTTPError(400, "'inputs' must be finite numbers")
        try:
            served = self.source.current()
        except HyprstreamError as exc:
            raise _HTTPError(503, str(exc)) from None
        outputs = served.predictor(x)
        predictions, scores = task.interpret(outputs)
        return {"schema": INFER_SCHEMA, "model": self.source.model, "version": served.version, "task": task.name,
                "predictions": predictions.tolist(), "scores": [float(s) for s in scores]}

    def _handler(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                outer._count("requests")
                try:
                    if self.path != INFER_PATH:
                        raise _HTTPError(404, f"no such endpoint {self.path!r}; use POST {INFER_PATH}")
                    if not outer.authorized(self.headers.get("Authorization")):
                        raise _HTTPError(401, "missing or invalid bearer token")
                    length = self.headers.get("Content-Length")
                    if length is None or not length.isdigit():
                        raise _HTTPError(411, "Content-Length is required")
                    if int(length) > outer.max_body_bytes:
                        raise _HTTPError(413, f"body of {length} bytes exceeds the limit of "
                                              f"{outer.max_body_bytes} bytes")
                    answer = outer.infer(self.rfile.read(int(length)))
                    self._send(200, answer)
                except _HTTPError as exc:
                    outer._count("refused")
                    if exc.code in (401, 411, 413):
                        self.close_connection = True  # the body was not read
                    self._send(exc.code, {"error": str(exc)})
                except Exception:  # a bug must not leave the agent without an answer
                    outer._count("refused")
                    log.exception("offload: request failed")
                    self.close_connection = True
                    self._send(500, {"error": "internal error of the offload endpoint"})

            def do_GET(self) -> None:  # noqa: N802
                self._send(405, {"error": f"use POST {INFER_PATH}"})

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if code == 401:
                    self.send_header("WWW-Authenticate", 'Bearer realm="hyprstream-offload"')
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, fmt: str, *args) -> None:
                log.debug("offload %s: " + fmt, self.client_address[0], *args)

        return Handler


def offload_server(cfg) -> OffloadServer:
    """The offload endpoint of a fog's config (``[offload]``), with its own core client (closed by
    :meth:`OffloadServer.stop`); not started."""
    from hyprstream.learning.task import get_task
    from hyprstream.fog.config import read_token

    o = cfg.offload
    core = CoreClient(cfg.core.location, read_token(cfg.core.token_file), **cfg.core.flight_options())
    try:
        server = OffloadServer(ModelSource(core, cfg.core.model, get_task(cfg.rounds.task), refresh_s=o.refresh_s),
                               read_tokens(o.token_file), host=o.host, port=o.port,
                               certfile=o.tls_certfile or None, keyfile=o.tls_keyfile or None,
                               max_rows=o.max_rows, max_body_bytes=o.max_body_bytes)
    except BaseException:
        core.close()
        raise
    server.on_stop = core.close
    return server


__all__ = ["INFER_PATH", "INFER_SCHEMA", "ModelSource", "OffloadServer", "ServedModel", "offload_server",
           "read_tokens"]
