"""Ingestion sources: where data enter the agent. Each hands batches of records to one sink.

A record is a JSON object whose fields the task defines (e.g. ``{"features": [...], "label": 3}``
for digits); a sink is ``sink(source_name, records) -> result`` (the agent's
:class:`~hyprstream.agent.pipeline.Pipeline`), which validates, stores and runs inference.

* :class:`DirectoryWatcher`: files dropped into a directory: ``*.jsonl`` (one record per line),
  ``*.json`` (an object or a list of objects), ``*.csv`` (a header row; numbers become numbers). A
  file is taken once its size and mtime have not changed for one poll (or write it under a name
  starting with ``.`` and rename it). Taken files move to ``done/``, refused ones to ``failed/``
  with a ``.error`` note beside them.
* :class:`HttpSource`: HTTP on loopback for apps on the device (``POST /v1/records`` with a JSON
  object, a list or JSON lines; ``GET /v1/health``; and, given by the agent, ``GET /metrics``,
  ``/healthz`` and ``/readyz``: :mod:`hyprstream.agent.metrics`). :class:`UnixSocketSource`: the same HTTP API on
  a Unix-domain socket (``curl --unix-socket PATH http://agent/v1/records``), for apps that should
  not need a port.
* :class:`MqttSource`: JSON payloads (an object or a list) on MQTT topics.

Sources run in their own threads and stop with :meth:`stop`; none busy-waits.
"""

from __future__ import annotations

import csv
import hmac
import http.server
import io
import ipaddress
import json
import logging
import os
import secrets
import socket
import socketserver
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from hyprstream._extras import require
from hyprstream.errors import ConfigError, HyprstreamError, ValidationError
from hyprstream.observe import Check, answer, send

__all__ = [
    "DirectoryWatcher",
    "HttpSource",
    "IngestResult",
    "MqttSource",
    "Sink",
    "UnixSocketSource",
    "parse_records",
]

log = logging.getLogger("hyprstream.agent.ingest")

MAX_BODY_BYTES = 8 << 20
MAX_FILE_BYTES = 256 << 20


@dataclass(frozen=True)
class IngestResult:
    """What the sink did with one batch of records."""

    accepted: int
    model_version: int | None = None
    predictions: tuple[int, ...] = ()  # one per record when a model ran, else empty
    scores: tuple[float, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "model_version": self.model_version,
                "predictions": list(self.predictions), "scores": [round(s, 6) for s in self.scores]}


Sink = Callable[[str, list[Mapping[str, Any]]], IngestResult]


