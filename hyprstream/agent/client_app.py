"""The agent's Flower ClientApp: the same code answers the simulator and real SuperNodes.

The device's local store is found from the node config: ``store-dir`` (real devices,
``flower-supernode --node-config "store-dir=/var/lib/hyprstream/store"``) or, in simulation,
``$HYPRSTREAM_SIM_DEVICES/device-<partition-id>``.

On a device the agent daemon also passes ``device-id`` (the answer to ``query.device``; the store
directory's name otherwise) and ``state-dir`` (see :mod:`hyprstream.agent.handoff`): the
ClientApp then saves each global model it receives there (the daemon exports it for inference) and
plans every train request by the daemon's current strategy (:func:`~hyprstream.agent.policy.plan_training`):
``minimal`` declines, ``hybrid`` trains fewer layer groups with smaller batches on the CPU, ``full``
trains everything asked, on the GPU when allowed. Without ``state-dir`` (simulation) requests are
served as asked. An encrypted store is opened with the key in ``$HYPRSTREAM_STORE_KEY``.

Sample-level DP-SGD (:mod:`hyprstream.privacy.dpsgd`): on a device whose profile (the one the daemon
runs with) holds ``[privacy.dpsgd]``, and in a simulation that :func:`configure_simulation` set up,
every round trains with :class:`~hyprstream.privacy.dpsgd.DpSgdTrainer`. Its spend is charged to the
device's ledger (``<store-dir>.privacy`` unless ``ledger_dir`` says otherwise) before it trains, so it
composes across rounds and restarts; the reply carries the device's total ``epsilon`` / ``delta``, and
a round the budget cannot pay for is declined with the reason, training nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from hyprstream.agent.policy import BUDGET_DECLINE
from hyprstream.errors import ConfigError, HyprstreamError
from hyprstream.privacy import secagg_messages as wire
from hyprstream.privacy.config import DpSgdConfig, FloorConfig
from hyprstream.privacy.dpsgd import DpSgd, DpSgdTrainer, epsilon_floor, ledger_dir_for
from hyprstream.privacy.errors import BudgetExceeded
from hyprstream.privacy.floor import plain_round_shortfall, secure_round_shortfall
from hyprstream.privacy.ledger import Budget
from hyprstream.privacy.secagg_messages import SECAGG_ACTION, Stage, Status
from hyprstream.privacy.secagg_mod import secagg_mod
from hyprstream.protocol import (DeviceInfo, EvaluateReply, EvaluateRequest, ReplyStatus, TrainReply, TrainRequest,
                                 data_bucket)

log = logging.getLogger("hyprstream.agent")

SIM_DEVICES_ENV = "HYPRSTREAM_SIM_DEVICES"
THREADS_ENV = "HYPRSTREAM_TORCH_THREADS"
# the same two settings in the run's config (``context.run_config``), as ``hyprstream simulate`` submits them
# with ``flwr run``: how agents on another node of a Ray cluster, whose environment is not the simulator's,
# learn them
SIM_DEVICES_KEY = "hyprstream-sim-devices"
THREADS_KEY = "hyprstream-torch-threads"
SIM_PRIVACY_FILE = "privacy.json"  # the experiment's DP-SGD settings, under $HYPRSTREAM_SIM_DEVICES
SIM_PRIVACY_SCHEMA = "hyprstream.sim-privacy/1"
SIM_STRATEGY_SCHEMA = "hyprstream.sim-strategy/1"  # a simulated device's strategy (hyprstream.sim.fleet)


class ModuleClientApp(ClientApp):
    """A ClientApp held in a module attribute that pickles as a reference to it (``module:attribute``).

    Flower's simulation engine sends the ClientApp to a Ray actor with every message it runs; a plain
    ClientApp pickles by value, with each registered handler's wrapper (and its mods) serialised again
    per message. By reference it is a few bytes, and the actor uses the same app from the imported
    module: the same code, without the per-message serialisation."""

    def __init__(self, ref: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self._ref = ref

    def __reduce__(self):
        return (resolve_app, (self._ref,))


def resolve_app(ref: str) -> ClientApp:
    """The ClientApp at ``ref`` (``module:attribute``)."""
    import importlib

    module, _, attr = ref.partition(":")
    found = getattr(importlib.import_module(module), attr)
    if not isinstance(found, ClientApp):
        raise HyprstreamError(f"{ref} is not a ClientApp")
    return found


app = ModuleClientApp(f"{__name__}:app")


def simulation_root(context) -> str | None:
    """Where a simulation keeps its devices' stores (the run config's, else ``$HYPRSTREAM_SIM_DEVICES``);
    None outside a simulation."""
    run_config = getattr(context, "run_config", None) or {}
    return str(run_config.get(SIM_DEVICES_KEY) or "") or os.environ.get(SIM_DEVICES_ENV) or None


def store_dir(context: Context) -> Path:
    cfg = context.node_config
    if "store-dir" in cfg:
        return Path(str(cfg["store-dir"]))
    root = simulation_root(context)
    if root and "partition-id" in cfg:
        return Path(root) / device_name(int(cfg["partition-id"]))
    raise HyprstreamError("node config names no 'store-dir' (and this is not a simulation)")


def device_name(index: int) -> str:
    return f"device-{index:04d}"


def train(msg: Message, context: Context) -> Message:
    threads = (context.run_config or {}).get(THREADS_KEY)
    # a simulated agent only (a device's store is in its node config, and whoever submits a run does not
    # size a device's threads): the experiment's torch threads, as the simulator checked them
    if threads and "store-dir" not in context.node_config and isinstance(threads, int) and 1 <= threads <= 64:
        import torch

        torch.set_num_threads(threads)
    return Message(answer_train(msg.content, context, round=msg.metadata.group_id).to_content(), reply_to=msg)


def device_floor(context: Context) -> FloorConfig | None:
    """The privacy floor of the profile the agent daemon runs with; None where there is no profile (a
    simulation, a SuperNode without the daemon) or the daemon has not published its policy yet (the
    planner then declines every round)."""
    state = agent_state_dir(context)
    if state is None:
        return None
    from hyprstream.agent.handoff import read_policy
    from hyprstream.agent.profile import load_profile

    policy = read_policy(state)
    return load_profile(policy.profile).privacy.floor if policy is not None else None


def floor_mod(msg: Message, context: Context, call_next) -> Message:
    """Client middleware: decline a train request below the device's privacy floor (``[privacy.floor]``),
    before anything trains or any key is made; a floor that cannot be read declines too."""
    try:
        floor = device_floor(context)
    except HyprstreamError as exc:
        return _decline(msg, f"cannot read the device's privacy floor: {exc}")
    if floor is None:
        return call_next(msg, context)
    if not wire.is_secagg(msg.content):
        reason = plain_round_shortfall(floor)
    else:
        try:
            h = wire.header(msg.content)
            setup = wire.setup_from(msg.content)[0] if h.stage is Stage.SETUP else None
        except HyprstreamError:
            return call_next(msg, context)  # malformed: the secure-aggregation middleware refuses it
        reason = secure_round_shortfall(floor, setup) if setup is not None else None
    return call_next(msg, context) if reason is None else _decline(msg, reason)


def _decline(msg: Message, reason: str) -> Message:
    log.warning("declined train request below the privacy floor: %s", reason)
    if wire.is_secagg(msg.content):
        try:
            round_id = wire.header(msg.content).round_id
        except HyprstreamError:
            round_id = b"\x00" * 16
        return Message(wire.reply_status(Stage.SETUP, round_id, Status.DECLINED, reason), reply_to=msg)
    return Message(_declined(msg.content, reason).to_content(), reply_to=msg)


def _declined(content: RecordDict, reason: str) -> TrainReply:
    config = content.get("config")
    version = config.get("model_version", -1) if isinstance(config, ConfigRecord) else -1
    return TrainReply(ReplyStatus.DECLINED, version if isinstance(version, int) else -1, (), reason=reason)


app.train("layerwise", mods=[floor_mod])(train)


@dataclass(frozen=True)
class PrivateTraining:
    """Sample-level DP-SGD of one device: its settings, its ledger store and the subject it charges."""

    settings: DpSgd
    ledger_dir: Path
    device_id: str

    def trainer(self) -> DpSgdTrainer:
        return DpSgdTrainer(self.settings, self.ledger_dir, self.device_id)

    def spend(self, num_examples: int, batch_size: int, steps: int, group: int = 1) -> tuple[float, float]:
        """The device's epsilon so far and after a round of ``steps`` at ``batch_size`` (at the budget's delta),
        for a task whose stored record enters ``group`` examples (``Task.examples_per_record``)."""
        from hyprstream.privacy.accountant import PldAccountant
        from hyprstream.privacy.ledger import PrivacyLedger, Scope
        from hyprstream.store import Store

        event = self.settings.event(num_examples, batch_size, steps, group)
        delta = self.settings.budget.delta
        floor = epsilon_floor(event, delta)  # over the budget alone: declined without reading the ledger
        over = floor > self.settings.budget.epsilon
        if not self.ledger_dir.exists():
            acc = PldAccountant()
            return acc.epsilon(delta), floor if over else acc.epsilon_if(event, delta)
        with Store.open(self.ledger_dir, readonly=True) as store:
            ledger = PrivacyLedger(store)
            return (ledger.spent(Scope.DEVICE, self.device_id, delta),
                    floor if over else ledger.would_spend(Scope.DEVICE, self.device_id, event, delta))


def configure_simulation(root: Path, dpsgd: DpSgdConfig | None) -> None:
    """Record the experiment's DP-SGD settings for the simulated devices under ``root`` (the directory
    ``$HYPRSTREAM_SIM_DEVICES`` names); ``None`` turns DP-SGD off. Simulated devices train with seeded
    noise (``secure`` false: reproducible from the request's seed), each charging its ledger at
    ``<root>/<device-name>.privacy``. A simulation has no device profile to take the budget from:
    ``epsilon_budget`` and ``delta`` must be given."""
    from hyprstream.durable import write_bytes_atomic

    path = Path(root) / SIM_PRIVACY_FILE
    if dpsgd is None:
        path.unlink(missing_ok=True)
        return
    for key in ("epsilon_budget", "delta"):
        if getattr(dpsgd, key) is None:
            raise ConfigError(f"a simulation needs {key} (there is no device profile to default it from)",
                              key=f"privacy.dpsgd.{key}")
    data = {"schema": SIM_PRIVACY_SCHEMA, "noise_multiplier": dpsgd.noise_multiplier,
            "max_grad_norm": dpsgd.max_grad_norm, "epsilon_budget": dpsgd.epsilon_budget, "delta": dpsgd.delta}
    Path(root).mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, json.dumps(data).encode(), sync=False)


def _read_sim_file(path: Path, schema: str, what: str) -> dict | None:
    """A JSON object the simulator wrote for its agents, checked for ``schema``; None when there is none."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {what}: {exc}", source=str(path)) from None
    if not isinstance(data, dict) or data.get("schema") != schema:
        raise ConfigError(f"expected schema {schema!r}", source=str(path), key="schema")
    return data


