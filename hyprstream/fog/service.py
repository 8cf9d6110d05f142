"""``hyprstream fog run``: a Flower SuperLink for the fog's agents plus the fog's ServerApp on it.

The SuperLink (runtime dependency installation off, TLS and SuperNode authentication when configured)
serves the fog's SuperNodes; ``flwr run`` submits a Flower App whose ServerApp is
:mod:`hyprstream.fog.server_app`. Both are child processes started and stopped by PID.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hyprstream import __version__
from hyprstream.errors import HyprstreamError, TransportError
from hyprstream.fog.config import FogConfig
from hyprstream.fog.server_app import FOG_CONFIG_KEY, STATE_DIR_KEY, STATUS_FILE

log = logging.getLogger("hyprstream.fog")

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}

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


def executable(name: str) -> str:
    """A Flower command: beside this Python (its virtual environment) first, then on PATH."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.is_file() else shutil.which(name)
    if path is None:
        raise HyprstreamError(f"{name!r} not found on PATH (it comes with flwr, a dependency of hyprstream)")
    return path


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise TransportError(f"process {proc.pid} exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TransportError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s")


def stop_process(proc: subprocess.Popen | None, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``; by PID, the process we started."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


class FogService:
    def __init__(self, cfg: FogConfig, config_path: Path) -> None:
        self.cfg = cfg
        self.config_path = Path(config_path).resolve()
        self.state = Path(cfg.state_dir) if cfg.state_dir else Path(tempfile.mkdtemp(prefix="hyprstream-fog-"))
        self.superlink: subprocess.Popen | None = None
        self.run: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.cfg.superlink.host}:{self.cfg.superlink.port}"

    def _env(self) -> dict[str, str]:
        # The SuperLink starts flwr-serverapp from PATH: make it this environment's.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.state / "flwr-home"), "PATH": path}

    def start(self, *, ready_timeout_s: float = 60.0) -> None:
        sl = self.cfg.superlink
        home = self.state / "flwr-home"
        app = self.state / "app"
        home.mkdir(parents=True, exist_ok=True)
        app.mkdir(parents=True, exist_ok=True)
        (app / "pyproject.toml").write_text(APP_PYPROJECT.format(version=__version__, key=FOG_CONFIG_KEY,
                                                                    state_key=STATE_DIR_KEY))
        connection = [f'[superlink]\ndefault = "fog"\n\n[superlink.fog]\naddress = "{self.address}"']
        connection.append(f'root-certificates = "{Path(sl.ssl_ca_certfile).resolve()}"' if sl.tls else "insecure = true")
        (home / "config.toml").write_text("\n".join(connection) + "\n")

        cmd = [executable("flower-superlink"), "--disable-runtime-dependency-installation",
               "--host", sl.host, "--port", str(sl.port)]
        if sl.tls:
            cmd += ["--ssl-certfile", sl.ssl_certfile, "--ssl-keyfile", sl.ssl_keyfile,
                    "--ssl-ca-certfile", sl.ssl_ca_certfile]
        else:
            cmd.append("--insecure")
        if sl.supernode_auth:
            cmd.append("--enable-supernode-auth")
        if sl.database:
            cmd += ["--database", sl.database]
        self.superlink = subprocess.Popen(cmd, env=self._env(), stdout=open(self.state / "superlink.log", "ab"),
                                          stderr=subprocess.STDOUT, start_new_session=True)
        log.info("fog %s: SuperLink (pid %d) on %s", self.cfg.name, self.superlink.pid, self.address)
        wait_for_port(sl.host, sl.port, ready_timeout_s, self.superlink)
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
        stop_process(self.superlink)
