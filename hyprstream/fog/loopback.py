"""An in-process Flower ``Grid`` that runs a ``ClientApp`` per node synchronously (tests and benchmarks).

Messages travel through Flower's own protobuf encoding both ways (``message_to_proto`` /
``message_from_proto``), so what a node receives and returns is exactly what a SuperLink would
carry, byte for byte (:attr:`LoopbackGrid.bytes_down` / :attr:`bytes_up` count them). Each node has
its own persistent ``Context`` (like a SuperNode). ``drop(node, message)`` decides, per message,
whether a node goes silent (no reply, as a hung or disconnected client); ``seconds`` records the
time each node spent answering each message, so a caller can tell client time from fog time.
:class:`ProcessLoopbackGrid` answers in several worker processes at once, as separate devices do.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.serverapp import Grid

logger = logging.getLogger(__name__)


class _Job(NamedTuple):
    message_id: str
    node: int
    message_type: str
    wire: bytes


def encode_message(msg: Message) -> bytes:
    """``msg`` as the wire bytes a SuperLink carries (Flower's protobuf encoding)."""
    return message_to_proto(msg).SerializeToString()


def decode_message(wire: bytes) -> Message:
    """The message of :func:`encode_message`'s bytes."""
    proto = ProtoMessage()
    proto.ParseFromString(wire)
    return message_from_proto(proto)


def _run_client(client_app, context: Context, wire: bytes) -> tuple[bytes, float]:
    """One node's answer to one message, as a SuperNode gives it: decode, run the ClientApp, encode the reply."""
    received = decode_message(wire)
    t0 = time.perf_counter()
    try:
        reply = client_app(received, context)
    except Exception as exc:  # as Flower's runtimes do: the failure becomes an error reply
        reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=received)
    seconds = time.perf_counter() - t0
    reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return encode_message(reply), seconds


class ProxyGrid(Grid):
    """What a ``Grid`` that carries messages for a run held elsewhere needs beyond its three calls: the run it
    is set to, messages made as Flower makes them, no node records."""

    _run = None

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_nodes(self):
        return []


