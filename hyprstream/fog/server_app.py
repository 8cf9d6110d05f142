"""The fog's Flower ServerApp for the deployment engine (``hyprstream fog run`` starts it).

It reads the fog's config file named by the run config key ``fog-config`` and runs rounds over the
agents connected to this fog's SuperLink until ``rounds.max_rounds`` is reached or the run is stopped.
The rounds run on the round engine (:mod:`hyprstream.fog.engine`), the simulator's too: with
``[privacy.secagg]`` through :class:`~hyprstream.fog.secure.SecureFogAggregator` wrapped around the fog
(and ``[privacy.client_dp]`` adds client-level DP, see docs/privacy.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from hyprstream.coreapi.client import CoreClient
from hyprstream.durable import write_bytes_atomic
from hyprstream.errors import HyprstreamError
from hyprstream.fog.aggregator import FogAggregator, FogRound, RoundPlan
from hyprstream.fog.config import FogConfig, LayerSchedule, RoundMode, load_fog_config, read_token
from hyprstream.fog.discovery import discover, wait_for_nodes
from hyprstream.fog.engine import Lane, Runner, buffered_privacy, open_ledger, round_runner, run_buffered, run_sync
from hyprstream.fog.metrics import FogMetrics, MetricsServer
from hyprstream.fog.outbox import Outbox
from hyprstream.fog.secure import SecureFogAggregator
from hyprstream.privacy.config import PrivacyConfig
from hyprstream.runtime import log_formatter

log = logging.getLogger("hyprstream.fog")

FOG_CONFIG_KEY = "fog-config"
STATE_DIR_KEY = "state-dir"
STATUS_FILE = "status.json"  # the outcome of the last run of the ServerApp, in the state directory
# The fog's own log, appended in the state directory. ``flwr run --stream`` shows the ServerApp's log only
# as far as the SuperLink relayed it before the stream ended; this file keeps every line.
LOG_FILE = "fog.log"
# How often the deployed fog asks its SuperLink for replies (and for connected nodes). Every ask is an HTTPS
# request that the SuperLink serves; the in-memory intervals (20-50 ms) kept a SuperLink busy with a fifth
# of a core per fog. SuperNodes themselves fetch messages every 3 s, so 0.25 s adds little to a round.
SUPERLINK_POLL_S = 0.25

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    path = context.run_config.get(FOG_CONFIG_KEY)
    if not path:
        raise HyprstreamError(f"run config lacks {FOG_CONFIG_KEY!r} (the fog's TOML file)")
    logging.getLogger("hyprstream").setLevel(logging.INFO)
    state = Path(str(context.run_config[STATE_DIR_KEY])) if context.run_config.get(STATE_DIR_KEY) else None
    with _logging_to(state / LOG_FILE) if state is not None else nullcontext():
        _main(grid, path, state)


def _main(grid: Grid, path: str, state: Path | None) -> None:
    metrics = None
    try:
        cfg = load_fog_config(str(path))
        metrics = FogMetrics(cfg.name)
        rounds = run_fog(grid, cfg, state_dir=state, metrics=metrics, poll_s=SUPERLINK_POLL_S)
    except BaseException as exc:
        log.exception("the fog's round loop failed")
        if state is not None:  # flwr run exits 0 whatever the ServerApp did: leave the outcome to read
            write_status(state, {"status": "failed", "error": str(exc)}, metrics)
        raise
    if state is not None:
        write_status(state, {"status": "finished", "rounds": len(rounds)}, metrics)


@contextmanager
def _logging_to(path: Path) -> Iterator[None]:
    """Append hyprstream's log records to ``path`` (owner-only) while the run lasts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(log_formatter())
    root = logging.getLogger("hyprstream")
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def write_status(state_dir: Path, status: dict, metrics: FogMetrics | None) -> None:
    """``status.json``: the run's outcome and, with client-level DP, the model's spend at this fog
    (``privacy``: ``epsilon``, ``epsilon_budget`` -- null when unlimited -- and ``delta``)."""
    privacy = metrics.privacy() if metrics is not None else None
    if privacy is not None:
        budget = privacy["epsilon_budget"]
        status = {**status, "privacy": {**privacy, "epsilon_budget": budget if math.isfinite(budget) else None}}
    write_bytes_atomic(state_dir / STATUS_FILE, json.dumps(status).encode())