def simulation_dpsgd(root: Path) -> DpSgd | None:
    """The DP-SGD settings :func:`configure_simulation` recorded under ``root`` (None: off)."""
    path = Path(root) / SIM_PRIVACY_FILE
    data = _read_sim_file(path, SIM_PRIVACY_SCHEMA, "the simulation's DP-SGD settings")
    if data is None:
        return None
    try:
        return DpSgd(float(data["noise_multiplier"]), float(data["max_grad_norm"]),
                     Budget(float(data["epsilon_budget"]), float(data["delta"])), secure=False)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"invalid DP-SGD settings: {exc}", source=str(path)) from None


def private_training(context: Context, store: Path) -> PrivateTraining | None:
    """This device's DP-SGD: from the profile the agent daemon runs with (a device), from
    :func:`configure_simulation` (a simulated device), else None (DP-SGD off)."""
    cfg = context.node_config
    device_id = str(cfg.get("device-id") or store.name)
    state = agent_state_dir(context)
    if state is not None:
        from hyprstream.agent.handoff import read_policy
        from hyprstream.agent.profile import load_profile

        policy = read_policy(state)
        if policy is None:
            return None  # the planner declines: the daemon has not published its strategy yet
        profile = load_profile(policy.profile)
        settings = profile.dpsgd()
        if settings is None:
            return None
        return PrivateTraining(settings, profile.privacy.ledger_dir(store), device_id)
    root = simulation_root(context)
    if root and "store-dir" not in cfg:
        settings = simulation_dpsgd(Path(root))
        return PrivateTraining(settings, ledger_dir_for(store), device_id) if settings is not None else None
    return None


