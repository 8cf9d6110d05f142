"""Simulations on Flower's supported path: ``flwr run`` against a SuperLink with the simulation runtime.

Flower runs a simulation's ServerApp inside its own ``flwr-simulation`` process, next to the engine
(Ray) that runs the ClientApps. A Hyprstream simulation keeps everything above the devices in the
calling process instead: core, the fogs' round engines, the metrics log and the per-step callbacks.
The ServerApp that Flower runs is therefore a *relay*: it connects back to the calling process over
one loopback TCP connection and serves the grid's three calls (node IDs, push, pull) for it, every
message in Flower's own protobuf encoding; :class:`RelayGrid` is that grid on the calling side.

The connection is authenticated both ways with a fresh 32-byte key (HMAC challenges of
:mod:`multiprocessing.connection`) that reaches the relay only through the environment of the
SuperLink this process starts, never through the run's configuration (which the SuperLink stores).
Each :func:`run_on_superlink` starts its own SuperLink on free loopback ports with a private
``FLWR_HOME``, submits the run with ``flwr run``, drives it, and stops the SuperLink and every process
it started, by PID.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from multiprocessing.connection import (
    Client,
    Connection,
    answer_challenge,
    deliver_challenge,
)
from pathlib import Path

from flwr.app import Message
from flwr.serverapp import Grid, ServerApp

from hyprstream.errors import HyprstreamError
from hyprstream.fog.discovery import send_and_receive
from hyprstream.fog.loopback import ProxyGrid, decode_message, encode_message

log = logging.getLogger(__name__)

ADDRESS_ENV = "HYPRSTREAM_SIM_RELAY"
KEY_ENV = "HYPRSTREAM_SIM_RELAY_KEY"
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_LOG_LEVEL": "WARNING"}
CONNECTION = "hyprstream-sim"  # the SuperLink connection's name in the private FLWR_HOME
POLL_S = 0.05  # how often send_and_receive asks for replies
HANDSHAKE_S = 10  # seconds a connecting peer has to prove the key


# ------------------------------------------------------------------------------------ the relay (Flower's side)
server_app = ServerApp()


@server_app.main()
def relay(grid: Grid, context) -> None:
    """Serve ``grid`` to the process named by ``$HYPRSTREAM_SIM_RELAY`` until it says it is done."""
    address, key = os.environ.get(ADDRESS_ENV), os.environ.get(KEY_ENV)
    if not address or not key:
        raise HyprstreamError(f"this ServerApp relays a Hyprstream simulation: {ADDRESS_ENV} and {KEY_ENV} "
                              "are not set (run it through `hyprstream simulate`)")
    host, _, port = address.rpartition(":")
    with Client((host, int(port)), authkey=bytes.fromhex(key)) as conn:
        serve(conn, grid)


def serve(conn: Connection, grid: Grid) -> None:
    """Answer ``conn``'s grid calls on ``grid`` until ``done`` (or the connection closes)."""
    from flwr.supercore.task_identity import TaskIdentity

    # Flower's Message constructor reads the process's task identity: the other side takes this run's
    conn.send(("hello", {"run_id": TaskIdentity.run_id, "task_id": TaskIdentity.task_id,
                         "node_id": TaskIdentity.node_id}))
    while True:
        try:
            op, arg = conn.recv()
        except EOFError:
            return
        if op == "done":
            conn.send(("ok", None))
            return
        try:
            if op == "node_ids":
                result = list(grid.get_node_ids())
            elif op == "push":
                result = list(grid.push_messages([decode_message(w) for w in arg]))
            elif op == "pull":
                result = [encode_message(m) for m in grid.pull_messages(arg)]
            else:
                raise HyprstreamError(f"unknown relay call {op!r}")
        except Exception as exc:  # noqa: BLE001 - the caller re-raises it
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        else:
            conn.send(("ok", result))


