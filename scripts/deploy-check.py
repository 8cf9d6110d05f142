#!/usr/bin/env python3
"""Run docs/deploy.md literally on one host and check the deployment it builds.

The ```bash blocks of the document are joined, in order, into one script that runs in a fresh
directory with every host name set to 127.0.0.1 and every port to a free loopback port. Then this
checks that core commits ``--versions`` new versions (listed with the document's reader token over
TLS), that the audit log verifies with core's public key, and stops every service the document
started by the PID in its ``.pid`` file (and whatever those services left running).

    python scripts/deploy-check.py [--versions 2] [--timeout 900] [--workdir DIR] [--keep]

Exit code 0 when everything holds; 1 with the reason and the services' log tails otherwise.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```bash\n(.*?)^```$", re.S | re.M)
STOP_ORDER = ("device-", "fog-", "core", "broker")  # agents first, the broker last


def bash_blocks(doc: Path) -> list[str]:
    return BLOCK.findall(doc.read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
            "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
            "CORE_HOST": "127.0.0.1", "FOG1_HOST": "127.0.0.1", "BROKER_HOST": "127.0.0.1",
            "CORE_PORT": str(free_port()), "FOG1_PORT": str(free_port()), "BROKER_PORT": str(free_port()),
            "AGENT_PORT": str(free_port()),
            "BROKER_USER": getpass.getuser()}


def pid_files(workdir: Path) -> list[Path]:
    files = sorted(workdir.rglob("*.pid"))
    return sorted(files, key=lambda f: next((i for i, p in enumerate(STOP_ORDER)
                                             if f.relative_to(workdir).parts[0].startswith(p)), len(STOP_ORDER)))


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def started_process(pid_file: Path, since: float) -> psutil.Process | None:
    """The process a .pid file names, if it still runs and was started by this check."""
    try:
        proc = psutil.Process(int(pid_file.read_text().split()[0]))
        return proc if proc.create_time() >= since - 1 and alive(proc) else None
    except (ValueError, IndexError, OSError, psutil.Error):
        return None


def stop_all(workdir: Path, since: float, timeout_s: float = 60.0) -> list[str]:
    """SIGTERM every service by its .pid file in order, SIGKILL after ``timeout_s``; then SIGKILL any
    of their descendants still running. Returns what had to be killed."""
    killed = []
    descendants: list[psutil.Process] = []
    for f in pid_files(workdir):
        proc = started_process(f, since)
        if proc is None:
            continue
        try:
            descendants += proc.children(recursive=True)
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            continue
        deadline = time.monotonic() + timeout_s
        while alive(proc) and time.monotonic() < deadline:
            time.sleep(0.2)
        if alive(proc):
            proc.kill()
            killed.append(str(f.relative_to(workdir)))
    time.sleep(1)
    for proc in descendants:
        if alive(proc):
            try:
                proc.kill()
                killed.append(f"pid {proc.pid} ({proc.name()})")
            except psutil.Error:
                pass
    return killed


def versions(workdir: Path, env: dict[str, str]) -> list[dict]:
    from hyprstream.coreapi.client import CoreClient

    location = f"grpc+tls://{env['CORE_HOST']}:{env['CORE_PORT']}"
    token = (workdir / "reader.token").read_text().strip()
    with CoreClient(location, token, tls_root_certs=(workdir / "core/pki/ca.pem").read_bytes(),
                    timeout_s=30) as core:
        return core.list_versions("digits-model")


def log_tails(workdir: Path, chars: int = 1500) -> str:
    out = []
    for log in sorted(workdir.rglob("*.log")):
        text = log.read_text(errors="replace")
        if text:
            out.append(f"--- {log.relative_to(workdir)} ---\n{text[-chars:]}")
    return "\n".join(out)


def check(workdir: Path, want: int, timeout_s: float) -> None:
    start = time.time()
    deadline = time.monotonic() + timeout_s
    env = environment()
    script = workdir / "deploy.sh"
    script.write_text("set -euo pipefail\n" + "\n".join(bash_blocks(ROOT / "docs" / "deploy.md")))
    try:
        t0 = time.monotonic()
        run = subprocess.run(["bash", str(script)], cwd=workdir, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=max(1.0, deadline - time.monotonic()))
        print(run.stdout, end="")
        if run.returncode != 0:
            raise SystemExit(f"deploy-check: the document's commands failed (exit {run.returncode})")
        print(f"deploy-check: the document's commands ran in {time.monotonic() - t0:.0f} s", flush=True)
        t0 = time.monotonic()
        seen: list[dict] = []
        while time.monotonic() < deadline:
            for f in pid_files(workdir):
                if started_process(f, start) is None:
                    raise SystemExit(f"deploy-check: the service of {f.relative_to(workdir)} exited")
            try:
                seen = versions(workdir, env)
            except Exception as exc:  # core busy or restarting: ask again
                print(f"deploy-check: list_versions: {exc}", flush=True)
            if len(seen) - 1 >= want:
                break
            time.sleep(3)
        else:
            raise SystemExit(f"deploy-check: core has {max(0, len(seen) - 1)} new versions, not {want}, "
                             f"after {timeout_s:.0f} s")
        print(f"deploy-check: {len(seen) - 1} new versions in {time.monotonic() - t0:.0f} s: "
              + ", ".join(f"v{v['version']} by {v['actor']} ({v['participants']} agents)" for v in seen[1:]),
              flush=True)
    finally:
        killed = stop_all(workdir, start)
        if killed:
            print(f"deploy-check: killed after SIGTERM did not stop them: {', '.join(killed)}")
    verify = subprocess.run(["hyprstream", "audit", "verify", "core/audit/audit.jsonl", "--key",
                             "core/pki/audit-signing.pub"], cwd=workdir, env=env, capture_output=True, text=True)
    print(verify.stdout.strip() or verify.stderr.strip())
    if verify.returncode != 0:
        raise SystemExit(f"deploy-check: the audit log does not verify (exit {verify.returncode})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--versions", type=int, default=2, help="new versions core must commit (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole check (default: %(default)s)")
    p.add_argument("--workdir", type=Path, help="an empty directory to run in (default: a fresh temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the directory afterwards")
    args = p.parse_args()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="hyprstream-deploy-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if any(workdir.iterdir()):
        print(f"deploy-check: {workdir} is not empty", file=sys.stderr)
        return 2
    ok = False
    try:
        check(workdir, args.versions, args.timeout)
        ok = True
        print("deploy-check: ok")
        return 0
    except (SystemExit, subprocess.TimeoutExpired) as exc:
        print(exc if isinstance(exc, SystemExit) else f"deploy-check: timed out: {exc}", file=sys.stderr)
        print(log_tails(workdir), file=sys.stderr)
        return 1
    finally:
        if args.keep or not ok:
            print(f"deploy-check: files kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
