"""Finding a fog's agents on its Flower grid: wait until enough are connected, ask each who it is."""

from __future__ import annotations

import logging
import time

from flwr.app import Message, RecordDict

from hyprstream.errors import HyprstreamError
from hyprstream.protocol import DEVICE_QUERY_TYPE, DeviceInfo

log = logging.getLogger("hyprstream.fog")


def wait_for_nodes(grid, count: int, *, timeout_s: float, poll_s: float = 0.1) -> list[int]:
    """Node IDs of the grid once ``count`` nodes have connected (they join asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) >= count:
            return ids
        if time.monotonic() > deadline:
            raise HyprstreamError(f"only {len(ids)} of {count} agents connected in {timeout_s:g} s (raise "
                                  f"rounds.timeout_s; in a simulation, [runtime] round_timeout_s)")
        time.sleep(poll_s)


def discover(grid, node_ids: list[int], *, timeout_s: float, require_all: bool = True,
             poll_s: float | None = None) -> dict[int, DeviceInfo]:
    """Ask every node which device it is (``query.device``); returns the answers by node ID.

    With ``require_all`` (the simulator: every agent must be there) a node that fails or does not answer
    is an error; without it (a deployed fog: agents come and go) it is left out and logged. ``poll_s``:
    ask the grid for replies at this interval (default: the grid's own ``send_and_receive``, which Flower's
    SuperLink grid polls every 3 s)."""
    messages = [Message(RecordDict(), dst_node_id=n, message_type=DEVICE_QUERY_TYPE) for n in node_ids]
    found: dict[int, DeviceInfo] = {}
    replies = (grid.send_and_receive(messages, timeout=timeout_s) if poll_s is None
               else send_and_receive(grid, messages, timeout_s, poll_s))
    for reply in replies:
        node = reply.metadata.src_node_id
        try:
            if reply.has_error():
                raise HyprstreamError(f"node {node} failed the device query: {reply.error.reason}")
            found[node] = DeviceInfo.from_content(reply.content)
        except HyprstreamError as exc:  # ValidationError included: a malformed answer
            if require_all:
                raise
            log.warning("left out this round: %s", exc)
    if not require_all:
        if len(found) < len(node_ids):
            log.warning("%d of %d agents answered the device query", len(found), len(node_ids))
        return found
    if len(found) != len(node_ids):
        silent = ", ".join(str(n) for n in node_ids if n not in found)
        raise HyprstreamError(f"only {len(found)} of {len(node_ids)} agents answered the device query within "
                              f"{timeout_s:g} s; silent: node(s) {silent} (raise rounds.timeout_s; in a "
                              f"simulation, [runtime] round_timeout_s)")
    return found


def send_and_receive(grid, messages: list[Message], timeout_s: float, poll_s: float) -> list[Message]:
    """``grid.send_and_receive`` that asks for replies every ``poll_s`` seconds (the replies that came within
    ``timeout_s``)."""
    waiting = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout_s
    replies: list[Message] = []
    while waiting:
        got = list(grid.pull_messages(waiting))
        replies.extend(got)
        waiting -= {m.metadata.reply_to_message_id for m in got}
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    return replies
