"""Asks every agent who it is (query.device), then sends one layer-wise train request; writes the answers."""

import json
import time

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from hyprstream.learning.task import get_task
from hyprstream.learning.trainer import model_weights
from hyprstream.protocol import DEVICE_QUERY_TYPE, TRAIN_MESSAGE_TYPE, DeviceInfo, TrainReply, TrainRequest

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    want = int(context.run_config["nodes"])
    deadline = time.monotonic() + 60
    while len(list(grid.get_node_ids())) < want and time.monotonic() < deadline:
        time.sleep(0.5)
    nodes = sorted(grid.get_node_ids())
    infos = {}
    for reply in grid.send_and_receive(
            [Message(RecordDict(), dst_node_id=n, message_type=DEVICE_QUERY_TYPE) for n in nodes], timeout=120):
        infos[reply.metadata.src_node_id] = DeviceInfo.from_content(reply.content)
    task = get_task("digits")
    request = TrainRequest(model="digits-model", model_version=11, task="digits", layers=("fc2", "head"),
                           local_steps=5, batch_size=16, lr=0.01, seed=1,
                           weights=model_weights(task.build_model(seed=3)))
    out = []
    for reply in grid.send_and_receive(
            [Message(request.to_content(), dst_node_id=n, message_type=TRAIN_MESSAGE_TYPE) for n in nodes],
            timeout=180):
        r = TrainReply.from_content(reply.content)
        info = infos[reply.metadata.src_node_id]
        out.append({"device_id": info.device_id, "data_bucket": info.data_bucket, "status": r.status.value,
                    "reason": r.reason, "layers": list(r.layers), "steps": r.steps, "num_examples": r.num_examples,
                    "delta_keys": sorted(r.delta),
                    "delta_norm": float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in r.delta.values())))})
    with open(context.run_config["out"], "w") as fh:
        json.dump(out, fh)