def parse_records(data: bytes, kind: str) -> list[Mapping[str, Any]]:
    """Records from ``data``: ``kind`` is ``json`` (object or list), ``jsonl`` or ``csv``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError("records must be UTF-8 text") from None
    if kind == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        return [{k: _csv_value(v) for k, v in row.items()} for row in rows]
    try:
        if kind == "jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif kind == "json":
            value = json.loads(text)
            records = value if isinstance(value, list) else [value]
        else:
            raise ValidationError(f"unknown record format {kind!r}")
    except json.JSONDecodeError as exc:
        raise ValidationError(f"bad JSON: {exc}") from None
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ValidationError(f"record {bad}: must be a JSON object")
    return records


def _csv_value(text: str | None) -> Any:
    if text is None or text == "":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


# ---------------------------------------------------------------------------------------------- files


class DirectoryWatcher:
    """Takes record files dropped into ``directory`` (see the module docstring)."""

    SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv"}

    def __init__(self, directory: Path, sink: Sink, *, poll_s: float = 1.0) -> None:
        self.directory = Path(directory)
        self.sink = sink
        self.poll_s = poll_s
        self.name = f"file:{self.directory}"
        self._seen: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        for sub in ("", "done", "failed"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._loop, name="hyprstream-watch", daemon=True)
        self._thread.start()
        log.info("watching %s for record files", self.directory)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.scan()
            except OSError as exc:
                log.warning("cannot scan %s: %s", self.directory, exc)

    def scan(self) -> int:
        """Take every settled file now; returns how many files were taken (done or failed)."""
        taken = 0
        current: dict[str, tuple[int, int]] = {}
        with os.scandir(self.directory) as entries:
            for e in entries:
                suffix = Path(e.name).suffix.lower()
                if e.name.startswith(".") or suffix not in self.SUFFIXES or not e.is_file(follow_symlinks=False):
                    continue
                st = e.stat(follow_symlinks=False)
                sig = (st.st_size, st.st_mtime_ns)
                current[e.name] = sig
                if self._seen.get(e.name) == sig:  # unchanged since the last poll: settled
                    self._take(Path(e.path), self.SUFFIXES[suffix], st.st_size)
                    current.pop(e.name)
                    taken += 1
        self._seen = current
        return taken

    def _take(self, path: Path, kind: str, size: int) -> None:
        try:
            if size > MAX_FILE_BYTES:
                raise ValidationError(f"file is larger than {MAX_FILE_BYTES >> 20} MB")
            records = parse_records(path.read_bytes(), kind)
            result = self.sink(self.name, records)
        except HyprstreamError as exc:
            log.warning("refused %s: %s", path.name, exc)
            target = self.directory / "failed" / path.name
            os.replace(path, target)
            target.with_name(target.name + ".error").write_text(f"{exc}\n")
            return
        os.replace(path, self.directory / "done" / path.name)
        log.debug("took %s: %d record(s)", path.name, result.accepted)


# ---------------------------------------------------------------------------------------------- HTTP


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "hyprstream-agent"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:  # client_address is '' on Unix sockets
        log.debug("http: " + fmt, *args)

    def _reply(self, code: int, body: Mapping[str, Any]) -> None:
        send(self, code, json.dumps(body).encode(), "application/json")

    def _authorized(self) -> bool:
        """With a token configured (TCP), every request must carry ``Authorization: Bearer <token>``."""
        token = getattr(self.server, "token", None)
        if token is None:
            return True
        got = self.headers.get("Authorization", "")
        if hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
            return True
        self._reply(401, {"error": "missing or invalid bearer token"})
        self.close_connection = True
        return False

    def do_GET(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/v1/health":
            self._reply(200, self.server.health())
            return
        check = self.server.check
        if not answer(self, path, self.server.metrics, {"/healthz": check, "/readyz": check} if check else {}):
            self._reply(404, {"error": f"no such endpoint {self.path!r}"})

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        if self.path.rstrip("/") != "/v1/records":
            self._reply(404, {"error": f"no such endpoint {self.path!r}"})
            return
        try:
            length = int(self.headers.get("Content-Length", "-1"))
        except ValueError:
            length = -1
        if length < 0:
            self._reply(411, {"error": "Content-Length required"})
            return
        if length > MAX_BODY_BYTES:
            self._reply(413, {"error": f"body larger than {MAX_BODY_BYTES} bytes"})
            self.close_connection = True
            return
        body = self.rfile.read(length)
        ctype = self.headers.get("Content-Type", "application/json").split(";")[0].strip()
        kind = {"application/x-ndjson": "jsonl", "application/jsonl": "jsonl", "text/csv": "csv"}.get(ctype, "json")
        try:
            result = self.server.sink(self.server.source_name, parse_records(body, kind))
        except ValidationError as exc:
            self._reply(400, {"error": str(exc)})
            return
        except HyprstreamError as exc:
            self._reply(503, {"error": str(exc)})
            return
        self._reply(200, result.to_json())


class _TcpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


class _Tcp6Server(_TcpServer):
    address_family = socket.AF_INET6


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _ServedSource:
    def __init__(self, server, name: str, sink: Sink, health: Callable[[], Mapping[str, Any]],
                 metrics: CollectorRegistry | None = None, check: Check | None = None) -> None:
        server.sink = sink
        server.source_name = name
        server.health = health
        server.metrics = metrics
        server.check = check
        self.server = server
        self.name = name
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 1.0},
                                        name="hyprstream-http", daemon=True)
        self._thread.start()
        log.info("taking records on %s", self.name)

    def stop(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(10)
        self.server.server_close()


def ingest_token(state_dir: Path) -> str:
    """The bearer token of the HTTP record endpoint: ``state_dir/ingest.token`` (created 0600 once)."""
    from hyprstream.durable import write_private_file

    path = Path(state_dir) / "ingest.token"
    if not path.exists():
        write_private_file(path, (secrets.token_urlsafe(32) + "\n").encode())
    return path.read_text().strip()


def _default_health() -> Mapping[str, Any]:
    return {"status": "ok"}


class HttpSource(_ServedSource):
    """The record API over HTTP on a loopback address (refuses any other address). Every request
    must carry ``Authorization: Bearer <token>``: other local users and processes cannot write."""

    def __init__(self, sink: Sink, *, token: str, host: str = "127.0.0.1", port: int = 0,
                 health: Callable[[], Mapping[str, Any]] = _default_health, metrics: CollectorRegistry | None = None,
                 check: Check | None = None) -> None:
        if not token:
            raise ConfigError("the record endpoint needs a bearer token", source="--listen")
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError(f"the record endpoint listens on loopback only, got {host!r}", source="--listen")
        server_cls = _Tcp6Server if ":" in host else _TcpServer
        try:
            server = server_cls((host, port), _Handler)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror} (another agent on this host: give "
                              "each its own --listen PORT, or --no-listen)", source="--listen") from None
        server.token = token
        self.port = server.server_address[1]
        super().__init__(server, f"http://{host}:{self.port}", sink, health, metrics, check)


class UnixSocketSource(_ServedSource):
    """The record API over HTTP on a Unix-domain socket (mode 0660)."""

    def __init__(self, path: Path, sink: Sink, *, health: Callable[[], Mapping[str, Any]] = _default_health,
                 metrics: CollectorRegistry | None = None, check: Check | None = None) -> None:
        self.path = Path(path)
        if self.path.exists() or self.path.is_symlink():
            if not self.path.is_socket():
                raise ConfigError(f"{self.path} exists and is not a socket", source="--socket")
            self.path.unlink()
        try:
            server = _UnixServer(str(self.path), _Handler)
            os.chmod(self.path, 0o660)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.path}: {exc.strerror}", source="--socket") from None
        super().__init__(server, f"unix:{self.path}", sink, health, metrics, check)

    def stop(self) -> None:
        super().stop()
        self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- MQTT


class MqttSource:
    """JSON records from MQTT ``topics`` (wildcards allowed) on ``broker``, QoS 1."""

    def __init__(self, broker, topics: Sequence[str], sink: Sink, *, client_id: str) -> None:
        mqtt = require("paho.mqtt.client", extra="mqtt", feature="MQTT ingestion")
        if not topics:
            raise ConfigError("MQTT ingestion needs at least one topic", source="--subscribe")
        self.broker = broker
        self.topics = tuple(topics)
        self.sink = sink
        self.name = f"mqtt://{broker.host}:{broker.port}"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        client.reconnect_delay_set(1, 60)
        if broker.username is not None:
            client.username_pw_set(broker.username, broker.password)
        if broker.ca_file is not None:
            client.tls_set(ca_certs=str(broker.ca_file),
                           certfile=str(broker.cert_file) if broker.cert_file else None,
                           keyfile=str(broker.key_file) if broker.key_file else None)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        self._client = client
        self.subscribed = threading.Event()
        client.on_subscribe = lambda *a: self.subscribed.set()

    def start(self) -> None:
        self._client.connect_async(self.broker.host, self.broker.port, keepalive=self.broker.keepalive_s)
        self._client.loop_start()
        log.info("taking records from MQTT topics %s", list(self.topics))

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT ingestion: broker refused the connection: %s", reason_code)
            return
        client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client, userdata, msg) -> None:
        try:
            self.sink(f"mqtt:{msg.topic}", parse_records(bytes(msg.payload), "json"))
        except HyprstreamError as exc:
            log.warning("refused records from %s: %s", msg.topic, exc)
