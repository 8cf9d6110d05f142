"""``hyprstream fog run``: a Flower SuperLink for the fog's agents plus the fog's ServerApp on it.

The SuperLink (runtime dependency installation off, SuperNode authentication when configured) listens on
``127.0.0.1`` only, with TLS made for loopback; the fog's agents reach its Fleet API, and nothing else of
it, through :class:`~hyprstream.fog.gateway.FleetGateway` on ``superlink.host:port`` (TLS when
configured). ``flwr run`` submits a Flower App whose ServerApp is :mod:`hyprstream.fog.server_app`. The
SuperLink and the run are child processes started and stopped by PID; the gateway is a thread.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from hyprstream import __version__
from hyprstream.errors import ConfigError, HyprstreamError, TransportError
from hyprstream.fog.config import CoreLink, FogConfig
from hyprstream.fog.gateway import (LOOPBACK, FleetGateway, LoopbackTLS, free_loopback_port, listen_error,
                                  loopback_tls)
from hyprstream.fog.server_app import FOG_CONFIG_KEY, STATE_DIR_KEY, STATUS_FILE
from hyprstream.runtime import executable, stop_process

log = logging.getLogger("hyprstream.fog")

# no telemetry, no update check, and never the SuperLink's legacy gRPC Control and Fleet servers (they would
# listen on all interfaces, beside the gateway)
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_INTERNAL_GRPC_CONTROL_API": "0",
              "FLWR_INTERNAL_GRPC_FLEET_API": "0"}

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "hyprstream-fog"
version = "{version}"
description = "Hyprstream fog ServerApp"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "hyprstream"

[tool.flwr.app.components]
serverapp = "hyprstream.fog.server_app:app"
clientapp = "hyprstream.agent.client_app:app"

[tool.flwr.app.config]
{key} = ""
{state_key} = ""
"""


def wait_for_superlink(port: int, tls: LoopbackTLS, proc: subprocess.Popen, timeout_s: float, logs: Path) -> None:
    """Wait until the SuperLink ``proc`` answers ``/health`` on ``127.0.0.1:port`` over TLS with the certificate
    made for it at this start (so it is this fog's SuperLink, not another process on the port)."""
    deadline = time.monotonic() + timeout_s
    context = tls.client_context()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TransportError(f"the SuperLink (pid {proc.pid}) exited with code {proc.returncode} before "
                                 f"listening (logs: {logs})")
        conn = http.client.HTTPSConnection(LOOPBACK, port, context=context, timeout=2.0)
        try:
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        time.sleep(0.2)
    raise TransportError(f"the SuperLink (pid {proc.pid}) did not answer on {LOOPBACK}:{port} after "
                         f"{timeout_s:.0f} s (logs: {logs})")


