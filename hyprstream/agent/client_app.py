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
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from hyprstream.errors import HyprstreamError
from hyprstream.privacy.secagg_messages import SECAGG_ACTION
from hyprstream.privacy.secagg_mod import secagg_mod
from hyprstream.protocol import DeviceInfo, ReplyStatus, TrainReply, TrainRequest

log = logging.getLogger("hyprstream.agent")

SIM_DEVICES_ENV = "HYPRSTREAM_SIM_DEVICES"
THREADS_ENV = "HYPRSTREAM_TORCH_THREADS"

app = ClientApp()


def store_dir(context: Context) -> Path:
    cfg = context.node_config
    if "store-dir" in cfg:
        return Path(str(cfg["store-dir"]))
    root = os.environ.get(SIM_DEVICES_ENV)
    if root and "partition-id" in cfg:
        return Path(root) / device_name(int(cfg["partition-id"]))
    raise HyprstreamError("node config names no 'store-dir' (and this is not a simulation)")


def device_name(index: int) -> str:
    return f"device-{index:04d}"


@app.train("layerwise")
def train(msg: Message, context: Context) -> Message:
    return Message(answer_train(msg.content, context).to_content(), reply_to=msg)


def agent_state_dir(context: Context) -> Path | None:
    """The agent daemon's state directory from the node config, if this is a device."""
    value = context.node_config.get("state-dir")
    return Path(str(value)) if value else None


def plan_request(request: TrainRequest, state_dir: Path, *, now: float | None = None):
    """The :class:`~hyprstream.agent.policy.TrainPlan` for ``request`` under the daemon's current strategy."""
    from hyprstream.agent.handoff import read_policy
    from hyprstream.agent.policy import TrainPlan, plan_training
    from hyprstream.agent.profile import load_profile

    state = read_policy(state_dir)
    if state is None:
        return TrainPlan(False, "the agent daemon has not published its strategy yet")
    if not state.fresh(now):
        return TrainPlan(False, "the agent daemon's strategy is stale (is the agent running?)")
    caps = load_profile(state.profile).training
    return plan_training(state.strategy, caps, layers=request.layers, local_steps=request.local_steps,
                         batch_size=request.batch_size, gpu_usable=state.gpu_usable)


def answer_train(content: RecordDict, context: Context) -> TrainReply:
    """The reply to a train request: the delta, or ``declined`` with the reason (never a crash)."""
    try:
        request = TrainRequest.from_content(content)
        state = agent_state_dir(context)
        plan = None
        if state is not None:
            from hyprstream.agent.handoff import save_model
            from hyprstream.agent.task import get_task

            task = get_task(request.task)
            save_model(state, task.name, request.model_version, request.weights, layer_of=task.layer_of)
            plan = plan_request(request, state)
            if not plan.accept:
                raise HyprstreamError(plan.reason)
            log.info("train request for %s: %s", list(request.layers), plan.reason)
        return handle_train(request, store_dir(context), plan=plan)
    except HyprstreamError as exc:
        log.warning("declined train request: %s", exc)
        config = content.get("config")
        version = config.get("model_version", -1) if isinstance(config, ConfigRecord) else -1
        return TrainReply(ReplyStatus.DECLINED, version if isinstance(version, int) else -1, (), reason=str(exc))


# Secure aggregation (SecAgg+, hyprstream.privacy): the same training, its delta masked by the middleware
# before it leaves the device. A fog without secure aggregation never sends this message type.
app.train(SECAGG_ACTION, mods=[secagg_mod])(train)


@app.query("device")
def query_device(msg: Message, context: Context) -> Message:
    """Identify this device to its fog (the fog maps Flower node IDs to devices with it)."""
    from hyprstream.store import Store, load_key

    path = store_dir(context)
    with Store.open(path, readonly=True, key=load_key()) as store:
        rows = sum(store.num_rows(t) for t in store.tables())
    device_id = str(context.node_config.get("device-id") or path.name)
    return Message(DeviceInfo(device_id, rows).to_content(), reply_to=msg)


def handle_train(request: TrainRequest, store_path: Path, plan=None) -> TrainReply:
    """Train the requested layers on the local store's data; pure of Flower (used by tests directly).

    ``plan`` (a :class:`~hyprstream.agent.policy.TrainPlan`) narrows the request: its layers, steps,
    batch size, device and time limit; the reply names the layers actually trained.
    """
    import torch

    from hyprstream.agent.task import get_task
    from hyprstream.agent.trainer import load_weights, train_layers
    from hyprstream.store import Store, load_key

    threads = os.environ.get(THREADS_ENV)
    if threads:
        torch.set_num_threads(int(threads))
    task = get_task(request.task)
    with Store.open(store_path, readonly=True, key=load_key()) as store:
        data = task.from_table(store.read(task.table))
    model = task.build_model(seed=0)
    load_weights(model, request.weights)
    layers, steps, batch, device, limit = request.layers, request.local_steps, request.batch_size, "cpu", None
    if plan is not None:
        layers, steps, batch, device, limit = plan.layers, plan.local_steps, plan.batch_size, plan.device, plan.max_seconds
        if device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("the profile allows GPU training, but torch sees no CUDA device: training on the CPU")
            device = "cpu"
    result = train_layers(task, model, layers, data, steps=steps, batch_size=batch, lr=request.lr,
                          seed=request.seed, device=device, max_seconds=limit)
    return TrainReply(ReplyStatus.OK, request.model_version, tuple(layers), result.delta,
                      num_examples=result.num_examples, train_loss=result.loss, steps=result.steps)
