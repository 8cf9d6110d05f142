"""The fog's public Flower port: a gateway that lets devices reach the Fleet API and nothing else.

``flower-superlink`` (flwr 1.42) serves its Fleet API (what SuperNodes call), its Control API (register
SuperNode keys, list runs, ``flwr run``: code on the fog host) and its Runtime API (the ServerApp's
link, ServerAppIo) over HTTP on one port; none of them can be bound apart, and the Control API has no
authentication of its own. So the fog runs its SuperLink on loopback (``127.0.0.1``, a free port, TLS
with a certificate made for loopback at each start, :func:`loopback_tls`) and listens on the configured
``superlink.host:port`` itself with :class:`FleetGateway`: ``POST /v1/fleet/<method>`` is passed on to
the SuperLink, headers (SuperNode authentication signs each request in them) and body unchanged; any
other method or path is answered ``403`` without reaching the SuperLink. Connections to the SuperLink are
kept open and reused (each SuperNode asks for messages every few seconds; a TLS handshake per request cost
both processes more than the request itself). The Control and Runtime APIs
are thereby reachable only from the fog host, where ``flwr`` uses the connection that ``hyprstream fog
run`` writes into ``<state_dir>/flwr-home/config.toml``.
"""

from __future__ import annotations

import datetime as dt
import errno
import http.client
import ipaddress
import json
import logging
import os
import re
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hyprstream.errors import ConfigError

log = logging.getLogger("hyprstream.fog.gateway")

LOOPBACK = "127.0.0.1"
FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z-]{0,63}")  # one Fleet API method, no query, no dot segments
REFUSED = ("this port serves the Flower Fleet API only; the fog's Control and ServerAppIo APIs are reachable "
           "from the fog host alone")
MAX_BODY_BYTES = (1 << 31) - 1  # Flower's own message limit
MAX_DRAIN_BYTES = 64 << 20  # of a refused request's body, read and dropped before the answer
CHUNK = 1 << 16
# Upstream connections: one idle for less than POOL_IDLE_S is reused (the SuperLink's uvicorn closes idle ones
# after 5 s); at most POOL_MAX idle ones are kept. A body of at most REPLAYABLE_BYTES is read whole before it
# is sent, so that a request that finds its reused connection closed by the SuperLink goes again on a new one.
POOL_IDLE_S = 2.0
POOL_MAX = 8
REPLAYABLE_BYTES = 1 << 20
_CLOSED = (ConnectionError, ssl.SSLEOFError, ssl.SSLZeroReturnError)  # what a connection closed by its peer raises
# hop-by-hop headers (RFC 9110 7.6.1) and those the gateway sets itself
_NOT_FORWARDED = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                            "trailer", "transfer-encoding", "upgrade", "host", "content-length", "expect"})
_NOT_RETURNED = _NOT_FORWARDED | {"server", "date"}  # http.server writes its own


@dataclass(frozen=True)
class LoopbackTLS:
    """A private CA and a server certificate for ``127.0.0.1`` signed by it (PEM files)."""

    ca: Path
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