def check_port_free(host: str, port: int, *, source: str, key: str) -> None:
    """Refuse a port another process listens on (before anything of the fog starts)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the fog's own HTTP servers bind
        try:
            s.bind((host, port))
        except OSError as exc:
            raise listen_error(host, port, exc, source=source, key=key) from None


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def check_core_tls(link: CoreLink, *, source: str, timeout_s: float = 5.0) -> None:
    """Refuse a TLS link to core that cannot work: core's certificate does not verify against
    ``core.tls_root_cert``, or core closes the connection after the handshake because it asks for a client
    certificate (its ``tls.client_ca``) that the fog does not send, or does not accept the one it sends.
    Core unreachable or slow is no error here: the fog waits for core (its pushes wait in the outbox)."""
    parts = urlsplit(link.location)
    if parts.scheme != "grpc+tls" or not parts.hostname or parts.port is None:
        return
    context = ssl.create_default_context(cafile=link.tls_root_cert or None)
    context.set_alpn_protocols(["h2"])  # gRPC
    if link.tls_client_cert:
        context.load_cert_chain(link.tls_client_cert, link.tls_client_key)
    try:
        raw = socket.create_connection((parts.hostname, parts.port), timeout=timeout_s)
    except OSError:
        return
    reason = "closed the connection"
    try:
        with context.wrap_socket(raw, server_hostname=parts.hostname) as tls:
            tls.sendall(HTTP2_PREFACE)
            if tls.recv(1):  # core's first HTTP/2 frame: it took the connection
                return
    except ssl.SSLCertVerificationError as exc:
        raise ConfigError(f"core's certificate at {parts.netloc} does not verify: {exc.verify_message}",
                          source=source, key="core.tls_root_cert") from None
    except ssl.SSLError as exc:
        reason = f"ended the TLS connection ({exc.reason or exc})"
    except OSError as exc:
        if isinstance(exc, TimeoutError):
            return
        reason = f"ended the TLS connection ({exc.strerror or exc})"
    finally:
        raw.close()
    if link.tls_client_cert:
        raise ConfigError(f"core at {parts.netloc} {reason}: it does not accept the client certificate "
                          f"{link.tls_client_cert}", source=source, key="core.tls_client_cert")
    raise ConfigError(f"core at {parts.netloc} {reason}: it asks for a client certificate (mutual TLS, core's "
                      "tls.client_ca); set core.tls_client_cert and core.tls_client_key", source=source,
                      key="core.tls_client_cert")


class FogService:
    """The fog's SuperLink on loopback, its public Fleet API port (:class:`FleetGateway`) and its ServerApp."""

    def __init__(self, cfg: FogConfig, config_path: Path) -> None:
        self.cfg = cfg
        self.config_path = Path(config_path).resolve()
        self.state = Path(cfg.state_dir) if cfg.state_dir else Path(tempfile.mkdtemp(prefix="hyprstream-fog-"))
        self.superlink: subprocess.Popen | None = None
        self.run: subprocess.Popen | None = None
        self.gateway: FleetGateway | None = None
        self.local_port: int | None = None  # the SuperLink's own port on 127.0.0.1 (Control, Runtime, Fleet)

    @property
    def address(self) -> str:
        return f"{self.cfg.superlink.host}:{self.cfg.superlink.port}"

    def _env(self) -> dict[str, str]:
        # The SuperLink starts flwr-serverapp from PATH: make it this environment's.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.state / "flwr-home"), "PATH": path}

    def _check_ports(self) -> None:
        source = str(self.config_path)
        for key, part in (("metrics.port", self.cfg.metrics), ("offload.port", self.cfg.offload)):
            if part.port:
                check_port_free(part.host, part.port, source=source, key=key)

    def start(self, *, ready_timeout_s: float = 60.0) -> None:
        sl = self.cfg.superlink
        self._check_ports()
        check_core_tls(self.cfg.core, source=str(self.config_path))
        home = self.state / "flwr-home"
        app = self.state / "app"
        home.mkdir(parents=True, exist_ok=True)
        app.mkdir(parents=True, exist_ok=True)
        tls = loopback_tls(self.state / "loopback-tls")
        self.local_port = free_loopback_port()
        # takes the public port now: a port another process holds ends the start here
        self.gateway = FleetGateway(sl.host, sl.port, upstream_port=self.local_port, upstream=tls,
                                    certfile=sl.ssl_certfile or None, keyfile=sl.ssl_keyfile or None,
                                    source=str(self.config_path))
        (app / "pyproject.toml").write_text(APP_PYPROJECT.format(version=__version__, key=FOG_CONFIG_KEY,
                                                                    state_key=STATE_DIR_KEY))
        (home / "config.toml").write_text(f'[superlink]\ndefault = "fog"\n\n[superlink.fog]\n'
                                          f'address = "{LOOPBACK}:{self.local_port}"\n'
                                          f'root-certificates = "{tls.ca.resolve()}"\n')
        cmd = [executable("flower-superlink"), "--disable-runtime-dependency-installation",
               "--host", LOOPBACK, "--port", str(self.local_port),
               "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key), "--ssl-ca-certfile", str(tls.ca)]
        if sl.supernode_auth:
            cmd.append("--enable-supernode-auth")
        if sl.database:
            cmd += ["--database", sl.database]
        self.superlink = subprocess.Popen(cmd, env=self._env(), stdout=open(self.state / "superlink.log", "ab"),
                                          stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_superlink(self.local_port, tls, self.superlink, ready_timeout_s, self.state / "superlink.log")
        self.gateway.start()
        log.info("fog %s: SuperLink (pid %d) on %s:%d; its Fleet API on %s", self.cfg.name, self.superlink.pid,
                 LOOPBACK, self.local_port, self.address)
        run_config = f'{FOG_CONFIG_KEY}="{self.config_path}" {STATE_DIR_KEY}="{self.state.resolve()}"'
        (self.state / STATUS_FILE).unlink(missing_ok=True)
        self.run = subprocess.Popen([executable("flwr"), "run", str(app), "fog", "--run-config", run_config,
                                     "--stream"], env=self._env(), stdout=open(self.state / "run.log", "ab"),
                                    stderr=subprocess.STDOUT, start_new_session=True)
        log.info("fog %s: ServerApp submitted (flwr run pid %d); logs in %s", self.cfg.name, self.run.pid, self.state)

    def wait(self) -> int:
        """Wait for the ServerApp's run to end; raises HyprstreamError when it failed."""
        if self.run is None:
            raise HyprstreamError("the fog is not running")
        code = self.run.wait()
        status_file = self.state / STATUS_FILE
        if status_file.exists():
            status = json.loads(status_file.read_text())
            if status.get("status") != "finished":
                raise HyprstreamError(f"the fog's round loop failed: {status.get('error')} "
                                      f"(logs: {self.state / 'run.log'})")
        elif code == 0:
            raise HyprstreamError(f"the fog's ServerApp did not run (logs: {self.state / 'run.log'})")
        return code

    def stop(self) -> None:
        stop_process(self.run)
        if self.gateway is not None:
            self.gateway.stop()
        stop_process(self.superlink)