# ------------------------------------------------------------------------------- the grid (the calling side)
class RelayGrid(ProxyGrid):
    """A Flower ``Grid`` whose calls the relay ServerApp answers on Flower's grid; safe from several threads."""

    def __init__(self, conn: Connection, on_lost: Callable[[], str] | None = None) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._on_lost = on_lost  # what to say when the runtime goes away (its log's tail)
        from flwr.supercore.task_identity import TaskIdentity

        try:
            kind, identity = conn.recv()
        except (EOFError, OSError) as exc:
            raise HyprstreamError(f"Flower's simulation runtime hung up at once: {exc or type(exc).__name__}") from None
        if kind != "hello":
            raise HyprstreamError(f"unexpected first message from the relay: {kind!r}")
        # messages made in this process belong to the run (Flower's Message constructor reads this)
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = (
            int(identity["run_id"]), int(identity["task_id"]), int(identity["node_id"]))

    def _call(self, op: str, arg=None):
        with self._lock:
            try:
                self._conn.send((op, arg))
                status, result = self._conn.recv()
            except (EOFError, OSError) as exc:
                detail = self._on_lost() if self._on_lost is not None and op != "done" else ""
                raise HyprstreamError(f"lost the connection to Flower's simulation runtime ({op}): "
                                      f"{exc or type(exc).__name__}" + (f"\n{detail}" if detail else "")) from None
        if status != "ok":
            raise HyprstreamError(f"Flower's grid refused {op}: {result}")
        return result

    def get_node_ids(self) -> Iterable[int]:
        return self._call("node_ids")

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = self._call("push", [encode_message(m) for m in messages])
        for msg, mid in zip(messages, ids):  # as Flower's grids do: the caller's message learns its ID
            msg.metadata.__dict__["_message_id"] = mid
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [decode_message(w) for w in self._call("pull", list(message_ids))]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return send_and_receive(self, list(messages), math.inf if timeout is None else timeout, POLL_S)

    def done(self) -> None:
        """Tell the relay the run is over (its ServerApp returns, and Flower's runtime ends the run)."""
        try:
            self._call("done")
        except HyprstreamError:
            pass  # already gone: nothing to end


# ------------------------------------------------------------------------------------- the SuperLink's lifetime
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name: str) -> str:
    """Flower's command ``name`` of this interpreter's environment (else on PATH)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise HyprstreamError(f"Flower's `{name}` command is not installed (pip install 'flwr[simulation]')")
    return found


def write_app(app_dir: Path, client_app: str, config: dict[str, str | int | float | bool]) -> Path:
    """The Flower App that ``flwr run`` submits: the relay ServerApp, ``client_app`` (a ``module:attribute``
    reference) and ``config`` as the run config its ClientApps see."""
    app_dir.mkdir(parents=True, exist_ok=True)
    lines = ["[project]", 'name = "hyprstream-sim"', 'version = "1.0.0"', 'description = "A Hyprstream simulation"',
             'license = "Apache-2.0"', "dependencies = []", "", "[tool.flwr.app]", 'publisher = "hyprstream"', "",
             "[tool.flwr.app.components]", f'serverapp = "{__name__}:server_app"', f'clientapp = "{client_app}"', "",
             "[tool.flwr.app.config]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in sorted(config.items())]
    (app_dir / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return app_dir


class _Listener:
    """A loopback listener whose accept gives up at a deadline or when ``alive()`` turns false."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def accept(self, deadline: float, alive: Callable[[], str | None]) -> Connection:
        while True:
            reason = alive()
            if reason:
                raise HyprstreamError(reason)
            if time.monotonic() > deadline:
                raise HyprstreamError("Flower's simulation runtime did not start the run's ServerApp in time")
            try:
                peer, _ = self.sock.accept()
            except TimeoutError:
                continue
            peer.setblocking(True)
            # a peer that says nothing cannot hold the handshake: reads time out in the kernel
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", HANDSHAKE_S, 0))
            conn = Connection(peer.detach())
            try:  # both ways: the relay proves the key to us, we prove it to the relay
                deliver_challenge(conn, self.key)
                answer_challenge(conn, self.key)
            except Exception as exc:  # noqa: BLE001 - a stranger on the port: refuse, keep waiting
                log.warning("refused a connection to the simulation's relay port: %s", exc or type(exc).__name__)
                conn.close()
                continue
            with socket.socket(fileno=os.dup(conn.fileno())) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))  # rounds take their time
            return conn

    def close(self) -> None:
        self.sock.close()