def loopback_tls(directory: Path, *, days: int = 3650) -> LoopbackTLS:
    """Make a fresh CA and a ``127.0.0.1`` certificate under ``directory`` (private keys mode 0600; the CA's
    key is not kept: nothing else is ever signed by it)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hyprstream fog loopback CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK)),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    tls = LoopbackTLS(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    tls.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    tls.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tls.key.unlink(missing_ok=True)
    with open(os.open(tls.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return tls


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def listen_error(host: str, port: int, exc: OSError, *, source: str | None, key: str) -> ConfigError:
    """One line for a port the fog cannot listen on, naming the config key."""
    taken = " (another process holds the port)" if exc.errno == errno.EADDRINUSE else ""
    return ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{taken}", source=source, key=key)


class _ClientGone(Exception):
    """A client ended its connection before sending the body it announced."""


def _still_open(sock: socket.socket | None) -> bool:
    """Whether an idle connection's socket is still open: readable while idle means the peer closed it (or
    sent something unasked for)."""
    try:
        return sock is not None and not select.select([sock], [], [], 0)[0]
    except (OSError, ValueError):
        return False


def _read_chunk(body, size: int) -> bytes:
    try:
        chunk = body.read(size)
    except OSError as exc:
        raise _ClientGone(f"reading the client's body failed: {exc}") from None
    if not chunk:
        raise _ClientGone("the client closed the connection before sending its whole body")
    return chunk


def _read_body(body, length: int) -> bytes:
    parts, remaining = [], length
    while remaining:
        chunk = _read_chunk(body, min(CHUNK, remaining))
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    context: ssl.SSLContext | None = None
    handshake_timeout_s = 30.0

    def finish_request(self, request, client_address) -> None:
        # TLS is set up here, in the connection's own thread: a client that stalls its handshake holds
        # only that thread, never the accepting one
        if self.context is not None:
            request.settimeout(self.handshake_timeout_s)
            try:
                request = self.context.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                log.debug("gateway: TLS handshake with %s failed", client_address[0], exc_info=True)
                request.close()
                return
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address) -> None:
        log.debug("gateway: connection from %s ended with an error", client_address[0], exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class FleetGateway:
    """``host:port`` (HTTPS with ``certfile`` and ``keyfile``), passing the Fleet API on to the SuperLink at
    ``127.0.0.1:upstream_port`` (verified with ``upstream``'s CA). The port is taken when constructed
    (``ConfigError`` naming ``superlink.port`` when another process holds it); :meth:`start` listens."""

    def __init__(self, host: str, port: int, *, upstream_port: int, upstream: LoopbackTLS,
                 certfile: str | None = None, keyfile: str | None = None, timeout_s: float = 300.0,
                 source: str | None = None) -> None:
        self.upstream_port = upstream_port
        self._upstream_context = upstream.client_context()
        self.timeout_s = timeout_s
        server = _Server6 if ":" in host else _Server
        self._server = server((host, port), self._handler(), bind_and_activate=False)
        self._source = source
        try:
            self._server.server_bind()
        except OSError as exc:
            self._server.server_close()
            raise listen_error(host, port, exc, source=source, key="superlink.port") from None
        if certfile:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                context.load_cert_chain(certfile, keyfile)
            except (OSError, ssl.SSLError) as exc:
                self._server.server_close()
                raise ConfigError(f"cannot load the TLS certificate or key: {exc}", source=source,
                                  key="superlink.ssl_certfile") from None
            self._server.context = context
        self.host, self.port = self._server.server_address[:2]
        self._thread: threading.Thread | None = None
        self._idle: list[tuple[http.client.HTTPSConnection, float]] = []  # (connection, monotonic time of last use)
        self._pool_lock = threading.Lock()

    def start(self) -> FleetGateway:
        try:
            self._server.server_activate()
        except OSError as exc:
            self._server.server_close()
            raise listen_error(self.host, self.port, exc, source=self._source, key="superlink.port") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="hyprstream-fog-gateway",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()
        with self._pool_lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()

    def _connect(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(LOOPBACK, self.upstream_port, context=self._upstream_context,
                                           timeout=self.timeout_s)

    def _reusable(self) -> http.client.HTTPSConnection | None:
        """An idle upstream connection that is still open, if there is one (the most recently used)."""
        while True:
            with self._pool_lock:
                if not self._idle:
                    return None
                conn, used = self._idle.pop()
            if time.monotonic() - used < POOL_IDLE_S and _still_open(conn.sock):
                return conn
            conn.close()

    def _release(self, conn: http.client.HTTPSConnection) -> None:
        with self._pool_lock:
            if len(self._idle) < POOL_MAX:
                self._idle.append((conn, time.monotonic()))
                return
        conn.close()

    def _forward(self, method: str, path: str, headers: list[tuple[str, str]], length: int, body) -> tuple:
        """The SuperLink's answer: ``(status, reason, headers, body)``."""
        if length > REPLAYABLE_BYTES:
            return self._exchange(self._connect(), method, path, headers, length, body)
        data = _read_body(body, length)
        conn = self._reusable()
        if conn is not None:
            try:
                return self._exchange(conn, method, path, headers, length, data)
            except _CLOSED:  # closed by the SuperLink before it answered: again on a new connection
                log.debug("gateway: a reused connection to the SuperLink was closed; sending %s again", path)
        return self._exchange(self._connect(), method, path, headers, length, data)

    def _exchange(self, conn: http.client.HTTPSConnection, method: str, path: str, headers: list[tuple[str, str]],
                  length: int, body) -> tuple:
        """One request on ``conn`` (``body``: bytes, or a file to read ``length`` bytes from); ``conn`` goes back
        to the pool when the SuperLink keeps it open, else it is closed."""
        keep = False
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            conn.putheader("Content-Length", str(length))
            conn.endheaders()
            if isinstance(body, bytes):
                if body:
                    conn.send(body)
            else:
                remaining = length
                while remaining:
                    chunk = _read_chunk(body, min(CHUNK, remaining))
                    conn.send(chunk)
                    remaining -= len(chunk)
            response = conn.getresponse()
            answer = response.status, response.reason, response.getheaders(), response.read()
            keep = not response.will_close
            return answer
        finally:
            if keep:
                self._release(conn)
            else:
                conn.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = gateway.timeout_s  # idle keep-alive connections end after this

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                if not FLEET_PATH.fullmatch(self.path):
                    return self._refuse(403, REFUSED)
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    return self._refuse(411, "a Content-Length is required")
                try:
                    length = int(self.headers.get("Content-Length", "0"))
                except ValueError:
                    return self._refuse(400, "bad Content-Length")
                if not 0 <= length <= MAX_BODY_BYTES:
                    return self._refuse(413, "request body too large")
                forwarded = [(k, v) for k, v in self.headers.items() if k.lower() not in _NOT_FORWARDED]
                try:
                    status, reason, headers, body = gateway._forward("POST", self.path, forwarded, length, self.rfile)
                except _ClientGone as exc:
                    log.debug("gateway: %s", exc)
                    self.close_connection = True
                    return None
                except (OSError, http.client.HTTPException) as exc:
                    log.warning("gateway: the SuperLink did not answer %s: %s", self.path, exc)
                    return self._refuse(502, "the fog's SuperLink did not answer", drain=False)
                self.send_response(status, reason)
                for name, value in headers:
                    if name.lower() not in _NOT_RETURNED:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return None

            def _refuse(self, code: int, detail: str, *, drain: bool = True) -> None:
                if drain:  # a client still sending its body would miss the answer
                    self._drain()
                data = json.dumps({"detail": detail}).encode()
                self.close_connection = True  # an unread body must not be taken for the next request
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

            def _drain(self) -> None:
                try:
                    left = min(int(self.headers.get("Content-Length", "0")), MAX_DRAIN_BYTES)
                    while left > 0:
                        chunk = self.rfile.read(min(CHUNK, left))
                        if not chunk:
                            return
                        left -= len(chunk)
                except (ValueError, OSError):
                    return

            def _refuse_method(self) -> None:
                self._refuse(403, REFUSED)

            do_GET = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method  # noqa: N815

            def log_message(self, fmt: str, *args) -> None:
                log.debug("gateway %s: " + fmt, self.client_address[0], *args)

        return Handler


__all__ = ["FLEET_PATH", "REFUSED", "FleetGateway", "LoopbackTLS", "free_loopback_port", "listen_error", "loopback_tls"]
