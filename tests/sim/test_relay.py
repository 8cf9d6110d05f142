"""The relay between Flower's simulation runtime and the simulator's process (``hyprstream.sim.relay``): the
grid it serves equals the grid it relays, only the key opens its port, and a run whose runtime fails is
reported with the runtime's own words and leaves no process behind."""

from __future__ import annotations

import socket
import threading
import time
from multiprocessing import Pipe
from multiprocessing.connection import Client
from pathlib import Path

import numpy as np
import psutil
import pytest
from flwr.app import Message, RecordDict

from hyprstream.errors import HyprstreamError
from hyprstream.fog.loopback import LoopbackGrid
from hyprstream.sim import relay


def echo_app():
    from flwr.clientapp import ClientApp

    from hyprstream.protocol import arrays_to_record, record_to_arrays

    app = ClientApp()

    @app.query("echo")
    def echo(msg, context):
        arrays = record_to_arrays(msg.content["arrays"])
        doubled = {k: 2 * v for k, v in arrays.items()}
        return Message(RecordDict({"arrays": arrays_to_record(doubled)}), reply_to=msg)

    return app


@pytest.fixture
def relayed():
    """A RelayGrid in front of a LoopbackGrid of three nodes, the relay served from a thread."""
    loop = LoopbackGrid(echo_app(), [11, 12, 13])
    ours, theirs = Pipe()
    server = threading.Thread(target=relay.serve, args=(theirs, loop), daemon=True)
    server.start()
    grid = relay.RelayGrid(ours)
    yield grid, loop
    grid.done()
    server.join(timeout=10)
    assert not server.is_alive()


@pytest.mark.unit
def test_the_relayed_grid_answers_as_the_grid_it_relays(relayed):
    from hyprstream.protocol import arrays_to_record, record_to_arrays

    grid, loop = relayed
    assert sorted(grid.get_node_ids()) == [11, 12, 13]
    sent = {n: np.arange(5, dtype=np.float32) * n for n in (11, 12, 13)}
    messages = [Message(RecordDict({"arrays": arrays_to_record({"w": sent[n]})}), dst_node_id=n,
                        message_type="query.echo") for n in sent]
    replies = grid.send_and_receive(messages, timeout=30)
    assert sorted(m.metadata.src_node_id for m in replies) == [11, 12, 13]
    for reply in replies:
        np.testing.assert_array_equal(record_to_arrays(reply.content["arrays"])["w"],
                                      2 * sent[reply.metadata.src_node_id])
    # the caller's messages learnt the IDs the relayed grid gave them, and the replies point at them
    assert {m.metadata.reply_to_message_id for m in replies} == {m.metadata.message_id for m in messages}
    assert loop.bytes_down > 0 and loop.bytes_up > 0  # every message crossed as Flower's wire bytes


@pytest.mark.unit
def test_a_refused_call_is_an_error_naming_it(relayed):
    grid, _ = relayed
    with pytest.raises(HyprstreamError, match="unknown relay call"):
        grid._call("reset_everything")
    assert sorted(grid.get_node_ids()) == [11, 12, 13]  # the relay keeps serving


@pytest.mark.unit
def test_only_the_key_opens_the_relay_port(monkeypatch):
    monkeypatch.setattr(relay, "HANDSHAKE_S", 1)
    key = b"k" * 32
    listener = relay._Listener(key)
    host, port = listener.address.split(":")
    got: dict = {}

    def strangers_then_the_relay():
        with pytest.raises(Exception):  # noqa: B017 - the handshake fails on the stranger's side, any way
            Client((host, int(port)), authkey=b"x" * 32)
        s = socket.create_connection((host, int(port)))  # says nothing: must not hold the port
        got["silent"] = s
        time.sleep(0.2)
        with socket.create_connection((host, int(port))) as raw:  # garbage instead of the handshake
            raw.sendall(b"GET / HTTP/1.1\r\n\r\n")
        got["conn"] = Client((host, int(port)), authkey=key)

    t = threading.Thread(target=strangers_then_the_relay, daemon=True)
    t.start()
    try:
        conn = listener.accept(time.monotonic() + 60, alive=lambda: None)
        conn.send("hello")
        t.join(timeout=30)
        assert got["conn"].recv() == "hello"  # the one holding the key got through
        got["conn"].close()
        conn.close()
    finally:
        got.get("silent") and got["silent"].close()
        listener.close()


@pytest.mark.unit
def test_accept_gives_up_with_the_reason_it_is_given():
    listener = relay._Listener(b"k" * 32)
    try:
        with pytest.raises(HyprstreamError, match="the runtime exited"):
            listener.accept(time.monotonic() + 60, alive=lambda: "the runtime exited")
        with pytest.raises(HyprstreamError, match="did not start"):
            listener.accept(time.monotonic() - 1, alive=lambda: None)
    finally:
        listener.close()