def strategy_file(store: Path) -> Path:
    """Where the simulator puts a simulated device's current strategy: ``<store>.strategy.json``."""
    return store.with_name(store.name + ".strategy.json")


def simulated_plan(request: TrainRequest, store: Path):
    """A simulated device's :class:`~hyprstream.agent.policy.TrainPlan` for ``request`` under the strategy
    the simulator gave it (:func:`strategy_file`); None when it gave none (train as asked).

    ``minimal`` declines; ``hybrid`` trains the last ``max_layer_groups_hybrid`` requested layer groups
    (as :func:`~hyprstream.agent.policy.plan_training` does on a device); the request's steps and batch
    size apply in every strategy."""
    from hyprstream.agent.profile import Strategy

    path = strategy_file(store)
    data = _read_sim_file(path, SIM_STRATEGY_SCHEMA, "the simulated strategy")
    if data is None:
        return None
    try:
        strategy = Strategy(data["strategy"])
        keep = data["max_layer_groups_hybrid"]
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"invalid simulated strategy: {exc}", source=str(path)) from None
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise ConfigError(f"must be an integer >= 1, got {keep!r}", source=str(path), key="max_layer_groups_hybrid")
    return strategy_plan(request, strategy, keep)


def strategy_plan(request: TrainRequest, strategy, keep: int):
    """What a simulated device in ``strategy`` (``keep``: its profile's ``max_layer_groups_hybrid``) does with
    ``request`` (:func:`simulated_plan`; the batched engine, :mod:`hyprstream.sim.batched`, plans by it too)."""
    from hyprstream.agent.policy import TrainPlan
    from hyprstream.agent.profile import Strategy

    if strategy is Strategy.MINIMAL:
        return TrainPlan(False, "strategy minimal: inference only, training deferred")
    layers = tuple(request.layers) if strategy is Strategy.FULL else tuple(request.layers[-keep:])
    return TrainPlan(True, f"strategy {strategy.value}: {len(layers)} of {len(request.layers)} layer group(s)",
                     layers, request.local_steps, request.batch_size, "cpu", math.inf)


