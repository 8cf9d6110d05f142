"""Runs an experiment: device stores, a real core Flight server, fog loops and Flower's simulation engine.

Core and the fogs run in this process, all sharing one grid: the grid of the run that ``flwr run``
submits to a SuperLink of the run's own, relayed here by the ServerApp Flower's runtime runs
(:mod:`hyprstream.sim.relay`); agents are the real ClientApp running in Flower's Ray-backed simulation
engine, each reading its own device store. Everything between tiers goes through the real interfaces: Flight to core, Flower
messages to agents.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hyprstream.agent.client_app import SIM_DEVICES_ENV, SIM_DEVICES_KEY, THREADS_ENV, THREADS_KEY, device_name
from hyprstream.learning.task import Dataset, Task, get_task
from hyprstream.learning.trainer import evaluate, load_weights
from hyprstream.core.auth import Principal, Role, TokenRegistry, new_token
from hyprstream.coreapi.client import CoreClient
from hyprstream.core.repository import ModelRepository, ModelSettings
from hyprstream.core.server import CoreFlightServer
from hyprstream.errors import ConfigError, HyprstreamError
from hyprstream.fog.aggregate import resolve_rule
from hyprstream.fog.aggregator import FogAggregator, FogRound, RoundPlan
from hyprstream.fog.discovery import discover, wait_for_nodes
from hyprstream.fog.engine import Lane, open_ledger, round_runner, run_sync
from hyprstream.sim import partition
from hyprstream.sim.devices import FleetData
from hyprstream.sim.experiment import Engine, Experiment, PartitionScheme, TrainingMode
from hyprstream.fog.selection import RoundSelector
from hyprstream.sim.fleet import SimulatedFleetView, VirtualFleet
from hyprstream.sim.metrics import MetricsLog, Row
from hyprstream.sim.pretrain import initial_state, record
from hyprstream.store import Store
from hyprstream.store import layer_table as lt

log = logging.getLogger("hyprstream.sim")

DEVICE_TABLE = "devices.arrow"  # the batched engine's devices (hyprstream.sim.devices)
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


@dataclass(frozen=True)
class CoreEndpoint:
    """Where the run's core listens, with a read-only token (for observers such as dashboards)."""

    location: str
    reader_token: str


@dataclass(frozen=True)
class SimulationResult:
    out: Path
    metrics: MetricsLog
    final_version: int
    final_accuracy: float
    final_weights: dict[str, np.ndarray]


def natural_groups(task: Task, exp: Experiment, train: Dataset) -> np.ndarray:
    """The source (e.g. sensor mote) of every training sample, for ``partition.scheme = "natural"``."""
    if task.name != "sensor":
        raise ConfigError(f"task {task.name!r} has no natural grouping of its reference data (only 'sensor' "
                          "has: one mote per device)", key="partition.scheme")
    import pyarrow.compute as pc

    from hyprstream.learning.task import UNLABELLED
    from hyprstream.data.sensors import load_motes

    table = task.normalise(load_motes())
    motes = table.column("mote_id").to_numpy()[pc.not_equal(table.column("label"), UNLABELLED).to_numpy(
        zero_copy_only=False)]
    # the task's own train/test split: blocks of 50 labelled readings, a random quarter held out
    rng = np.random.default_rng(exp.seed)
    block = np.arange(len(motes)) // 50
    is_test = (rng.random(block.max() + 1) < 0.25)[block]
    groups = motes[~is_test]
    if len(groups) != len(train):
        raise HyprstreamError(f"the sensor task's split has {len(train)} training samples, the mote column "
                              f"{len(groups)}: natural partition unavailable")
    return groups


def split(exp: Experiment, task: Task, train: Dataset) -> list[np.ndarray]:
    """Each device's sample indices under the experiment's partition scheme."""
    rng = np.random.default_rng(exp.seed)
    if exp.partition.scheme is PartitionScheme.IID:
        return partition.iid(len(train), exp.num_agents, rng)
    if exp.partition.scheme is PartitionScheme.NATURAL:
        groups = natural_groups(task, exp, train)
        sources = np.unique(groups)
        if len(sources) != exp.num_agents:
            raise ConfigError(f"the natural partition gives one device per source: {len(sources)} sources, "
                              f"but the fleet has {exp.num_agents} agents (fogs x agents_per_fog)",
                              key="partition.scheme")
        return [np.flatnonzero(groups == s) for s in sources]
    if exp.partition.scheme is PartitionScheme.SAMPLED:
        return partition.sampled(len(train), exp.num_agents, exp.partition.min_samples,
                                 exp.partition.max_samples or exp.partition.min_samples, rng)
    return partition.dirichlet(train.y, exp.num_agents, exp.partition.alpha, rng,
                               min_samples=exp.partition.min_samples)


