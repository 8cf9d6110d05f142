"""The simulator's buffered asynchronous mode (``training.mode = "buffered"``): FedBuff fogs on one
simulated clock.

Each fog the harness built (a real :class:`~hyprstream.fog.aggregator.FogAggregator` on the Flower
simulation grid) is wrapped in a :class:`~hyprstream.fog.buffered.BufferedFog` with a virtual clock and
driven by the round engine's buffered scheduler (:func:`hyprstream.fog.engine.run_buffered`, the deployed
fog's too):
an agent job lasts what :meth:`VirtualFleet.agent_job_seconds` says for that device (the request's
bytes down, the reply's bytes up in the experiment's update encoding, the training FLOPs of the
plan's layers, each from the device profile's link and compute speed). All fogs share one simulated
clock: the scheduler always steps the fog whose next completion is earliest (ties: the lower fog index),
so versions reach core in simulated-time order. A push is committed at its completion time plus the
fog -> core transfer of its delta; that is the ``sim_s`` of its metrics row. Agents that finish are
sent the next request at once (the push's transfer does not delay them).

Budget. By default the same number of agent updates as the sync run of the same experiment asks
for, ``global_steps * agents_per_fog`` per fog: the run stops after
``fogs * ceil(global_steps * agents_per_fog / buffer_k)`` pushes in total, so both modes spend the
same local training work, the buffered one without waiting for stragglers. With
``[buffered] sim_seconds`` the run instead handles every completion up to that simulated time (the
budget for time-to-accuracy comparisons: fast agents' updates are discounted or refused as stale
less often than stragglers', so equal work need not mean equal accuracy; what the comparison
measures is the simulated time each mode needs to reach a target, which does not depend on the
budget once the target is reached).
Devices. A fog offers a job to an idle agent at the simulated instant a slot frees (at the start, and
each time one of its agents finishes), and the device's state at that instant decides
(:meth:`VirtualFleet.observe_at`): online by the trace (``fleet.availability_trace``) or, without one, by
a draw with its profile's availability, fixed per device and instant (each offer draws anew, as each sync
step does); its battery charged for the time passed and drained for the jobs it did; its adaptive
strategy from the policy observing that battery. A device offline or in ``minimal`` is passed over and
offered again at the next free slot; one in ``hybrid`` trains the last ``max_layer_groups_hybrid`` of
the layer groups, and its job lasts what those cost. With ``fleet.clients_per_round`` the fog's own
:class:`~hyprstream.fog.selection.RoundSelector` chooses among the eligible idle agents from their
telemetry at that instant (:class:`~hyprstream.sim.fleet.SimulatedFleetView`), and that many train at
once. When no agent of a fog is training and none of its idle ones is eligible, simulated time moves on
by a minute and they are offered again (:class:`~hyprstream.fog.buffered.BufferedFog`'s ``retry_s``).

Metrics: one ``fog_round`` row per push (:meth:`BufferedPush.as_round`, its ``round`` set to the
global step it falls in), scored on the master model core holds right after the push; one ``global``
row every ``fogs`` pushes (a global step commits as many versions as a sync step does), scored on
the same model, and one for the pushes left over when a ``sim_seconds`` budget ends the run. With the same seed the metrics are the same apart from ``wall_s``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from pathlib import Path

from hyprstream.agent.profile import Strategy
from hyprstream.codec import Encoding, encoded_nbytes
from hyprstream.coreapi.client import CoreClient
from hyprstream.fog import engine
from hyprstream.fog.aggregator import FogRound
from hyprstream.fog.buffered import BufferedFog, BufferedPush, Dispatch
from hyprstream.fog.engine import Lane
from hyprstream.fog.secure import SecureFogAggregator
from hyprstream.sim import clock
from hyprstream.sim.experiment import Experiment
from hyprstream.sim.fleet import SimulatedFleetView, VirtualFleet
from hyprstream.sim.metrics import MetricsLog, Row
from hyprstream.store import layer_table as lt

Score = Callable[[dict[str, np.ndarray]], tuple[float, float]]


def push_budget(exp: Experiment) -> int:
    """Pushes in total over all fogs: the sync run's agent updates, ``buffer_k`` per push."""
    per_fog = math.ceil(exp.training.global_steps * exp.fleet.agents_per_fog / exp.buffered.buffer_k)
    return exp.fleet.fogs * per_fog