def agent_state_dir(context: Context) -> Path | None:
    """The agent daemon's state directory from the node config, if this is a device."""
    value = context.node_config.get("state-dir")
    return Path(str(value)) if value else None


HOLDOUT_SALT = "holdout.salt"  # in the agent's state directory: keys which examples are held out


@dataclass(frozen=True)
class Holdout:
    """The device's held-out split: ``share`` of its examples, chosen by a keyed hash of each (``salt``)."""

    share: float
    salt: bytes


HOLDOUT_SHARE_KEY = "holdout-share"  # node config of a SuperNode without the agent daemon (and tests)


def device_holdout(context: Context) -> Holdout | None:
    """The device's held-out split: ``training.holdout_share`` of the agent daemon's profile (or the node
    config's ``holdout-share`` where no daemon runs); None with a share of 0. The salt is made once per
    device and kept beside its state (``<state-dir>/holdout.salt``, else ``<store>.holdout.salt``; mode 0600)."""
    state_dir = agent_state_dir(context)
    if state_dir is not None:
        from hyprstream.agent.handoff import read_policy
        from hyprstream.agent.profile import load_profile

        policy = read_policy(state_dir)
        share = load_profile(policy.profile).training.holdout_share if policy is not None else 0.0
        path = state_dir / HOLDOUT_SALT
    else:
        try:
            share = float(context.node_config.get(HOLDOUT_SHARE_KEY, 0.0))
        except (TypeError, ValueError):
            raise ConfigError("must be a number", key=HOLDOUT_SHARE_KEY) from None
        if not 0.0 <= share <= 0.5:
            raise ConfigError(f"must be in [0, 0.5], got {share}", key=HOLDOUT_SHARE_KEY)
        store = store_dir(context)
        path = store.with_name(store.name + "." + HOLDOUT_SALT)
    if share <= 0:
        return None
    from hyprstream.durable import create_once

    salt = create_once(path, lambda: os.urandom(32))
    if len(salt) != 32:
        raise HyprstreamError(f"{path}: a held-out salt must be 32 bytes (remove it to make a new one, which "
                              f"moves examples between the splits)")
    return Holdout(share, salt)