def prepare_devices(exp: Experiment, task: Task, train: Dataset, root: Path) -> list[int]:
    """Partition ``train`` and write each device's share into its own store; returns the sizes."""
    parts = split(exp, task, train)
    for i, idx in enumerate(parts):
        with Store.open(root / device_name(i), create=True) as store:
            store.create_table(task.table, task.schema)
            store.append(task.table, task.to_table(Dataset(train.x[idx], train.y[idx])))
    return [len(p) for p in parts]


@dataclass
class Prepared:
    """What every kind of run shares: the task, its held-out split, the device stores and the fleet."""

    task: Task
    test: Dataset
    sizes: list[int]
    fleet: VirtualFleet
    model: object  # a torch module of the task, for evaluation
    initial: dict[str, np.ndarray]  # the shared model's starting weights (hyprstream.sim.pretrain)
    data: FleetData | None = None  # the batched engine's devices (one table); None: a store per device

    def score(self, weights: dict[str, np.ndarray]) -> tuple[float, float]:
        """Held-out (loss, accuracy) of ``weights``."""
        load_weights(self.model, weights)
        return evaluate(self.task, self.model, self.test)


def prepare_run(exp: Experiment, out: Path) -> Prepared:
    os.environ.update(FLOWER_ENV)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(exp.task.name)
    train, test = task.load_reference_data(exp.seed)
    test = task.from_table(task.to_table(test))  # evaluate on exactly what a device would decode
    start = initial_state(exp, task, train, test)
    record(start, out)
    data = None
    if exp.runtime.engine is Engine.BATCHED:
        # one table partitioned by device, read back as the devices will train on it
        path = out / DEVICE_TABLE
        FleetData.from_parts(start.train, split(exp, task, start.train)).save(task, path)
        data = FleetData.load(task, path, exp.num_agents)
        sizes = data.sizes.tolist()
        log.info("prepared the table of %d devices (%d to %d samples)", len(sizes), min(sizes), max(sizes))
    else:
        sizes = prepare_devices(exp, task, start.train, out / "devices")
        log.info("prepared %d device stores (%d to %d samples)", len(sizes), min(sizes), max(sizes))
    return Prepared(task, test, sizes, VirtualFleet.build(exp), task.build_model(seed=exp.seed), start.weights, data)


def start_runtime(exp: Experiment, out: Path, client_app: str):
    """Flower's simulation runtime for ``exp``: ``exp.num_agents`` agents, each the ClientApp ``client_app``
    (a ``module:attribute`` reference), through the API Flower supports: ``flwr run`` against a SuperLink
    of this run's own (:class:`hyprstream.sim.relay.FlowerRuntime`, started at once; its ``run(main)``
    hands ``main`` the grid). A runtime that fails names itself and the tail of its log.

    On an existing Ray cluster (``[runtime] ray_address``, else ``RAY_ADDRESS``) Flower's runtime connects to
    it and spreads the agents over the cluster's nodes; they learn where their stores are from the run's
    config, so the device stores under ``out`` must be at the same path on every node (a shared file system).
    A cluster nobody answers at, or a setting the runtime cannot take, is refused before anything starts."""
    from hyprstream.agent.client_app import configure_simulation
    from hyprstream.sim.relay import FlowerRuntime

    address, client_cpus, ray_cpus = check_runtime(exp)
    devices = (out / "devices").resolve()
    configure_simulation(devices, exp.privacy.dpsgd)  # agents train with DP-SGD when it is configured
    env = {**FLOWER_ENV, SIM_DEVICES_ENV: str(devices), THREADS_ENV: str(exp.runtime.torch_threads)}
    if address:
        env["RAY_ADDRESS"] = address
    run_config = {SIM_DEVICES_KEY: str(devices), THREADS_KEY: exp.runtime.torch_threads}
    return FlowerRuntime(work=out / "flower", client_app=client_app, num_supernodes=exp.num_agents,
                         client_cpus=client_cpus, ray_cpus=ray_cpus, run_config=run_config, env=env,
                         start_timeout_s=max(180.0, exp.runtime.round_timeout_s))


