"""The fog gateway's upstream side, in process: requests pass through on kept-open connections to the
SuperLink, and a request whose reused connection the SuperLink had closed goes again on a new one."""

from __future__ import annotations

import http.client
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hyprstream.fog import gateway as gw
from hyprstream.fog.gateway import FleetGateway, free_loopback_port, loopback_tls

pytestmark = pytest.mark.integration


class Upstream:
    """An HTTPS server on loopback standing in for the SuperLink: answers every POST with its path and body,
    counts the connections it accepted, and closes a connection idle for ``idle_s`` (as uvicorn does)."""

    def __init__(self, tls, idle_s: float = 30.0) -> None:
        self.connections = 0
        self.requests: list[tuple[str, int]] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = idle_s

            def setup(self) -> None:
                upstream.connections += 1
                super().setup()

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                upstream.requests.append((self.path, len(body)))
                answer = self.path.encode() + b"|" + body
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                """Quiet: the test reads ``requests``, not the server's access log."""

        self.server = ThreadingHTTPServer((gw.LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.cert, tls.key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def through(tmp_path):
    """(post, upstream, gateway) for an upstream made by the test: ``post(path, body)`` goes through the
    gateway on a new client connection each time, as the SuperNodes' polls do."""
    made = []

    def start(idle_s: float = 30.0):
        tls = loopback_tls(tmp_path / f"tls-{len(made)}")
        upstream = Upstream(tls, idle_s)
        gateway = FleetGateway(gw.LOOPBACK, free_loopback_port(), upstream_port=upstream.port, upstream=tls,
                               timeout_s=30).start()
        made.append((upstream, gateway))

        def post(path: str, body: bytes) -> tuple[int, bytes]:
            conn = http.client.HTTPConnection(gw.LOOPBACK, gateway.port, timeout=30)
            try:
                conn.request("POST", path, body=body)
                response = conn.getresponse()
                return response.status, response.read()
            finally:
                conn.close()

        return post, upstream, gateway

    yield start
    for upstream, gateway in made:
        gateway.stop()
        upstream.close()


def test_requests_share_one_upstream_connection(through):
    post, upstream, _ = through()
    for i in range(5):
        assert post("/v1/fleet/pull-messages", b"x" * i) == (200, b"/v1/fleet/pull-messages|" + b"x" * i)
    assert upstream.connections == 1
    assert upstream.requests == [("/v1/fleet/pull-messages", i) for i in range(5)]


def test_a_large_body_streams_through(through):
    post, upstream, _ = through()
    body = bytes(range(256)) * ((gw.REPLAYABLE_BYTES >> 8) + 3)
    assert post("/v1/fleet/push-object", body) == (200, b"/v1/fleet/push-object|" + body)
    assert post("/v1/fleet/push-object", b"small") == (200, b"/v1/fleet/push-object|small")
    assert upstream.requests == [("/v1/fleet/push-object", len(body)), ("/v1/fleet/push-object", 5)]


def test_an_idle_connection_the_superlink_closed_is_not_used(through):
    post, upstream, _ = through(idle_s=0.2)
    assert post("/v1/fleet/get-run", b"a")[0] == 200
    time.sleep(0.6)  # the upstream closed the idle connection
    assert post("/v1/fleet/get-run", b"b") == (200, b"/v1/fleet/get-run|b")
    assert upstream.connections == 2


def test_a_request_whose_reused_connection_was_closed_goes_again(through, monkeypatch):
    post, upstream, _ = through(idle_s=0.2)
    assert post("/v1/fleet/get-run", b"a")[0] == 200
    time.sleep(0.6)
    # the close is not seen before sending (as when the SuperLink closes the connection just then)
    monkeypatch.setattr(gw, "_still_open", lambda sock: True)
    assert post("/v1/fleet/get-run", b"b") == (200, b"/v1/fleet/get-run|b")
    assert upstream.requests == [("/v1/fleet/get-run", 1), ("/v1/fleet/get-run", 1)]
    assert upstream.connections == 2