def round_plan(cfg: FogConfig, layers: tuple[str, ...]) -> RoundPlan:
    """What the fog's ``[rounds]`` asks of a round over ``layers`` (sync and buffered rounds alike)."""
    r = cfg.rounds
    return RoundPlan(task=r.task, layers=tuple(layers), local_steps=r.local_steps, batch_size=r.batch_size, lr=r.lr,
                     min_replies=r.min_replies, timeout_s=r.timeout_s, max_update_norm=r.max_update_norm,
                     update_encoding=r.update_encoding.value, aggregation=r.rule, trim_fraction=r.trim_fraction)


def layers_for(cfg: FogConfig, round_no: int) -> tuple[str, ...]:
    r = cfg.rounds
    if r.schedule is LayerSchedule.ROUND_ROBIN:
        return (r.layers[(round_no - 1) % len(r.layers)],)
    return r.layers


def run_fog(grid: Grid, cfg: FogConfig, *, state_dir: Path | None = None, stop: threading.Event | None = None,
            on_round: Callable[[FogRound], None] | None = None, metrics: FogMetrics | None = None,
            poll_s: float | None = None) -> list[FogRound]:
    """Run rounds until ``max_rounds`` (or ``stop``); returns their outcomes. Pushes that core has not
    acknowledged wait in ``state_dir/outbox`` (kept across restarts); with client-level DP the model's
    privacy ledger is ``state_dir/privacy`` (in memory without a state directory). ``poll_s``: how often
    the grid is asked for replies and connected nodes (default: each component's own interval, made for
    an in-memory grid; see :data:`SUPERLINK_POLL_S`)."""
    core = CoreClient(cfg.core.location, read_token(cfg.core.token_file), **cfg.core.flight_options())
    metrics = metrics if metrics is not None else FogMetrics(cfg.name)
    server = None
    try:
        with ExitStack() as resources:
            if cfg.metrics.port:
                token = read_token(cfg.metrics.token_file) if cfg.metrics.token_file else None
                server = MetricsServer(metrics, cfg.metrics.host, cfg.metrics.port, token=token,
                                       stale_after_s=cfg.metrics.stale_after_s).start()
                resources.callback(server.stop)
            return _rounds(grid, cfg, core, metrics, state_dir, stop or threading.Event(), on_round, resources,
                           poll_s)
    finally:
        core.close()


def private_rounds(fog: FogAggregator, privacy: PrivacyConfig, state_dir: Path | None,
                   resources: ExitStack, *, poll_s: float | None = None) -> Runner:
    """:func:`~hyprstream.fog.engine.round_runner` for a deployed fog: with client-level DP the model's
    ledger is the store ``state_dir/privacy``, open until ``resources`` close (in memory without a state
    directory)."""
    ledger = None
    if privacy.client_dp is not None and state_dir is not None:
        ledger = open_ledger(state_dir / "privacy")
        resources.callback(ledger.store.close)
    return round_runner(fog, privacy.secagg, privacy.client_dp, ledger=ledger, poll_s=poll_s)


def _record_privacy(metrics: FogMetrics, lane: Lane) -> None:
    spent = lane.spent()
    dp = lane.client_dp
    if spent is not None and dp is not None:
        metrics.record_privacy(spent, dp.epsilon_budget, dp.delta)