class _ProcessTree:
    """A process and its descendants, snapshotted every ``every_s`` seconds from a thread, so that a process
    whose parent died (and which the OS re-parented away) is still known; :meth:`stop` ends them all."""

    def __init__(self, pid: int, every_s: float = 0.5) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.seen: dict[int, psutil.Process] = {pid: self.root}  # psutil.Process checks PID reuse itself
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(every_s,), daemon=True,
                                        name="hyprstream-sim-tree")
        self._thread.start()

    def snapshot(self) -> None:
        import psutil

        try:
            for p in self.root.children(recursive=True):
                self.seen.setdefault(p.pid, p)
        except psutil.Error:
            pass  # the SuperLink itself is gone: what was seen stays known

    def _watch(self, every_s: float) -> None:
        while not self._done.wait(every_s):
            self.snapshot()

    def stop(self, timeout_s: float = 20.0, *, graceful: bool = True) -> None:
        """SIGTERM every process seen that still runs (the same process: psutil checks its start time), then
        SIGKILL the ones left after ``timeout_s``; not ``graceful``: SIGKILL at once."""
        import psutil

        self._done.set()
        self._thread.join()
        self.snapshot()
        procs = [p for p in self.seen.values() if p.is_running()]
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            except psutil.Error:
                pass  # exited meanwhile
        alive = _until_dead(procs, timeout_s)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass  # exited meanwhile
        _until_dead(alive, 5.0)


def _until_dead(procs, timeout_s: float) -> list:
    """Wait until each of ``procs`` has exited (a zombie has: only its parent's reaping is left, which for
    a process re-parented to PID 1 happens when PID 1 gets to it); the ones still alive after ``timeout_s``."""
    import psutil

    deadline = time.monotonic() + timeout_s
    alive = list(procs)
    while alive:
        still = []
        for p in alive:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    still.append(p)
            except psutil.Error:
                continue
        alive = still
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return alive


