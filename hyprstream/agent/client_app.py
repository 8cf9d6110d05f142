"""The agent's Flower ClientApp: the same code answers the simulator and real SuperNodes.

The device's local store is found from the node config: ``store-dir`` (real devices,
``flower-supernode --node-config "store-dir=/var/lib/hyprstream/store"``) or, in simulation,
``$HYPRSTREAM_SIM_DEVICES/device-<partition-id>``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from hyprstream.errors import HyprstreamError
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


def answer_train(content: RecordDict, context: Context) -> TrainReply:
    """The reply to a train request: the delta, or ``declined`` with the reason (never a crash)."""
    try:
        return handle_train(TrainRequest.from_content(content), store_dir(context))
    except HyprstreamError as exc:
        log.warning("declined train request: %s", exc)
        config = content.get("config")
        version = config.get("model_version", -1) if isinstance(config, ConfigRecord) else -1
        return TrainReply(ReplyStatus.DECLINED, version if isinstance(version, int) else -1, (), reason=str(exc))


@app.query("device")
def query_device(msg: Message, context: Context) -> Message:
    """Identify this device to its fog (the fog maps Flower node IDs to devices with it)."""
    from hyprstream.store import Store

    path = store_dir(context)
    with Store.open(path, readonly=True) as store:
        rows = sum(store.num_rows(t) for t in store.tables())
    return Message(DeviceInfo(path.name, rows).to_content(), reply_to=msg)


def handle_train(request: TrainRequest, store_path: Path) -> TrainReply:
    """Train the requested layers on the local store's data; pure of Flower (used by tests directly)."""
    import torch

    from hyprstream.agent.task import get_task
    from hyprstream.agent.trainer import load_weights, train_layers
    from hyprstream.store import Store

    threads = os.environ.get(THREADS_ENV)
    if threads:
        torch.set_num_threads(int(threads))
    task = get_task(request.task)
    with Store.open(store_path, readonly=True) as store:
        data = task.from_table(store.read(task.table))
    model = task.build_model(seed=0)
    load_weights(model, request.weights)
    result = train_layers(task, model, request.layers, data, steps=request.local_steps,
                          batch_size=request.batch_size, lr=request.lr, seed=request.seed)
    return TrainReply(ReplyStatus.OK, request.model_version, request.layers, result.delta,
                      num_examples=result.num_examples, train_loss=result.loss, steps=result.steps)
