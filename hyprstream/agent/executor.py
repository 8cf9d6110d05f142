"""A warm executor for the device's ClientApp: the SuperNode's tasks run in forks of one process that has
already imported Flower's ClientApp runtime, hyprstream's ClientApp and torch.

Flower's own SuperExec starts a fresh ``flwr-clientapp`` for every message; that process spends seconds
importing Flower, hyprstream and torch before it reads its message. A secure round sends each device five
messages, so on a small device the imports cost more than the work. Here the SuperNode runs with
``--isolation process`` and this process takes its place: it asks the SuperNode's Runtime API (loopback)
for a task and forks a child that runs Flower's ``run_clientapp`` with the task's token. It asks every
``poll_s`` while tasks come (the stages of a round follow each other), and less often the longer none
came, up to every ``idle_poll_s``: an idle device pays little for a warm executor, and the first message
of a round waits at most ``idle_poll_s``.
Each task still runs in its own process (a crash or a leak ends with it; nothing a task changes reaches the
next), only the imports are shared, copy-on-write. This process starts no thread and never touches CUDA
(importing torch does not initialise it), so every fork starts consistent and may use the GPU itself.

The Runtime API's ``AcquireTask`` (which hands out the tokens) is authenticated with a secret shared by the
SuperNode and this process (Flower's SuperExec HMAC): another local process cannot take the device's tasks.
Started by :class:`hyprstream.agent.daemon.SuperNodeProcess`; ``python -m hyprstream.agent.executor --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import time

import psutil

from hyprstream.runtime import log_formatter

log = logging.getLogger("hyprstream.agent.executor")

PRELOAD = ("flwr.supernode.runtime.run_clientapp", "hyprstream.agent.client_app", "torch")
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
DEFAULT_POLL_S = 0.2
DEFAULT_IDLE_POLL_S = 1.0


def next_poll(interval: float, got_task: bool, poll_s: float, idle_poll_s: float) -> float:
    """The wait before the next ``AcquireTask``: ``poll_s`` after a task, then doubling up to ``idle_poll_s``."""
    return poll_s if got_task else min(idle_poll_s, max(interval, poll_s) * 2)


class _Stop(Exception):
    """SIGTERM or SIGINT reached the executor."""


class WarmExecutor:
    """Acquire the SuperNode's ClientApp tasks and run each in a fork of this process."""

    def __init__(self, runtime_address: str, secret: bytes, *, parent_pid: int | None = None,
                 poll_s: float = DEFAULT_POLL_S, idle_poll_s: float = DEFAULT_IDLE_POLL_S, retry: bool = True) -> None:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        if not secret:
            raise ValueError("the SuperExec secret must not be empty")
        self.runtime_address = runtime_address
        self.parent_pid = parent_pid
        if not 0 < poll_s <= idle_poll_s:
            raise ValueError(f"poll intervals must satisfy 0 < poll_s <= idle_poll_s, got {poll_s}, {idle_poll_s}")
        self.poll_s, self.idle_poll_s = poll_s, idle_poll_s
        self.children: set[int] = set()
        # Flower's invoker retries with backoff, and on a refused secret (401) stops this process (SIGINT)
        invoker = make_simple_http_retry_invoker() if retry else None
        self._client = RuntimeHttpClient.from_server_address(
            server_address=runtime_address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                          SuperExecAuthHttpInterceptor(master_secret=secret,
                                                       protected_methods=frozenset({ACQUIRE_METHOD}))],
            retry_invoker=invoker)

    def serve(self) -> None:
        """Run until SIGTERM/SIGINT or until the SuperNode (``parent_pid``) is gone."""
        def on_signal(signum, _frame) -> None:
            # raised wherever the loop is, even inside Flower's retries of a SuperNode that is gone;
            # launch() blocks these signals around its fork, so no child goes untracked
            raise _Stop

        if threading.active_count() != 1:  # a fork keeps only the forking thread: locks others hold stay held
            raise RuntimeError(f"the executor forks its tasks and must run single-threaded; "
                               f"{threading.active_count()} threads are running")
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():  # a fork cannot use a CUDA context it inherits
            raise RuntimeError("CUDA was initialised in the executor: its forks could not use the GPU")
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        log.info("executor ready: ClientApp tasks of %s run in forks of pid %d", self.runtime_address, os.getpid())
        interval = self.poll_s
        try:
            while self.parent_pid is None or psutil.pid_exists(self.parent_pid):
                self.reap()
                token = self.acquire()
                interval = next_poll(interval, token is not None, self.poll_s, self.idle_poll_s)
                if token is not None:
                    self.launch(token)
                else:
                    time.sleep(interval)
        except _Stop:
            log.info("executor stopping (signal)")
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.close()

    def acquire(self) -> str | None:
        """The token of the SuperNode's next ClientApp task, or None when none waits."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        res = self._client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        return res.token if res.HasField("task") and res.token else None

    def launch(self, token: str) -> int:
        """Fork a child that runs the task of ``token``; returns its PID."""
        sys.stdout.flush()
        sys.stderr.flush()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
        if pid == 0:  # the child: never returns into the loop
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                from flwr.supernode.runtime.run_clientapp import run_clientapp

                run_clientapp(runtime_api_address=self.runtime_address, token=token, insecure=True,
                              parent_pid=os.getppid())
                code = 0
            except SystemExit as exc:  # Flower ends a task with flwr_exit
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 -- logged, then the child ends
                log.exception("the ClientApp task failed")
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.children.add(pid)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal that came meanwhile is delivered now
        return pid

    def reap(self) -> None:
        for pid in list(self.children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.children.discard(pid)
                code = os.waitstatus_to_exitcode(status)
                if code != 0:
                    log.warning("ClientApp task (pid %d) ended with code %d", pid, code)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the tasks still running (SIGTERM: each pushes its status) and wait for them."""
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            self.children.discard(pid)
        self._client.close()



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyprstream.agent.executor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, 127.0.0.1:PORT")
    parser.add_argument("--secret-file", required=True, help="the SuperExec secret the SuperNode was given")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the SuperNode) is gone")
    parser.add_argument("--poll-s", type=float, default=DEFAULT_POLL_S, help="how often to ask for a task while "
                        "tasks come")
    parser.add_argument("--idle-poll-s", type=float, default=DEFAULT_IDLE_POLL_S,
                        help="how often to ask at the most when none came for a while")
    args = parser.parse_args(argv)
    host, _, port = args.runtime_api_address.rpartition(":")
    if host not in ("127.0.0.1", "localhost") or not port.isdigit():
        parser.error(f"--runtime-api-address must be a loopback HOST:PORT, got {args.runtime_api_address!r}")
    if not 0.01 <= args.poll_s <= args.idle_poll_s <= 60:
        parser.error(f"--poll-s and --idle-poll-s must satisfy 0.01 <= poll <= idle poll <= 60, got "
                     f"{args.poll_s} and {args.idle_poll_s}")
    handler = logging.StreamHandler()
    handler.setFormatter(log_formatter())
    logging.getLogger("hyprstream").addHandler(handler)
    logging.getLogger("hyprstream").setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per poll
    from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret

    secret = load_superexec_auth_secret(args.secret_file)  # raises ValueError for an empty or unreadable file
    for name in PRELOAD:  # what every task would import (none of them starts a thread)
        importlib.import_module(name)
    WarmExecutor(args.runtime_api_address, secret, parent_pid=args.parent_pid, poll_s=args.poll_s,
                 idle_poll_s=args.idle_poll_s).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