def local_data(store_path: Path, task, holdout: Holdout | None):
    """The task's examples in the store as (training, held out); nothing is held out without ``holdout``."""
    from hyprstream.learning.task import holdout as split
    from hyprstream.store import Store, load_key

    with Store.open(store_path, readonly=True, key=load_key()) as store:
        data = task.from_table(store.read(task.table))
    return split(data, holdout.share if holdout is not None else 0.0, holdout.salt if holdout is not None else b"")


def plan_request(request: TrainRequest, state_dir: Path, *, now: float | None = None,
                 privacy: PrivateTraining | None = None, num_examples: int = 0):
    """The :class:`~hyprstream.agent.policy.TrainPlan` for ``request`` under the daemon's current strategy;
    with DP-SGD (``privacy``, over ``num_examples`` local examples) it declines when the budget left
    cannot pay for the planned round."""
    from hyprstream.agent.handoff import read_policy
    from hyprstream.agent.policy import TrainPlan, plan_training, within_budget
    from hyprstream.agent.profile import load_profile

    state = read_policy(state_dir)
    if state is None:
        return TrainPlan(False, "the agent daemon has not published its strategy yet")
    if not state.fresh(now):
        return TrainPlan(False, "the agent daemon's strategy is stale (is the agent running?)")
    caps = load_profile(state.profile).training
    plan = plan_training(state.strategy, caps, layers=request.layers, local_steps=request.local_steps,
                         batch_size=request.batch_size, gpu_usable=state.gpu_usable)
    if privacy is None or not plan.accept:
        return plan
    from hyprstream.learning.task import get_task

    spent, would_be = privacy.spend(num_examples, plan.batch_size, plan.local_steps,
                                    get_task(request.task).examples_per_record)
    budget = privacy.settings.budget.epsilon
    if would_be > budget:  # the numbers stay in the device's log: the reply names no epsilon
        log.info("privacy budget: this round would raise epsilon from %.4g to %.4g, over the budget of %.4g",
                 spent, would_be, budget)
    return within_budget(plan, spent=spent, would_be=would_be, budget=budget)


def answer_train(content: RecordDict, context: Context, *, round: str = "") -> TrainReply:
    """The reply to a train request: the delta, or ``declined`` with the reason (never a crash).
    ``round`` names the round in the device's privacy ledger (the message's group ID)."""
    try:
        request = TrainRequest.from_content(content)
        store = store_dir(context)
        privacy = private_training(context, store)
        state = agent_state_dir(context)
        plan = None
        holdout = device_holdout(context)
        if state is not None:
            from hyprstream.agent.handoff import save_model
            from hyprstream.learning.task import get_task
            from hyprstream.store import load_key

            task = get_task(request.task)
            save_model(state, task.name, request.model_version, request.weights, layer_of=task.layer_of,
                       key=load_key())
            plan = plan_request(request, state, privacy=privacy,
                                num_examples=len(local_data(store, task, holdout)[0]) if privacy is not None else 0)
        elif simulation_root(context) and "store-dir" not in context.node_config:
            plan = simulated_plan(request, store)
        if plan is not None:
            if not plan.accept:
                raise HyprstreamError(plan.reason)
            log.info("train request for %s: %s", list(request.layers), plan.reason,
                     extra={"model": request.model, "model_version": request.model_version})
        return handle_train(request, store, plan=plan, privacy=privacy, round=round, holdout=holdout)
    except BudgetExceeded as exc:  # the trainer's own check as it charges: its epsilons stay here
        log.warning("declined train request: %s", exc)
        return _declined(content, BUDGET_DECLINE)
    except HyprstreamError as exc:
        log.warning("declined train request: %s", exc)
        return _declined(content, str(exc))


# Secure aggregation (SecAgg+, hyprstream.privacy): the same training, its delta masked by the middleware
# before it leaves the device. A fog without secure aggregation never sends this message type. The floor
# comes first: a round below it is declined before the middleware makes keys or the handler trains.
app.train(SECAGG_ACTION, mods=[floor_mod, secagg_mod])(train)


@app.query("device")
def query_device(msg: Message, context: Context) -> Message:
    """Identify this device to its fog (the fog maps Flower node IDs to devices with it), with its data
    size as a power-of-two bucket (:func:`~hyprstream.protocol.data_bucket`), never the row count."""
    from hyprstream.store import Store, load_key

    path = store_dir(context)
    with Store.open(path, readonly=True, key=load_key()) as store:
        rows = sum(store.num_rows(t) for t in store.tables())
    device_id = str(context.node_config.get("device-id") or path.name)
    return Message(DeviceInfo(device_id, data_bucket(rows)).to_content(), reply_to=msg)


