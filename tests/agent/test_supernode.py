"""The agent's Flower SuperNode against a real SuperLink on loopback: it registers, and it never
outlives the agent (SIGTERM: stopped cleanly; SIGKILL: the kernel's parent-death signal)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import free_port
from test_daemon import agent_cli, fast_profile, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXECUTOR = "hyprstream.agent.executor"


@pytest.fixture()
def superlink(tmp_path):
    beside = Path(sys.executable).with_name("flower-superlink")
    exe = str(beside) if beside.exists() else shutil.which("flower-superlink")
    port = free_port()
    log = tmp_path / "superlink.log"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_HOME": str(tmp_path / "flwr-link")}
    proc = subprocess.Popen([exe, "--insecure", "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                            cwd=tmp_path)
    try:
        assert wait_until(lambda: "Uvicorn running" in log.read_text(errors="replace"), 60), log.read_text()
        yield port, log
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def supernodes(pid: int, marker: str = "flower-supernode") -> list[psutil.Process]:
    """The live descendants of ``pid`` whose command line has ``marker`` (the SuperNode by default)."""
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for k in kids:
        try:
            if k.status() != psutil.STATUS_ZOMBIE and any(marker in part for part in k.cmdline()):
                found.append(k)
        except psutil.Error:  # exited (or a zombie) meanwhile
            pass
    return found


def start(tmp_path: Path, port: int, name: str) -> subprocess.Popen:
    key = tmp_path / "store.key"
    key.write_bytes(os.urandom(32))
    cmd = [*agent_cli(), "run", "--config", str(fast_profile(tmp_path)), "--fog", f"127.0.0.1:{port}",
           "--fog-insecure", "--device-id", name, "--store", str(tmp_path / name / "store"), "--store-key", str(key)]
    return subprocess.Popen(cmd, stdout=(tmp_path / f"{name}.log").open("wb"), stderr=subprocess.STDOUT)


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_supernode_registers_and_dies_with_the_agent(tmp_path, superlink, how):
    port, link_log = superlink
    agent = start(tmp_path, port, f"node-{how}")
    try:
        assert wait_until(lambda: "Activated node_id" in link_log.read_text(errors="replace"), 90), \
            (tmp_path / f"node-{how}.log").read_text()
        (node,) = supernodes(agent.pid)
        (executor,) = supernodes(agent.pid, EXECUTOR)
        cmd = node.cmdline()
        assert cmd[cmd.index("--superlink") + 1] == f"127.0.0.1:{port}" and "--insecure" in cmd
        # the SuperNode's tasks go to the warm executor, which authenticates with a secret only they share
        assert cmd[cmd.index("--isolation") + 1] == "process"
        secret = Path(cmd[cmd.index("--superexec-auth-secret-file") + 1])
        assert secret.stat().st_mode & 0o077 == 0 and len(secret.read_bytes()) == 32
        ecmd = executor.cmdline()
        assert ecmd[ecmd.index("--secret-file") + 1] == str(secret)
        assert ecmd[ecmd.index("--parent-pid") + 1] == str(node.pid)
        config = cmd[cmd.index("--node-config") + 1]
        assert f'store-dir="{(tmp_path / f"node-{how}" / "store").resolve()}"' in config and "state-dir=" in config
        if how == "sigterm":
            node_log = tmp_path / f"node-{how}" / "store.state" / "supernode.log"
            assert wait_until(lambda: "executor ready" in node_log.read_text(errors="replace"), 120)
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(60) == 0
        else:
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
        gone, alive = psutil.wait_procs([node, executor], timeout=30)
        assert not alive
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
    if how == "sigterm":
        log = (tmp_path / f"node-{how}.log").read_text()
        assert "SuperNode started" in log and "agent stopped" in log
        # the executor ended on its SIGTERM (not killed after the agent's grace period)
        node_log = tmp_path / f"node-{how}" / "store.state" / "supernode.log"
        assert "executor stopping (signal)" in node_log.read_text(errors="replace")


def test_supernode_restarts_when_it_or_its_executor_dies(tmp_path, superlink):
    port, link_log = superlink
    agent = start(tmp_path, port, "node-restart")
    log = tmp_path / "node-restart.log"
    try:
        assert wait_until(lambda: len(supernodes(agent.pid)) == 1 and len(supernodes(agent.pid, EXECUTOR)) == 1, 60)
        first = supernodes(agent.pid)[0]
        first.kill()
        assert wait_until(lambda: [p.pid for p in supernodes(agent.pid)] not in ([], [first.pid]), 60)
        assert wait_until(lambda: "SuperNode exited" in log.read_text(), 10)
        # the executor dies: both restart, the executor bound to the new SuperNode
        assert wait_until(lambda: len(supernodes(agent.pid, EXECUTOR)) == 1, 60)
        second, executor = supernodes(agent.pid)[0], supernodes(agent.pid, EXECUTOR)[0]
        executor.kill()
        assert wait_until(lambda: "executor exited" in log.read_text(), 30)
        assert wait_until(lambda: [p.pid for p in supernodes(agent.pid)] not in ([], [second.pid])
                          and [p.pid for p in supernodes(agent.pid, EXECUTOR)] not in ([], [executor.pid]), 60)
        ecmd = supernodes(agent.pid, EXECUTOR)[0].cmdline()
        assert ecmd[ecmd.index("--parent-pid") + 1] == str(supernodes(agent.pid)[0].pid)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)


def test_only_the_executor_holding_the_secret_may_take_the_supernodes_tasks(tmp_path, superlink):
    """The Runtime API hands out task tokens (each opens a device's message and data); a local process
    without the SuperNode's secret -- none, or a guessed one -- is refused, the executor's is served."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.runtime import RuntimeHttpClient

    from hyprstream.agent.executor import WarmExecutor

    port, _ = superlink
    agent = start(tmp_path, port, "node-secret")
    try:
        assert wait_until(lambda: len(supernodes(agent.pid)) == 1 and len(supernodes(agent.pid, EXECUTOR)) == 1, 60)
        cmd = supernodes(agent.pid)[0].cmdline()
        runtime = f"127.0.0.1:{cmd[cmd.index('--port') + 1]}"
        secret = Path(cmd[cmd.index("--superexec-auth-secret-file") + 1]).read_bytes()

        def answer(key: bytes):
            executor = WarmExecutor(runtime, key, retry=False)
            try:
                return executor.acquire()
            finally:
                executor.close()

        def anonymous():  # a local process that sends no authentication at all
            client = RuntimeHttpClient.from_server_address(server_address=runtime, insecure=True,
                                                           root_certificates=None, interceptors=[])
            try:
                return client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            finally:
                client.close()

        assert wait_until(lambda: _served(answer, secret), 30)  # the SuperNode's Runtime API is up
        for attempt in (anonymous, lambda: answer(secrets.token_bytes(32)),
                        lambda: answer(secret[:-1] + bytes([secret[-1] ^ 1]))):
            with pytest.raises(httpx.HTTPStatusError) as refused:
                attempt()
            assert refused.value.response.status_code == 401
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)


def _served(answer, secret: bytes) -> bool:
    try:
        answer(secret)
        return True
    except Exception:  # noqa: BLE001 -- not listening yet
        return False
