"""docs/deploy.md works as written: scripts/deploy-check.py runs its bash blocks on loopback (core with
TLS, a fog with SuperLink TLS and SuperNode authentication, two agents, mosquitto with TLS and
passwords) and checks that core commits new versions and that the audit log verifies."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = {"mosquitto": shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin"),
         "mosquitto_passwd": shutil.which("mosquitto_passwd"), "ssh-keygen": shutil.which("ssh-keygen")}

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.mqtt, pytest.mark.timeout(960),
              pytest.mark.skipif(not all(TOOLS.values()),
                                 reason=f"needs {', '.join(k for k, v in TOOLS.items() if not v)}")]


def test_deploy_doc_runs_as_written(tmp_path):
    workdir = tmp_path / "deploy"
    env_path = ":".join(str(Path(p).parent) for p in TOOLS.values() if p)
    env = {**os.environ, "PATH": f"{os.environ.get('PATH', '')}:{env_path}"}
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "deploy-check.py"), "--versions", "2",
                          "--timeout", "840", "--workdir", str(workdir)],
                         capture_output=True, text=True, timeout=900, env=env)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert "deploy-check: ok" in run.stdout
    found = re.search(r"deploy-check: (\d+) new versions in \d+ s: (.*)", run.stdout)
    assert found and int(found.group(1)) >= 2, out[-3000:]
    assert "v1 by fog-1 (2 agents)" in found.group(2)
    # the audit log verified after every service stopped, with core's public key
    assert re.search(r"core/audit/audit\.jsonl: ok: \d+ entries.*\(key sha256:[0-9a-f]+, given\)\n"
                     r"deploy-check: ok", run.stdout), out[-3000:]
    assert not workdir.exists()  # cleaned up after success