def handle_train(request: TrainRequest, store_path: Path, plan=None, *, privacy: PrivateTraining | None = None,
                 round: str = "", holdout: Holdout | None = None) -> TrainReply:
    """Train the requested layers on the local store's data; pure of Flower (used by tests directly).

    ``plan`` (a :class:`~hyprstream.agent.policy.TrainPlan`) narrows the request: its layers, steps,
    batch size, device and time limit; the reply names the layers actually trained. With ``privacy``
    the round trains with DP-SGD, charged to the device's ledger first (``round`` names it there;
    default: the model version); over the budget it raises
    :class:`~hyprstream.privacy.errors.BudgetExceeded` and trains nothing. With ``holdout`` the held-out
    examples are left out (they are the device's evaluation split).
    """
    import torch

    from hyprstream.learning.task import get_task
    from hyprstream.learning.trainer import load_weights, train_layers

    threads = os.environ.get(THREADS_ENV)
    if threads:
        torch.set_num_threads(int(threads))
    task = get_task(request.task)
    data, _ = local_data(store_path, task, holdout)
    model = task.build_model(seed=0)
    load_weights(model, request.weights)
    layers, steps, batch, device, limit = request.layers, request.local_steps, request.batch_size, "cpu", None
    if plan is not None:
        layers, steps, batch, device, limit = plan.layers, plan.local_steps, plan.batch_size, plan.device, plan.max_seconds
        if device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("the profile allows GPU training, but torch sees no CUDA device: training on the CPU")
            device = "cpu"
    train = train_layers
    if privacy is not None:
        train = privacy.trainer().bind(model=request.model, base_version=request.model_version,
                                       round=round or f"{request.model}/v{request.model_version}")
    result = train(task, model, layers, data, steps=steps, batch_size=batch, lr=request.lr,
                   seed=request.seed, device=device, max_seconds=limit)
    spend = getattr(result, "privacy", None)
    return TrainReply(ReplyStatus.OK, request.model_version, tuple(layers), result.delta,
                      num_examples=result.num_examples, train_loss=result.loss, steps=result.steps,
                      epsilon=float(spend.epsilon) if spend is not None else None,
                      delta_dp=float(spend.delta) if spend is not None else None,
                      encoding=request.update_encoding, encoding_seed=request.seed)


@app.evaluate("heldout")
def evaluate_heldout(msg: Message, context: Context) -> Message:
    """Federated evaluation: the version the fog sends, on this device's held-out split (mean loss and
    accuracy, the split's size as a data bucket). Only a device with a held-out split answers."""
    try:
        floor = device_floor(context)
        if floor is not None and floor.secure_aggregation:  # a plain reply shows the fog this device's scores
            raise HyprstreamError("the device's privacy floor requires secure aggregation: it answers no plain "
                                  "evaluation request")
        reply = answer_evaluate(msg.content, store_dir(context), device_holdout(context))
    except HyprstreamError as exc:
        reply = EvaluateReply(ReplyStatus.DECLINED, -1, reason=str(exc))
    return Message(reply.to_content(), reply_to=msg)


def answer_evaluate(content: RecordDict, store_path: Path, holdout: Holdout | None) -> EvaluateReply:
    """The reply to an evaluation request (never a crash: ``declined`` with the reason)."""
    version = -1
    try:
        request = EvaluateRequest.from_content(content)
        version = request.model_version
        if holdout is None:
            raise HyprstreamError("this device holds no examples out of training (training.holdout_share = 0)")
        from hyprstream.learning.task import get_task
        from hyprstream.learning.trainer import evaluate, load_weights

        task = get_task(request.task)
        _, held = local_data(store_path, task, holdout)
        if len(held) == 0:
            raise HyprstreamError("the held-out split is empty (too little data yet)")
        model = task.build_model(seed=0)
        load_weights(model, request.weights)
        loss, accuracy = evaluate(task, model, held)
        return EvaluateReply(ReplyStatus.OK, version, loss, accuracy, data_bucket(len(held)))
    except HyprstreamError as exc:
        log.info("declined evaluation request: %s", exc)
        return EvaluateReply(ReplyStatus.DECLINED, version, reason=str(exc))