def check_runtime(exp: Experiment) -> tuple[str, int, int | None]:
    """The Ray cluster's address (empty: a local instance), whole CPUs per agent actor and the CPUs a local
    instance announces (:func:`actor_cpus`); a cluster nobody answers at is refused at once, by name."""
    address = exp.runtime.ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:
        _check_reachable(address)
    return (address, *actor_cpus(exp.runtime.client_cpus, cluster=bool(address)))


def simulate(exp: Experiment, out: Path, main: Callable[[object], None], client_app: str) -> None:
    """``main(grid)`` on :func:`start_runtime` ``(exp, out, client_app)``, stopped after."""
    with start_runtime(exp, out, client_app) as runtime:
        runtime.run(main)


def actor_cpus(client_cpus: float, *, cluster: bool) -> tuple[int, int | None]:
    """``[runtime] client_cpus`` as Flower's simulation runtime takes it: whole CPUs per agent actor, and the
    CPUs the local Ray instance announces (None: all it finds). Flower reserves whole CPUs per actor, so a
    fraction (``0.5``: two agents per core) becomes one CPU per actor on a Ray instance that announces the
    host's usable cores / ``client_cpus``; a cluster's resources are its own, so there it must be whole."""
    if client_cpus == int(client_cpus):
        return int(client_cpus), None
    if cluster:
        raise ConfigError(f"must be a whole number of CPUs on a Ray cluster (Flower reserves whole CPUs per agent), "
                          f"got {client_cpus:g}", key="runtime.client_cpus")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1, max(1, round(usable / client_cpus))