def _rounds(grid, cfg, core, metrics, state_dir, stop, on_round, resources, poll_s) -> list[FogRound]:
    """The deployed fog: one lane of the round engine (:mod:`hyprstream.fog.engine`) over the agents connected
    to this fog's SuperLink, asked again before every round (the fleet changes between rounds)."""
    r = cfg.rounds
    selector = _fleet_and_offload(cfg, resources)
    devices = _agents(grid, cfg, stop, poll_s)
    if devices is None:
        return []
    outbox = Outbox(state_dir / "outbox") if state_dir is not None else Outbox()
    options = {} if poll_s is None else {"poll_s": poll_s}
    fog = FogAggregator(cfg.name, grid, _ordered(devices), core, cfg.core.model, round_plan(cfg, layers_for(cfg, 1)),
                        outbox=outbox, **options)
    lane = Lane(private_rounds(fog, cfg.privacy, state_dir, resources, poll_s=poll_s), selector, devices)
    if r.mode is RoundMode.BUFFERED:
        return _buffered_rounds(lane, cfg, metrics, stop, on_round, poll_s)
    _record_privacy(metrics, lane)  # a restarted fog reports its ledger at once
    known = {1: devices}

    def prepare(round_no: int):
        found = known.pop(round_no, None) or _agents(grid, cfg, stop, poll_s)
        if found is None:
            return None
        # the fleet changes between rounds: keep the fog (and its push sequence), update the rest
        fog.node_ids, fog.plan, lane.devices = _ordered(found), round_plan(cfg, layers_for(cfg, round_no)), found
        return [None]

    def record(_: int, __, result: FogRound) -> None:
        _evaluate(grid, fog, core, cfg, metrics, result.version, poll_s)
        log.info("fog %s round %d: %d/%d agents, version %s%s", cfg.name, result.round, result.participants,
                 len(fog.node_ids), result.version, f" ({result.reasons[0]})" if result.reasons else "",
                 extra={"fog": cfg.name, "round": result.round, "model": cfg.core.model,
                        "model_version": result.version, "participants": result.participants})
        metrics.record(result, len(fog.outbox), fog.last_staleness)
        _record_privacy(metrics, lane)
        if on_round is not None:
            on_round(result)

    return run_sync([lane], rounds=r.max_rounds, prepare=prepare, on_round=record, stop=stop, pause_s=r.pause_s,
                    idle_wait_s=max(r.pause_s, 1.0))


def _evaluate(grid, fog: FogAggregator, core: CoreClient, cfg: FogConfig, metrics: FogMetrics,
              version: int | None, poll_s: float | None) -> None:
    """With ``rounds.evaluate``: score a version this fog's push made on its agents' held-out data."""
    if not cfg.rounds.evaluate or version is None:
        return
    from hyprstream.fog.evaluation import evaluate_version

    score = evaluate_version(grid, fog.node_ids, core, fog=cfg.name, model=cfg.core.model, task=cfg.rounds.task,
                             version=version, timeout_s=cfg.rounds.timeout_s,
                             **({} if poll_s is None else {"poll_s": poll_s}))
    if score is not None:
        metrics.record_evaluation(score.version, score.loss, score.accuracy, score.devices)


def _ordered(devices) -> list[int]:
    """Node IDs in device order (Flower's node IDs are random; rounds are reproducible in this order)."""
    return sorted(devices, key=lambda n: devices[n].device_id)


def _agents(grid: Grid, cfg: FogConfig, stop: threading.Event, poll_s: float | None = None):
    """The connected agents that answer the device query, once at least ``rounds.min_agents`` do; a
    fog keeps waiting for its fleet (agents join late, restart, miss a query) until it is stopped
    (then None)."""
    r = cfg.rounds
    while not stop.is_set():
        try:
            nodes = wait_for_nodes(grid, r.min_agents, timeout_s=r.timeout_s,
                                   **({} if poll_s is None else {"poll_s": poll_s}))
        except HyprstreamError as exc:
            log.warning("fog %s: %s; still waiting", cfg.name, exc)
            continue
        devices = discover(grid, nodes, timeout_s=r.timeout_s, require_all=False, poll_s=poll_s)
        if len(devices) >= r.min_agents:
            return devices
        log.warning("fog %s: %d agent(s) answered, %d needed; asking again", cfg.name, len(devices), r.min_agents)
        stop.wait(max(r.pause_s, 1.0))
    return None