def job_duration(exp: Experiment, fleet: VirtualFleet, device_of: Mapping[int, int],
                 params: Mapping[str, tuple[str, tuple[int, ...]]]) -> Callable[[int, Dispatch], float]:
    """``duration(node, dispatch)`` for a BufferedFog: simulated seconds of one agent job, over the layer
    groups the device trains in its current strategy (a ``hybrid`` device the last of them); the device's
    battery drains for that time (:meth:`VirtualFleet.worked`).

    ``params`` maps each parameter name to its (layer group, shape)."""
    encoding = Encoding(exp.training.update_encoding.value)
    total = sum(int(np.prod(shape)) for _, shape in params.values())

    def duration(node: int, dispatch: Dispatch) -> float:
        device = device_of[node]
        layers = dispatch.layers
        if fleet.strategy(device) is Strategy.HYBRID:
            layers = layers[-fleet.profiles[device].training.max_layer_groups_hybrid:]
        trained = [shape for layer, shape in params.values() if layer in layers]
        flops = clock.training_flops(total, sum(int(np.prod(s)) for s in trained), fleet.local_samples)
        up = sum(encoded_nbytes(s, encoding) for s in trained)
        seconds = fleet.agent_job_seconds(device, down_bytes=dispatch.bytes_down, up_bytes=up, flops=flops)
        fleet.worked(device, dispatch.sent_at, seconds)
        return seconds

    return duration


def offers(fleet: VirtualFleet, lane: Lane, device_of: Mapping[int, int], devices: Path,
           view: SimulatedFleetView | None, now: Callable[[], float]) -> Callable[[tuple[int, ...], int, int], list[int]]:
    """A BufferedFog's ``choose`` for ``lane``: of the idle agents offered a job at the simulated time ``now()``,
    those whose device is online and not in ``minimal`` then (by the lane's selector, with one), each told its
    strategy before its request leaves."""

    def choose(idle: tuple[int, ...], slots: int, call: int) -> list[int]:
        t = now()
        eligible = [n for n in idle
                    if fleet.observe_at(device_of[n], t) and fleet.strategy(device_of[n]) is not Strategy.MINIMAL]
        if lane.selector is not None and view is not None:
            view.update(fleet.snapshot(call), t)
            chosen = list(lane.selector.choose({n: lane.devices[n] for n in eligible}, call, count=slots))
        else:
            chosen = eligible[:slots]
        for node in chosen:
            fleet.write_strategy(devices, device_of[node], fleet.strategy(device_of[node]))
        return chosen

    return choose


def push_seconds(fleet: VirtualFleet, push: BufferedPush) -> float:
    """Simulated seconds of the fog -> core transfer of ``push``'s delta (0 when nothing was committed)."""
    if push.version is None:
        return 0.0
    nbytes = sum(int(d.nbytes) for d in push.delta.values())
    return clock.transfer_s(nbytes, fleet.fog_core.uplink_mbps, fleet.fog_core.latency_ms)


