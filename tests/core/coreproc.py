"""Helpers for tests that run core as its own process (``python -m hyprstream.cli core run``)."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hyprstream.core import signing, tokens
from hyprstream.core.auth import Role


@dataclass
class Deployment:
    root: Path
    config: Path
    audit_log: Path
    audit_key: signing.Ed25519PrivateKey
    token_key: signing.Ed25519PrivateKey

    def token(self, sub: str, role: Role, ttl_s: int = 3600) -> str:
        return tokens.issue(self.token_key, sub, role, ttl_s=ttl_s, now=time.time())[0]


def make_deployment(root: Path, *, rate: float = 10_000.0, burst: int = 10_000, tls: dict[str, str] | None = None,
                    sync: bool = True, metrics: str = "") -> Deployment:
    """Keys and a core.toml (loopback, any free port) under ``root``."""
    keys = root / "keys"
    keys.mkdir(parents=True)
    audit_key, token_key = signing.generate_key(), signing.generate_key()
    signing.write_private_key(keys / "audit.key", audit_key)
    signing.write_private_key(keys / "token.key", token_key)
    if tls is None:
        tls_section = "[tls]\nenabled = false\n"
    else:
        tls_section = "[tls]\n" + "".join(f'{k} = "{v}"\n' for k, v in tls.items())
    config = root / "core.toml"
    config.write_text(f"""kind = "core"
log_level = "warning"
[server]
listen = "127.0.0.1:0"
[storage]
uri = "models"
sync = {str(sync).lower()}
[audit]
signing_key = "keys/audit.key"
path = "audit/audit.jsonl"
[auth]
token_key = "keys/token.key"
[rate_limit]
requests_per_s = {rate}
burst = {burst}
{tls_section}
[metrics]
listen = "127.0.0.1:0"
{metrics}""")
    return Deployment(root, config, root / "audit" / "audit.jsonl", audit_key, token_key)


class CoreProcess:
    """``core run`` in a child process; ``location`` once it printed its ready line."""

    def __init__(self, config: Path, *, ready_timeout_s: float = 120.0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "hyprstream.cli", "core", "run", "--config",
                                      str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env, cwd=config.parent)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self._lines), daemon=True).start()
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + ready_timeout_s
        self.location = None
        while self.location is None:
            try:
                line = self._lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise RuntimeError(f"core did not start: {''.join(self.stderr)[-2000:]}") from None
            if line is None:
                self.proc.wait()
                raise RuntimeError(f"core exited with {self.proc.returncode}: {''.join(self.stderr)[-2000:]}")
            if line.startswith("hyprstream core: serving on "):
                self.location = line.removeprefix("hyprstream core: serving on ").strip()
        self.metrics = None  # the metrics endpoint's base URL, when core serves one
        if "\n[metrics]\n" not in config.read_text() or 'listen = ""' not in config.read_text():
            line = self._lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line and line.startswith("hyprstream core: metrics on "):
                self.metrics = line.removeprefix("hyprstream core: metrics on ").strip().removesuffix("/metrics")

    @staticmethod
    def _pump(stream, q) -> None:
        for line in stream:
            q.put(line)
        q.put(None)

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def kill(self) -> None:
        """SIGKILL, by this process's own PID."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def terminate(self, timeout_s: float = 60.0) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=timeout_s)
