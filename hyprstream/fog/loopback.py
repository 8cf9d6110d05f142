"""An in-process Flower ``Grid`` that runs a ``ClientApp`` per node synchronously (tests and benchmarks).

Messages travel through Flower's own protobuf encoding both ways (``message_to_proto`` /
``message_from_proto``), so what a node receives and returns is exactly what a SuperLink would
carry, byte for byte (:attr:`LoopbackGrid.bytes_down` / :attr:`bytes_up` count them). Each node has
its own persistent ``Context`` (like a SuperNode). ``drop(node, message)`` decides, per message,
whether a node goes silent (no reply, as a hung or disconnected client); ``seconds`` records the
time each node spent answering each message, so a caller can tell client time from fog time.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Sequence

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid


class LoopbackGrid(Grid):
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
        self._run = None
        _ensure_task_identity()

    # -- Grid interface
    def set_run(self, run) -> None:  # pragma: no cover - not used in process
        self._run = run

    @property
    def run(self):  # pragma: no cover
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def get_nodes(self):  # pragma: no cover
        return []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            msg.metadata.__dict__["_run_id"] = 1
            wire = message_to_proto(msg).SerializeToString()
            self.bytes_down += len(wire)
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            if node not in self.contexts or self.drop(node, msg):
                continue
            from flwr.proto.message_pb2 import Message as ProtoMessage

            proto = ProtoMessage()
            proto.ParseFromString(wire)
            received = message_from_proto(proto)
            t0 = time.perf_counter()
            try:
                reply = self.client_app(received, self.contexts[node])
            except Exception as exc:  # as Flower's runtimes do: the failure becomes an error reply
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=received)
            self.seconds.append((node, msg.metadata.message_type, time.perf_counter() - t0))
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            back = message_to_proto(reply).SerializeToString()
            self.bytes_up += len(back)
            proto = ProtoMessage()
            proto.ParseFromString(back)
            self._replies[msg.metadata.message_id] = message_from_proto(proto)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for mid in list(message_ids):
            reply = self._replies.pop(mid, None)
            if reply is not None:
                out.append(reply)
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))


def _ensure_task_identity() -> None:
    """Flower's Message constructor reads the process's task identity (set by its runtimes); set one here."""
    from flwr.supercore.task_identity import TaskIdentity

    if TaskIdentity._run_id is None:
        TaskIdentity.run_id = 1
        TaskIdentity.task_id = 1
        TaskIdentity.node_id = 0


__all__ = ["LoopbackGrid"]
