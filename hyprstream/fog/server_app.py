"""The fog's Flower ServerApp for the deployment engine (``hyprstream fog run`` starts it).

It reads the fog's config file named by the run config key ``fog-config`` and runs rounds over the
agents connected to this fog's SuperLink until ``rounds.max_rounds`` is reached or the run is stopped.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from hyprstream.core.client import CoreClient
from hyprstream.core.durable import write_bytes_atomic
from hyprstream.errors import HyprstreamError
from hyprstream.fog.aggregator import FogAggregator, FogRound, RoundPlan
from hyprstream.fog.config import FogConfig, LayerSchedule, load_fog_config, read_token
from hyprstream.fog.discovery import discover, wait_for_nodes
from hyprstream.fog.metrics import FogMetrics, MetricsServer
from hyprstream.fog.outbox import Outbox

log = logging.getLogger("hyprstream.fog")

FOG_CONFIG_KEY = "fog-config"
STATE_DIR_KEY = "state-dir"
STATUS_FILE = "status.json"  # the outcome of the last run of the ServerApp, in the state directory

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    path = context.run_config.get(FOG_CONFIG_KEY)
    if not path:
        raise HyprstreamError(f"run config lacks {FOG_CONFIG_KEY!r} (the fog's TOML file)")
    logging.getLogger("hyprstream").setLevel(logging.INFO)
    state = Path(str(context.run_config[STATE_DIR_KEY])) if context.run_config.get(STATE_DIR_KEY) else None
    try:
        rounds = run_fog(grid, load_fog_config(str(path)), state_dir=state)
    except BaseException as exc:
        if state is not None:  # flwr run exits 0 whatever the ServerApp did: leave the outcome to read
            write_bytes_atomic(state / STATUS_FILE, json.dumps({"status": "failed", "error": str(exc)}).encode())
        raise
    if state is not None:
        write_bytes_atomic(state / STATUS_FILE, json.dumps({"status": "finished", "rounds": len(rounds)}).encode())


def layers_for(cfg: FogConfig, round_no: int) -> tuple[str, ...]:
    r = cfg.rounds
    if r.schedule is LayerSchedule.ROUND_ROBIN:
        return (r.layers[(round_no - 1) % len(r.layers)],)
    return r.layers


def run_fog(grid: Grid, cfg: FogConfig, *, state_dir: Path | None = None, stop: threading.Event | None = None,
            on_round: Callable[[FogRound], None] | None = None) -> list[FogRound]:
    """Run rounds until ``max_rounds`` (or ``stop``); returns their outcomes. Pushes that core has not
    acknowledged wait in ``state_dir/outbox`` (kept across restarts)."""
    kwargs = {"tls_root_certs": Path(cfg.core.tls_root_cert).read_bytes()} if cfg.core.tls_root_cert else {}
    core = CoreClient(cfg.core.location, read_token(cfg.core.token_file), **kwargs)
    metrics = FogMetrics(cfg.name)
    server = None
    if cfg.metrics.port:
        token = read_token(cfg.metrics.token_file) if cfg.metrics.token_file else None
        server = MetricsServer(metrics, cfg.metrics.host, cfg.metrics.port, token=token,
                               stale_after_s=cfg.metrics.stale_after_s).start()
    try:
        return _rounds(grid, cfg, core, metrics, state_dir, stop or threading.Event(), on_round)
    finally:
        if server is not None:
            server.stop()
        core.close()


def _rounds(grid, cfg, core, metrics, state_dir, stop, on_round) -> list[FogRound]:
    r = cfg.rounds
    fog: FogAggregator | None = None
    done: list[FogRound] = []
    round_no = 0
    while not stop.is_set() and (r.max_rounds == 0 or round_no < r.max_rounds):
        round_no += 1
        nodes = wait_for_nodes(grid, r.min_agents, timeout_s=r.timeout_s)
        devices = discover(grid, nodes, timeout_s=r.timeout_s)
        ordered = sorted(devices, key=lambda n: devices[n].device_id)
        plan = RoundPlan(task=r.task, layers=layers_for(cfg, round_no), local_steps=r.local_steps,
                         batch_size=r.batch_size, lr=r.lr, min_replies=r.min_replies, timeout_s=r.timeout_s,
                         max_update_norm=r.max_update_norm)
        if fog is None:
            outbox = Outbox(state_dir / "outbox") if state_dir is not None else Outbox()
            fog = FogAggregator(cfg.name, grid, ordered, core, cfg.core.model, plan, outbox=outbox)
        else:  # the fleet changes between rounds: keep the fog (and its push sequence), update the rest
            fog.node_ids, fog.plan = ordered, plan
        result = fog.run_round(round_no)
        log.info("fog %s round %d: %d/%d agents, version %s%s", cfg.name, round_no, result.participants,
                 len(ordered), result.version, f" ({result.reasons[0]})" if result.reasons else "")
        done.append(result)
        metrics.record(result, len(fog.outbox))
        if on_round is not None:
            on_round(result)
        if r.pause_s:
            stop.wait(r.pause_s)
    return done


__all__ = ["FOG_CONFIG_KEY", "STATE_DIR_KEY", "STATUS_FILE", "app", "layers_for", "run_fog"]