def _check_reachable(address: str) -> None:
    """Refuse, at once and by name, a cluster address that is not ``host:port`` or where nobody listens
    (Ray itself would retry for minutes)."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        raise HyprstreamError(f"the Ray cluster address must be the head's host:port (GCS), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise HyprstreamError(f"cannot reach the Ray cluster at {address} ([runtime] ray_address or RAY_ADDRESS): "
                              f"{exc.strerror or exc}") from None


AGENT_APP = "hyprstream.agent.client_app:app"  # the ClientApp every simulated agent runs
StepCallback = Callable[[int, list[FogRound], Row, CoreEndpoint | None], None]


def _lane(exp: Experiment, fog: FogAggregator, out: Path, j: int) -> Lane:
    """Fog ``j``'s lane of the round engine: its rounds secure (and with client-level DP) when the
    experiment configures it, with seeded randomness (a simulation must be reproducible; a deployed fog
    never seeds it)."""
    from hyprstream.privacy.noise import SeededRandom

    secagg, ledger = exp.privacy.secagg, None
    source = SeededRandom(exp.seed * 7919 + j) if secagg is not None or exp.privacy.client_dp is not None else None
    if secagg is not None:
        from dataclasses import replace

        # The simulated agents share one pool of Ray workers, so one fog's later stages queue behind the other
        # fogs' training: a wall-clock stage timeout would drop clients depending on the machine's load. Every
        # stage gets at least the round's timeout (results must not depend on load).
        secagg = replace(secagg, stage_timeout_s=max(secagg.stage_timeout_s, exp.runtime.round_timeout_s))
    if exp.privacy.client_dp is not None:
        ledger = open_ledger(out / "fogs" / fog.name / "privacy")
    from hyprstream.sim.batched import BatchedFog, BatchedSecureFog

    if secagg is not None and isinstance(fog, BatchedFog):  # the protocol's output, computed (docs/architecture.md)
        return Lane(BatchedSecureFog(fog, secagg, exp.privacy.client_dp, ledger=ledger, source=source))
    return Lane(round_runner(fog, secagg, exp.privacy.client_dp, ledger=ledger, source=source))


def _select(exp: Experiment, lanes: list[Lane], fleet: VirtualFleet, devices, device_of) -> SimulatedFleetView | None:
    """With ``fleet.clients_per_round``, every fog chooses its agents as a deployed fog does (its own
    :class:`RoundSelector` over the simulated telemetry, on the simulated clock); the view to update at
    each step, None without selection."""
    if not exp.fleet.clients_per_round:
        return None
    view = SimulatedFleetView(fleet, {device_of[n]: devices[n].device_id for n in device_of}, task=exp.task.name,
                              dpsgd=exp.privacy.dpsgd)
    for lane in lanes:
        lane.selector = RoundSelector(view, exp.fleet.rules(), count=exp.fleet.clients_per_round,
                                      window=exp.fleet.fairness_window, clock=lambda: view.now)
        lane.devices = {n: devices[n] for n in lane.fog.node_ids}
    return view


def _fog_extra(lane: Lane, r: FogRound) -> dict:
    """Per-round figures beyond ``FogRound``: client-level epsilon and bytes pushed to core."""
    epsilon = None
    if lane.client_dp is not None:
        last = lane.runner.last
        epsilon = last.privacy.epsilon if last is not None and last.privacy is not None else lane.spent()
    pushed = sum(int(d.nbytes) for d in r.delta.values()) if r.version is not None else 0
    return {"client_epsilon": epsilon, "bytes_core": pushed}


def run(exp: Experiment, out: Path, *, on_step: StepCallback | None = None) -> SimulationResult:
    """Run ``exp`` and write its artefacts into ``out``."""
    started = time.monotonic()
    check_runtime(exp)  # what Flower's runtime would refuse, refused before anything is prepared
    prep = prepare_run(exp, out)
    task, fleet = prep.task, prep.fleet

    tokens = TokenRegistry()
    admin_token = new_token()
    tokens.add(admin_token, Principal("simulator", Role.ADMIN))
    reader_token = new_token()
    tokens.add(reader_token, Principal("observer", Role.READER))
    fog_names = [f"fog-{j}" for j in range(exp.fleet.fogs)]
    fog_tokens = {name: new_token() for name in fog_names}
    for name, token in fog_tokens.items():
        tokens.add(token, Principal(name, Role.FOG))
    server = CoreFlightServer(ModelRepository(out / "core"), tokens)
    location = server.start_background()
    endpoint = CoreEndpoint(location, reader_token)
    admin = CoreClient(location, admin_token)
    model_name = f"{exp.task.name}-model"
    admin.register_model(model_name, lt.to_table(prep.initial, layer=task.layer_of),
                         ModelSettings(exp.core.consistency, exp.core.max_update_norm))

    metrics = MetricsLog()
    plan = RoundPlan(task=exp.task.name, layers=exp.training.layers, local_steps=exp.training.local_steps,
                     batch_size=exp.training.batch_size, lr=exp.training.lr,
                     min_replies=exp.training.min_replies, timeout_s=exp.runtime.round_timeout_s,
                     aggregation=resolve_rule(exp.training.aggregation), trim_fraction=exp.training.trim_fraction,
                     **_encoding(exp))
    score = prep.score

    def run_lanes(node_ids: list[int], devices: dict, make_fog, tell) -> None:
        """The run's fogs over ``node_ids`` (ordered by device): ``make_fog(j, name, nodes)`` makes fog ``j``;
        ``tell(plan)`` gives the agents their strategies of a step."""
        device_of = {node: i for i, node in enumerate(node_ids)}
        per_fog = exp.fleet.agents_per_fog
        lanes = [_lane(exp, make_fog(j, name, node_ids[j * per_fog:(j + 1) * per_fog]), out, j)
                 for j, name in enumerate(fog_names)]
        view = _select(exp, lanes, fleet, devices, device_of)
        if exp.training.mode.value == "buffered":  # FedBuff fogs on one simulated clock instead of steps
            from hyprstream.sim.buffered import run_buffered

            run_buffered(exp, lanes, fleet=fleet, device_of=device_of, devices=out / "devices", view=view,
                         admin=admin, model=model_name, metrics=metrics, score=score, started=started,
                         on_step=on_step and (lambda s, rounds, row: on_step(s, rounds, row, endpoint)))
            return
        clock = {"sim_s": 0.0, "durations": [], "busy": {}}

        def prepare(step: int) -> list[list[int]]:
            # the simulated fleet of this step: who is online, in which strategy, with what battery
            fleet_now = fleet.plan_step(step, clock["sim_s"])
            tell(fleet_now)
            if view is not None:
                view.update(fleet_now, clock["sim_s"])
            metrics.add_fleet(fleet_now, fleet.names)
            clock["durations"], clock["busy"] = [], {}
            return [[n for n in lane.fog.node_ids if fleet_now.trains(device_of[n])] for lane in lanes]

        def on_round(j: int, pending, r: FogRound) -> None:
            # the fog's own round, scored on its base plus its delta; its simulated duration
            base = lt.to_arrays(pending.base.table, copy=True)
            for name, d in r.delta.items():
                base[name] = base[name] + d
            loss, acc = score(base)
            n_params = sum(a.size for a in base.values())
            agents = fleet.agent_seconds(r, device_of, base_params=n_params)
            clock["busy"].update(agents)
            seconds = fleet.round_seconds(r, device_of, base_params=n_params, agents=agents)
            clock["durations"].append(seconds)
            metrics.add_fog_round(r, accuracy=acc, loss=loss, wall_s=time.monotonic() - started,
                                  sim_s=clock["sim_s"] + seconds, **_fog_extra(lanes[j], r))
            metrics.add_participation(r, device_of)

        def on_global(step: int, rounds: list[FogRound]) -> None:
            longest = max(clock["durations"], default=0.0)
            clock["sim_s"] += longest
            fleet.finish_step(clock["busy"], longest)
            current = admin.get_weights(model_name)
            metrics.base_versions[step] = rounds[0].base_version
            loss, acc = score(lt.to_arrays(current.table))
            row = metrics.add_global(step, current.version, accuracy=acc, loss=loss, rounds=rounds,
                                     wall_s=time.monotonic() - started, sim_s=clock["sim_s"])
            if on_step is not None:
                on_step(step, rounds, row, endpoint)

        # every fog's round of a step starts from the version current at the step's start (they run
        # concurrently on the shared grid)
        run_sync(lanes, rounds=exp.training.global_steps, prepare=prepare, on_round=on_round, on_step=on_global)

    def main(grid) -> None:
        node_ids = wait_for_nodes(grid, exp.num_agents, timeout_s=exp.runtime.round_timeout_s)
        # Flower's node IDs are random: order agents by device so that runs are reproducible.
        devices = discover(grid, node_ids, timeout_s=exp.runtime.round_timeout_s)
        node_ids = sorted(node_ids, key=lambda n: devices[n].device_id)
        run_lanes(node_ids, devices,
                  lambda j, name, nodes: FogAggregator(name, grid, nodes, CoreClient(location, fog_tokens[name]),
                                                       model_name, plan, seed=exp.seed + j),
                  lambda fleet_now: fleet.write_strategies(out / "devices", fleet_now))

    def main_batched() -> None:
        from hyprstream.protocol import DeviceInfo, data_bucket
        from hyprstream.sim.batched import BatchedDevices, BatchedFog

        device = batched_device(exp.runtime.device)
        engine = BatchedDevices(task, prep.data, device=device,
                                chunk=exp.runtime.batch_devices or (100_000 if device.startswith("cuda") else 4096))
        engine.hybrid_keep = [p.training.max_layer_groups_hybrid for p in fleet.profiles]
        if exp.privacy.dpsgd is not None:  # DP-SGD as simulated agents run it: the same settings, a ledger each
            from hyprstream.agent.client_app import configure_simulation, simulation_dpsgd

            configure_simulation(out / "devices", exp.privacy.dpsgd)
            engine.dpsgd, engine.ledgers = simulation_dpsgd(out / "devices"), out / "devices"
        # a device is its index: node i is device i (the order the Flower engine sorts its agents into)
        devices = {i: DeviceInfo(device_name(i), data_bucket(int(n))) for i, n in enumerate(prep.sizes)}

        def tell(fleet_now) -> None:
            engine.strategies = fleet_now.strategies

        run_lanes(list(range(exp.num_agents)), devices,
                  lambda j, name, nodes: BatchedFog(name, engine, nodes, CoreClient(location, fog_tokens[name]),
                                                    model_name, plan, seed=exp.seed + j), tell)

    try:
        # Flower's side starts once this side is prepared: started alongside, the two competed for the cores
        # (a reduced fashion-mnist-noniid run: 30.7 s against 28.4 s started after, on 2 cores)
        if exp.runtime.engine is Engine.BATCHED:
            main_batched()
        else:
            simulate(exp, out, main, AGENT_APP)
        final = admin.get_weights(model_name)
        final_weights = lt.to_arrays(final.table, copy=True)
        _, accuracy = score(final_weights)
    finally:
        admin.close()
        server.stop()
    buffered = exp.training.mode is TrainingMode.BUFFERED  # agents train from many versions, not a step's base
    metrics.read_device_privacy(out / "devices", step_of=metrics.step_of_version if buffered else metrics.step_of_base)
    metrics.write_run(out)
    return SimulationResult(out, metrics, final.version, accuracy, final_weights)


def batched_device(setting: str) -> str:
    """``[runtime] device`` as torch takes it: ``auto`` is CUDA when torch sees a GPU, else the CPU; a CUDA
    device torch cannot see is refused by name."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{setting}: torch sees no CUDA device here (use cpu or auto)", key="runtime.device")
    return setting


def _encoding(exp: Experiment) -> dict:
    """The round plan's update encoding, when the experiment asks for one other than fp32."""
    enc = exp.training.update_encoding
    return {} if enc.value == "fp32" else {"update_encoding": enc.value}