class LoopbackGrid(ProxyGrid):
    def __init__(self, client_app, node_ids: Sequence[int], *,
                 node_config: Callable[[int], dict] | None = None,
                 drop: Callable[[int, Message], bool] | None = None) -> None:
        self.client_app = client_app
        self.node_ids = list(node_ids)
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=(node_config(n) if node_config else {}),
                                    state=RecordDict(), run_config={}) for n in self.node_ids}
        self.drop = drop or (lambda node, msg: False)
        self._replies: dict[str, Message] = {}
        self.bytes_down = 0
        self.bytes_up = 0
        self.seconds: list[tuple[int, str, float]] = []  # (node, message type, seconds in the ClientApp)
        _ensure_task_identity()

    # -- Grid interface
    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids: list[str] = []

        def jobs() -> Iterator[_Job]:
            for msg in messages:
                msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
                msg.metadata.__dict__["_run_id"] = 1
                wire = encode_message(msg)
                self.bytes_down += len(wire)
                ids.append(msg.metadata.message_id)
                node = msg.metadata.dst_node_id
                if node in self.contexts and not self.drop(node, msg):
                    yield _Job(msg.metadata.message_id, node, msg.metadata.message_type, wire)

        for job, back, seconds in self._answer(jobs()):
            self.seconds.append((job.node, job.message_type, seconds))
            self.bytes_up += len(back)
            self._replies[job.message_id] = decode_message(back)
        return ids

    def _answer(self, jobs: Iterable[_Job]) -> Iterator[tuple[_Job, bytes, float]]:
        """Each job's reply (wire bytes) and the seconds its ClientApp took: here one after another, each
        message answered before the next is encoded (``drop`` sees them in that order)."""
        for job in jobs:
            yield (job, *_run_client(self.client_app, self.contexts[job.node], job.wire))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for mid in list(message_ids):
            reply = self._replies.pop(mid, None)
            if reply is not None:
                out.append(reply)
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))

    def close(self) -> None:
        """Release what the grid holds: nothing here (its nodes live in this process)."""

    def __enter__(self) -> LoopbackGrid:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ProcessLoopbackGrid(LoopbackGrid):
    """A :class:`LoopbackGrid` whose nodes answer in ``workers`` processes at once, as separate devices would.

    ``app_factory`` is a picklable callable (a module-level function, or a ``functools.partial`` of one)
    that returns the ``ClientApp``; each worker is a fresh interpreter (the ``spawn`` start method: no
    threads or locks inherited from this process) that calls it once. Node ``i`` (in ``node_ids`` order)
    lives in worker ``i % workers``, which holds its ``Context`` for the grid's lifetime (built there
    from ``node_config``; the parent's :attr:`contexts` only name the nodes). Messages cross as their
    wire bytes. A push returns when every worker has answered its share; a worker that dies leaves its
    nodes silent from then on (as lost devices). Close the grid (``close()`` or ``with``, as every
    :class:`LoopbackGrid`) to stop the workers; they are daemons, and a grid that is garbage collected stops them too.
    """

    def __init__(self, app_factory: Callable[[], object], node_ids: Sequence[int], *, workers: int,
                 node_config: Callable[[int], dict] | None = None,
                 drop: Callable[[int, Message], bool] | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, not {workers}")
        super().__init__(None, node_ids, node_config=node_config, drop=drop)
        mp = multiprocessing.get_context("spawn")
        self.workers = min(int(workers), max(1, len(self.node_ids)))
        self.worker_of: dict[int, int] = {node: i % self.workers for i, node in enumerate(self.node_ids)}
        self.processes: list = []  # worker w is processes[w]
        self._conns: list = []
        self._threads = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="hyprstream-loopback")
        # registered first: workers started before a failed start are stopped too
        self._finalizer = weakref.finalize(self, _stop_workers, self._conns, self.processes, self._threads)
        for w in range(self.workers):
            configs = {node: dict(ctx.node_config) for node, ctx in self.contexts.items() if self.worker_of[node] == w}
            parent, child = mp.Pipe()
            proc = mp.Process(target=_serve, args=(child, app_factory, configs), daemon=True,
                              name=f"hyprstream-loopback-{w}")
            proc.start()
            child.close()
            self._conns.append(parent)
            self.processes.append(proc)

    def _answer(self, jobs: Iterable[_Job]) -> Iterator[tuple[_Job, bytes, float]]:
        per_worker: list[list[_Job]] = [[] for _ in range(self.workers)]
        for job in jobs:
            per_worker[self.worker_of[job.node]].append(job)
        futures = [self._threads.submit(self._lockstep, w, share) for w, share in enumerate(per_worker) if share]
        for future in futures:
            yield from future.result()

    def _lockstep(self, w: int, share: list[_Job]) -> list[tuple[_Job, bytes, float]]:
        """Worker ``w``'s answers to ``share``, one message at a time (a pipe holds one in flight)."""
        out = []
        conn = self._conns[w]
        for job in share:
            if not self.processes[w].is_alive():
                break  # a lost worker's nodes stay silent
            try:
                conn.send((job.node, job.wire))
                back, seconds = conn.recv()
            except (EOFError, OSError):
                logger.warning("loopback worker %d stopped; its %d node(s) no longer answer", w,
                               sum(1 for v in self.worker_of.values() if v == w))
                break
            out.append((job, back, seconds))
        return out

    def close(self) -> None:
        """Stop the workers (at most once; later calls do nothing)."""
        self._finalizer()


def _serve(conn, app_factory: Callable[[], object], configs: dict[int, dict]) -> None:
    """A worker: build the ClientApp and the nodes' contexts, then answer (node, wire) requests until
    the pipe closes or ``None`` arrives."""
    _ensure_task_identity()
    client_app = app_factory()
    contexts = {node: Context(run_id=1, node_id=node, node_config=config, state=RecordDict(), run_config={})
                for node, config in configs.items()}
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):
            return
        if item is None:
            return
        node, wire = item
        conn.send(_run_client(client_app, contexts[node], wire))


def _stop_workers(conns, procs, threads: ThreadPoolExecutor) -> None:
    threads.shutdown(wait=True)
    for conn in conns:
        with contextlib.suppress(OSError):  # a worker already gone has nothing to be told
            conn.send(None)
        conn.close()
    for proc in procs:
        proc.join(timeout=5.0)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5.0)


def _ensure_task_identity() -> None:
    """Flower's Message constructor reads the process's task identity (set by its runtimes); set one here."""
    from flwr.supercore.task_identity import TaskIdentity

    if TaskIdentity._run_id is None:
        TaskIdentity.run_id = 1
        TaskIdentity.task_id = 1
        TaskIdentity.node_id = 0


__all__ = ["LoopbackGrid", "ProcessLoopbackGrid", "ProxyGrid", "decode_message", "encode_message"]