def run_buffered(exp: Experiment, lanes: Sequence[Lane], *, fleet: VirtualFleet, device_of: Mapping[int, int],
                 devices: Path, view: SimulatedFleetView | None, admin: CoreClient, model: str, metrics: MetricsLog,
                 score: Score, started: float,
                 on_step: Callable[[int, list[FogRound], Row], None] | None = None) -> None:
    """Run the experiment's buffered mode on the fogs of ``lanes`` until its budget (:func:`push_budget` pushes,
    or ``[buffered] sim_seconds``) is spent, recording rows in ``metrics``; ``on_step(step, fog_rounds,
    global_row)`` after each global row. ``devices``: the device stores (their strategy files); ``view``: the
    fleet view the lanes' selectors read, with ``fleet.clients_per_round``."""
    table = admin.get_weights(model).table
    names, layers = table.column("name").to_pylist(), table.column("layer").to_pylist()
    shapes = [tuple(s) for s in table.column("shape").to_pylist()]
    params = {n: (layer, s) for n, layer, s in zip(names, layers, shapes, strict=True)}
    duration = job_duration(exp, fleet, device_of, params)
    cfg = exp.buffered
    buffered = []
    for lane in lanes:
        runner = lane.runner
        # a selection keeps that many agents training at once, as at a deployed fog
        concurrency = min(exp.fleet.clients_per_round or cfg.concurrency or len(lane.fog.node_ids),
                          len(lane.fog.node_ids))
        # a secure runner: every buffer is one SecAgg+ round among the agents that filled it
        b = BufferedFog(lane.fog, buffer_k=cfg.buffer_k, max_staleness=cfg.max_staleness, concurrency=concurrency,
                        duration=duration, secure=runner if isinstance(runner, SecureFogAggregator) else None,
                        private=engine.buffered_privacy(runner))
        b.choose = offers(fleet, lane, device_of, devices, view, lambda b=b: b.now)
        buffered.append(b)
    privacy = {b.fog.name: b.private for b in buffered if b.private is not None}
    state = {"step": 1, "rounds": [], "master": None, "acc": float("nan"), "loss": float("nan"), "sim_s": 0.0}

    def on_push(push: BufferedPush) -> None:
        step, rounds = state["step"], state["rounds"]
        r = dataclasses.replace(push.as_round(), round=step)
        state["sim_s"] = push.sim_time + push_seconds(fleet, push)
        state["master"] = master = admin.get_weights(model)
        state["loss"], state["acc"] = loss, acc = score(lt.to_arrays(master.table))
        pushed = sum(int(d.nbytes) for d in r.delta.values()) if r.version is not None else 0
        private = privacy.get(push.fog)  # client-level DP: the model's epsilon after this push
        metrics.add_fog_round(r, accuracy=acc, loss=loss, wall_s=time.monotonic() - started, sim_s=state["sim_s"],
                              bytes_core=pushed, client_epsilon=private.spent() if private is not None else None)
        metrics.add_participation(r, device_of)
        if not rounds:
            metrics.base_versions[step] = push.base_version
        rounds.append(r)
        if len(rounds) == len(lanes):
            metrics.add_fleet(fleet.snapshot(step), fleet.names)
            row = metrics.add_global(step, master.version, accuracy=acc, loss=loss, rounds=rounds,
                                     wall_s=time.monotonic() - started, sim_s=state["sim_s"])
            if on_step is not None:
                on_step(step, rounds, row)
            state["step"], state["rounds"] = step + 1, []

    engine.run_buffered(buffered, max_pushes=sys.maxsize if cfg.sim_seconds is not None else push_budget(exp),
                        sim_until=cfg.sim_seconds, on_push=on_push)
    step, rounds, master = state["step"], state["rounds"], state["master"]
    acc, loss, sim_s = state["acc"], state["loss"], state["sim_s"]
    if rounds:  # a sim_seconds budget ended the run within a global step
        metrics.add_fleet(fleet.snapshot(step), fleet.names)
        row = metrics.add_global(step, master.version, accuracy=acc, loss=loss, rounds=rounds,
                                 wall_s=time.monotonic() - started, sim_s=sim_s)
        if on_step is not None:
            on_step(step, rounds, row)


__all__ = ["job_duration", "offers", "push_budget", "push_seconds", "run_buffered"]