class FlowerRuntime:
    """A Flower simulation of ``num_supernodes`` ClientApps (``client_app``, a ``module:attribute``) on a
    SuperLink of its own, submitted with ``flwr run``; :meth:`run` then runs ``main(grid)`` in this process.

    It starts at once (the SuperLink, then in a thread the submission; Flower's runtime and its Ray instance
    follow), and :meth:`run` waits for the relay; the ClientApps run only when ``main`` sends them messages. Each ClientApp reserves ``client_cpus`` of Ray's CPUs; ``ray_cpus`` is
    how many the runtime's own Ray instance announces (None: the host's; not used on a cluster, given by
    ``RAY_ADDRESS`` in ``env``). ``work`` holds the Flower App, the private ``FLWR_HOME`` and the
    SuperLink's output (``flower.log``); ``run_config`` is what the ClientApps see as
    ``context.run_config``; ``env`` is added to the environment of the SuperLink and hence of the runtime
    and its Ray workers on this host. Close it (or use ``with``): every process it started is stopped.
    """

    def __init__(self, *, work: Path, client_app: str, num_supernodes: int, client_cpus: int, run_config: dict,
                 env: dict[str, str], ray_cpus: int | None = None, start_timeout_s: float = 180.0) -> None:
        self.work = work
        self.start_timeout_s = start_timeout_s
        self._started = time.monotonic()
        work.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        self._listener = _Listener(key)
        port = _free_port()
        home = work / "flwr-home"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{port}"\ninsecure = true\n')
        app_dir = write_app(work / "flower-app", client_app, run_config)
        bindir = str(Path(sys.executable).parent)
        child_env = {**os.environ, **FLOWER_ENV, **env, "FLWR_HOME": str(home), ADDRESS_ENV: self._listener.address,
                     KEY_ENV: key.hex(), "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
        self._flwr = _FlwrCli(child_env)
        self._logfile = open(work / "flower.log", "ab")  # noqa: SIM115 - closed in close()
        self._superlink = subprocess.Popen(
            [_tool("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
             "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)],
            env=child_env, stdout=self._logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        try:
            self._tree = _ProcessTree(self._superlink.pid)  # every process the SuperLink starts, seen while it lasts
        except Exception:
            self._superlink.kill()  # the SuperLink exited at once or cannot be watched: leave nothing behind
            self._superlink.wait()
            self._logfile.close()
            self._listener.close()
            raise
        federation = [f"num-supernodes={num_supernodes}", f"client-resources-num-cpus={client_cpus}",
                      "client-resources-num-gpus=0.0", "init-args-logging-level='ERROR'", "init-args-log-to-driver=false"]
        if ray_cpus is not None:
            federation.append(f"init-args-num-cpus={ray_cpus}")
        self.run_id: str | None = None
        self._submit_error: BaseException | None = None
        self._submitter = threading.Thread(target=self._submit, args=(port, app_dir, federation), daemon=True,
                                           name="hyprstream-sim-submit")
        self._submitter.start()
        self._local_ray = not child_env.get("RAY_ADDRESS")
        self._grid: RelayGrid | None = None
        self._done_at: float | None = None
        self._closed = False

    def _superlink_alive(self) -> bool:
        return self._superlink.poll() is None

    def _submit(self, port: int, app_dir: Path, federation: list[str]) -> None:
        try:
            _wait_listening(port, until=time.monotonic() + 60, alive=self._superlink_alive)
            log.debug("SuperLink listening after %.1f s", time.monotonic() - self._started)
            self.run_id = self._flwr.submit(app_dir, federation, until=time.monotonic() + 60,
                                            alive=self._superlink_alive)
            log.debug("run %s submitted after %.1f s", self.run_id, time.monotonic() - self._started)
        except BaseException as exc:  # noqa: BLE001 - raised by run()
            self._submit_error = exc

    def _log_tail(self) -> str:
        return self._flwr.log_tail(self.run_id) if self.run_id else _tail(self.work / "flower.log")

    def run(self, main: Callable[[Grid], None]) -> None:
        """``main(grid)`` on the run's grid, once Flower's runtime has started the relay; exceptions propagate."""
        if self._grid is not None or self._closed:
            raise HyprstreamError("a FlowerRuntime runs one main")
        deadline = time.monotonic() + self.start_timeout_s
        self._submitter.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._submit_error is not None:
            raise self._submit_error
        if self.run_id is None:
            raise HyprstreamError(f"`flwr run` did not submit the simulation in {self.start_timeout_s:g} s")
        runtimes: set[int] = set()  # the flwr-simulation processes seen

        def alive() -> str | None:
            if not self._superlink_alive():
                return (f"Flower's SuperLink exited with code {self._superlink.returncode}: "
                        f"{_tail(self.work / 'flower.log')}")
            now = set(_runtimes(self._superlink.pid))
            if runtimes - now:  # Flower's runtime came and went before the ServerApp connected: it failed
                return (f"Flower's simulation run {self.run_id} ended "
                        f"({self._flwr.status(self.run_id) or 'status unknown'}) before its ServerApp connected:\n"
                        f"{self._log_tail()}")
            runtimes.update(now)
            return None

        conn = self._listener.accept(deadline, alive)
        self._listener.close()
        self._grid = RelayGrid(conn, on_lost=self._log_tail)
        log.debug("relay connected after %.1f s", time.monotonic() - self._started)
        main(self._grid)
        self._grid.done()  # Flower's runtime winds down while the caller finishes its side; close() waits
        self._done_at = time.monotonic()

    def close(self) -> None:
        """End the run (the relay's ServerApp returns and Flower's runtime stops its Ray instance), then stop
        the SuperLink and every process it started, by PID."""
        if self._closed:
            return
        self._closed = True
        self._listener.close()
        ended = False
        if self._grid is not None:
            if self._done_at is None:
                self._grid.done()
                self._done_at = time.monotonic()
            ended = _wait_for_run_end(self._superlink, timeout_s=60, local_ray=self._local_ray)
            log.debug("run ended %.1f s after done", time.monotonic() - self._done_at)
        t0 = time.monotonic()
        # once the run has ended (its Ray instance shut down), what is left holds nothing of it: the
        # SuperLink's in-memory state, Flower's bookkeeping, actors on their way out; else stop politely
        self._tree.stop(graceful=not ended)
        self._superlink.wait()
        self._submitter.join(timeout=130)  # its `flwr run` ends with the SuperLink
        self._logfile.close()
        log.debug("SuperLink and its processes stopped in %.1f s", time.monotonic() - t0)

    def __enter__(self) -> FlowerRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_on_superlink(main: Callable[[Grid], None], **kwargs) -> None:
    """``main(grid)`` on a :class:`FlowerRuntime` of ``kwargs``, closed after."""
    with FlowerRuntime(**kwargs) as runtime:
        runtime.run(main)


class _FlwrCli:
    """Flower's ``flwr`` command against the private SuperLink connection."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def _json(self, *args: str, timeout: float = 120) -> dict:
        out = subprocess.run([_tool("flwr"), *args, "--format", "json"], env=self.env, capture_output=True,
                             text=True, timeout=timeout, check=False)
        try:
            return json.loads(out.stdout)
        except ValueError:
            return {"success": False, "error-message": (out.stdout + out.stderr)[-1500:]}

    def submit(self, app_dir: Path, federation: list[str], *, until: float, alive: Callable[[], bool]) -> str:
        """``flwr run`` of ``app_dir``; the run's ID. Retried while the SuperLink is still starting."""
        while True:
            res = self._json("run", str(app_dir), CONNECTION, "--federation-config", " ".join(federation))
            if res.get("success") and res.get("run-id"):
                return str(res["run-id"])
            error = str(res.get("error-message", res))
            if "unavailable" not in error or not alive() or time.monotonic() > until:
                raise HyprstreamError(f"`flwr run` did not start the simulation: {error}")
            time.sleep(0.5)

    def status(self, run_id: str) -> str:
        """The run's status as Flower names it (``running``, ``finished:completed``, ...; empty if unknown)."""
        res = self._json("ls", "--run-id", run_id, CONNECTION, timeout=60)
        for run in res.get("runs", []) if isinstance(res.get("runs"), list) else []:
            if str(run.get("run-id")) == run_id:
                return str(run.get("status", ""))
        return ""

    def log_tail(self, run_id: str, lines: int = 30) -> str:
        """The last lines of the run's log as Flower's runtime kept it (errors of the ClientApps or the ServerApp),
        once the run has finished; else its status (``flwr log`` would wait for more of a run still on record
        as running)."""
        status = self.status(run_id)
        if not status.startswith("finished"):
            return f"(run {run_id}: {status or 'status unknown'})"
        try:
            out = subprocess.run([_tool("flwr"), "log", run_id, CONNECTION, "--show"], env=self.env,
                                 capture_output=True, text=True, timeout=15, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"(no log: {exc})"
        return "\n".join((out.stdout + out.stderr).strip().splitlines()[-lines:])


def _runtimes(pid: int) -> list[int]:
    """The ``flwr-simulation`` processes among ``pid``'s descendants."""
    import psutil

    found = []
    try:
        for p in psutil.Process(pid).children(recursive=True):
            try:
                if any(Path(a).name == "flwr-simulation" for a in p.cmdline()[:2]):
                    found.append(p.pid)
            except psutil.Error:
                continue
    except psutil.Error:
        pass  # the SuperLink is gone, and its runtime with it
    return found


def _wait_listening(port: int, *, until: float, alive: Callable[[], bool]) -> None:
    """Until something accepts TCP connections on 127.0.0.1:``port`` (the SuperLink has started)."""
    while time.monotonic() < until and alive():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)


RAY_PROCESSES = ("raylet", "gcs_server")  # a local Ray instance's own processes (its workers are their children)


def _wait_for_run_end(superlink: subprocess.Popen, timeout_s: float, *, local_ray: bool) -> bool:
    """Until the SuperLink's runtime (``flwr-simulation``) has ended the run: True; False after ``timeout_s``.
    With a local Ray instance, until that instance has shut down: what the runtime does after it is its own
    bookkeeping (telemetry off, nothing of the run's left), which the stop that follows cuts short."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runtimes = _runtimes(superlink.pid)
        if not runtimes:
            return True
        if local_ray:
            names = set()
            for pid in runtimes:
                try:
                    names.update(p.name() for p in psutil.Process(pid).children(recursive=True))
                except psutil.Error:
                    continue
            if not names & set(RAY_PROCESSES):
                return True
        time.sleep(0.05)
    return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


__all__ = ["FlowerRuntime", "RelayGrid", "run_on_superlink", "server_app", "write_app"]
