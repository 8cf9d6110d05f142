"""``hyprstream fog run`` refuses a port another process holds, before starting anything: one line on
stderr naming the key, exit code 2, and no "SuperLink on" (a real socket holds the port)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from fogrun import ENV, fog_toml

pytestmark = pytest.mark.integration


def fog_run(config) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hyprstream.cli", "fog", "run", "--config", str(config)], env=ENV,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("key", ["superlink", "metrics"])
def test_fog_run_refuses_a_taken_port(tmp_path, key):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = fog_toml(tmp_path / "fog.toml", name="fog-a", location="grpc://127.0.0.1:1", token="t",
                          model="m", state_dir=tmp_path / "state", body=f"[{key}]\nport = {port}\n")
        out = fog_run(config)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "SuperLink on" not in out.stdout
    assert out.stderr.splitlines() == [f"hyprstream: config error: {config}: {key}.port: cannot listen on "
                                       f"127.0.0.1:{port}: Address already in use (another process holds the port)"]
    assert not (tmp_path / "state" / "superlink.log").exists()  # no SuperLink was started