def _ours_since(t0: float) -> set[psutil.Process]:
    """Flower's and Ray's processes started since ``t0`` on this host (wherever the OS re-parented them)."""
    found = set()
    for p in psutil.process_iter(["create_time", "cmdline"]):
        try:
            line = " ".join(p.info["cmdline"] or [])
            if p.info["create_time"] >= t0 - 1 and any(w in line for w in ("flwr", "flower-", "ray", "raylet")):
                found.add(p)
        except psutil.Error:
            continue
    return found - {psutil.Process()}


@pytest.mark.integration
@pytest.mark.slow
def test_a_runtime_killed_mid_run_is_an_error_naming_it_and_leaves_no_process(tmp_path):
    """The runtime (``flwr-simulation``, with the Ray instance it started) is SIGKILLed while the simulator
    drives the run: the next grid call fails, saying so, and every process of the run is gone after."""
    import os
    import signal

    t0 = time.time()
    seen: dict = {}

    def main(grid):
        for _ in range(600):  # until the agents (and so Ray) are up
            if len(list(grid.get_node_ids())) == 2:
                break
            time.sleep(0.1)
        runtime = [p for p in psutil.Process().children(recursive=True)
                   if any("flwr-simulation" in a for a in p.cmdline()[:2])]
        seen["runtime"] = [p.pid for p in runtime]
        for p in runtime:
            os.kill(p.pid, signal.SIGKILL)
        grid.get_node_ids()

    with pytest.raises(HyprstreamError, match="lost the connection to Flower's simulation runtime"):
        relay.run_on_superlink(main, work=tmp_path / "flower", client_app="hyprstream.agent.client_app:app",
                               num_supernodes=2, client_cpus=1, run_config={}, env={}, start_timeout_s=120)
    assert len(seen["runtime"]) == 1
    left = [p for p in _ours_since(t0) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [p.cmdline() for p in left]


@pytest.mark.unit
def test_client_cpus_become_whole_cpus_per_agent_actor():
    import os

    from hyprstream.errors import ConfigError
    from hyprstream.sim.harness import actor_cpus

    usable = len(os.sched_getaffinity(0))
    assert actor_cpus(1.0, cluster=False) == (1, None)
    assert actor_cpus(2.0, cluster=True) == (2, None)
    # a fraction packs agents per core: one CPU per actor on a Ray instance announcing cores / fraction
    assert actor_cpus(0.5, cluster=False) == (1, 2 * usable)
    assert actor_cpus(0.25, cluster=False) == (1, 4 * usable)
    with pytest.raises(ConfigError, match="whole number of CPUs on a Ray cluster") as err:
        actor_cpus(0.5, cluster=True)
    assert err.value.key == "runtime.client_cpus"


@pytest.mark.unit
@pytest.mark.parametrize("node_config, threads, applied", [
    ({"partition-id": 0}, 3, True),  # a simulated agent: the experiment's threads
    ({"store-dir": "/var/lib/dev", "partition-id": 0}, 3, False),  # a device: not the run submitter's to size
    ({"partition-id": 0}, 1000, False),  # out of the experiment's range
    ({"partition-id": 0}, "3", False),  # not a whole number
])
def test_only_a_simulated_agent_takes_its_torch_threads_from_the_run_config(monkeypatch, node_config, threads,
                                                                               applied):
    import torch
    from flwr.app import Context

    from hyprstream.agent import client_app
    from hyprstream.fog.loopback import _ensure_task_identity
    from hyprstream.protocol import ReplyStatus, TrainReply

    _ensure_task_identity()  # Flower's Message constructor reads it (its runtimes set it)
    before = torch.get_num_threads()
    monkeypatch.setattr(client_app, "answer_train", lambda content, context, round: TrainReply(
        ReplyStatus.DECLINED, 0, (), {}, reason="stub"))
    ctx = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                  run_config={client_app.THREADS_KEY: threads})
    msg = Message(RecordDict(), dst_node_id=1, message_type="train.layerwise")
    try:
        client_app.train(msg, ctx)
        assert torch.get_num_threads() == (threads if applied else before)
    finally:
        torch.set_num_threads(before)


@pytest.mark.unit
def test_a_run_config_cannot_move_a_devices_store(monkeypatch, tmp_path):
    """The run config names the simulation's store root for simulated agents only: a device keeps the store
    its node config names, whatever a submitted run says."""
    from flwr.app import Context

    from hyprstream.agent.client_app import (
        SIM_DEVICES_ENV,
        SIM_DEVICES_KEY,
        simulation_root,
        store_dir,
    )

    monkeypatch.delenv(SIM_DEVICES_ENV, raising=False)
    evil = {SIM_DEVICES_KEY: str(tmp_path / "elsewhere")}
    device = Context(run_id=1, node_id=1, node_config={"store-dir": "/var/lib/dev", "partition-id": 0},
                     state=RecordDict(), run_config=evil)
    assert store_dir(device) == Path("/var/lib/dev")
    simulated = Context(run_id=1, node_id=2, node_config={"partition-id": 3}, state=RecordDict(), run_config=evil)
    assert store_dir(simulated) == tmp_path / "elsewhere" / "device-0003"
    plain = Context(run_id=1, node_id=3, node_config={"partition-id": 3}, state=RecordDict(), run_config={})
    assert simulation_root(plain) is None