def _fleet_and_offload(cfg: FogConfig, resources: ExitStack):
    """Start the fleet view (``[fleet]``) and the offload endpoint (``[offload]``) when configured; they
    stop when ``resources`` close. Returns the round selector, or None without a fleet view."""
    if cfg.offload.enabled:
        from hyprstream.fog.offload import offload_server

        resources.enter_context(offload_server(cfg))  # started now, stopped when the fog stops
    if not cfg.fleet.enabled:
        return None
    from hyprstream.fog.fleet import FleetView
    from hyprstream.fog.selection import RoundSelector

    view = resources.enter_context(FleetView(cfg.fleet.fleet, cfg.fleet.broker()))
    if not view.wait_subscribed(cfg.rounds.timeout_s):
        log.warning("fog %s: fleet view not subscribed yet; agents without telemetry are ranked on their data",
                    cfg.name)
    return RoundSelector(view, cfg.fleet.rules(), count=cfg.fleet.clients_per_round, window=cfg.fleet.fairness_window,
                         warmup_s=cfg.fleet.warmup_s)


def _buffered_rounds(lane: Lane, cfg: FogConfig, metrics: FogMetrics, stop: threading.Event,
                     on_round, poll_s) -> list[FogRound]:
    """``rounds.mode = "buffered"``: FedBuff (:func:`~hyprstream.fog.engine.run_buffered`) over the agents
    connected at start, each buffer one secure cohort round with ``[privacy.secagg]``; ``max_rounds`` counts
    pushes."""
    import sys

    from hyprstream.fog.buffered import BufferedFog

    r, fog, selector = cfg.rounds, lane.fog, lane.selector
    fog.plan = round_plan(cfg, r.layers)
    options = {} if poll_s is None else {"poll_s": poll_s}
    concurrency = r.concurrency or len(fog.node_ids)
    choose = None
    if selector is not None:  # every free slot goes to an eligible agent the fleet view chooses
        concurrency = selector.count or concurrency  # fleet.clients_per_round > 0: that many train at once

        def choose(idle: tuple[int, ...], slots: int, call: int) -> tuple[int, ...]:
            return selector.choose({n: lane.devices[n] for n in idle if n in lane.devices}, call, count=slots)
    buffered = BufferedFog(fog, buffer_k=r.buffer_k, max_staleness=r.max_staleness,
                           concurrency=min(concurrency, len(fog.node_ids)),
                           secure=lane.runner if isinstance(lane.runner, SecureFogAggregator) else None, choose=choose,
                           private=buffered_privacy(lane.runner), **options)
    done: list[FogRound] = []

    def record(push) -> None:
        result = push.as_round()
        _evaluate(lane.fog.grid, fog, lane.fog.core, cfg, metrics, push.version, poll_s)
        log.info("fog %s push %d: %d update(s), staleness max %d, version %s", cfg.name, push.index,
                 push.participants, push.max_staleness, push.version,
                 extra={"fog": cfg.name, "round": push.index, "model": cfg.core.model, "model_version": push.version,
                        "participants": push.participants})
        done.append(result)
        metrics.record(result, len(fog.outbox), fog.last_staleness)
        _record_privacy(metrics, lane)
        if on_round is not None:
            on_round(result)

    _record_privacy(metrics, lane)  # a restarted fog reports its ledger at once
    run_buffered([buffered], max_pushes=r.max_rounds or sys.maxsize, stop=stop, on_push=record)
    if buffered.finished:
        log.warning("fog %s: buffered rounds end: %s", cfg.name, buffered.finished)
    return done


__all__ = ["FOG_CONFIG_KEY", "STATE_DIR_KEY", "STATUS_FILE", "app", "layers_for", "private_rounds", "run_fog",
           "write_status"]
