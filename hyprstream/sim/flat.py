"""The flat baseline (``hyprstream simulate --baseline flat``): the same experiment as plain Flower FedAvg.

Same agents, device stores, model, seed, local steps, batch size and learning rate as the
hierarchical run, and ``training.global_steps`` rounds; but no fogs and no core: one Flower
ServerApp runs Flower's own ``FedAvg`` (Message API) over every agent, every layer group is trained
and every update travels as full-model fp32 weights. The ClientApp's train handler is the agent's own
:func:`~hyprstream.agent.client_app.handle_train`; it only converts Flower's FedAvg records (``arrays``
and ``config`` in, ``arrays`` and ``metrics`` with ``num-examples`` out) to and from a
:class:`~hyprstream.protocol.TrainRequest`.

Two things are added around FedAvg, neither changes its aggregation: each round is sent only to the
agents the simulated fleet has online and not in the ``minimal`` strategy (the hierarchical run's
fleet model, :mod:`hyprstream.sim.fleet`; FedAvg has no partial updates, so a ``hybrid`` device
trains the whole model here) with each agent's own training seed, and replies are aggregated in device order (so float sums are reproducible). Metrics go into the
same :class:`~hyprstream.sim.metrics.MetricsLog` schema (fog ``"flat"``), bytes are counted as the
fogs count them (array payload bytes) and ``sim_s`` comes from the same virtual clock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from hyprstream.agent.client_app import ModuleClientApp, handle_train, query_device, store_dir
from hyprstream.errors import HyprstreamError, ValidationError
from hyprstream.protocol import TrainRequest, arrays_to_record, record_to_arrays, train_seed

log = logging.getLogger("hyprstream.sim")

FLAT = "flat"  # the fog name of the baseline's metric rows

app = ModuleClientApp(f"{__name__}:app")  # pickles by reference (Flower sends it with every message)
app.query("device")(query_device)


def request_from(content: RecordDict) -> TrainRequest:
    """The :class:`TrainRequest` that a FedAvg train message (``arrays`` + ``config``) stands for."""
    arrays = content.get("arrays")
    cfg = content.get("config")
    if not isinstance(arrays, ArrayRecord) or not isinstance(cfg, ConfigRecord):
        raise ValidationError("FedAvg train message lacks its 'arrays' or 'config' record")
    try:
        return TrainRequest(model=str(cfg["model"]), model_version=int(cfg["server-round"]) - 1,
                            task=str(cfg["task"]), layers=tuple(cfg["layers"]),
                            local_steps=int(cfg["local-steps"]), batch_size=int(cfg["batch-size"]),
                            lr=float(cfg["lr"]), seed=int(cfg["seed"]), weights=record_to_arrays(arrays))
    except KeyError as exc:
        raise ValidationError(f"FedAvg train config lacks {exc}") from None


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on the local store as the agent does; answer with the full new weights (FedAvg's contract)."""
    from hyprstream.agent.client_app import private_training

    request = request_from(msg.content)
    store = store_dir(context)
    # DP-SGD as the agent trains with it (configure_simulation), charged to the device's ledger
    reply = handle_train(request, store, privacy=private_training(context, store),
                         round=f"{FLAT}/round-{request.model_version + 1}")
    weights = {name: (w + reply.delta[name]).astype(w.dtype, copy=False) if name in reply.delta else w
               for name, w in request.weights.items()}
    metrics = MetricRecord({"num-examples": reply.num_examples, "train_loss": float(reply.train_loss)})
    return Message(RecordDict({"arrays": arrays_to_record(weights), "metrics": metrics}), reply_to=msg)


def payload_bytes(record: ArrayRecord) -> int:
    """Array payload bytes of a record, counted as the fogs count them (``nbytes`` of each array)."""
    return sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in record.values())


def flat_fedavg(*, seed_of: Callable[[int, int], int], online_of: Callable[[int], set[int]],
                device_of: Mapping[int, int], on_replies: Callable[[int, list[Message], list[Message]], None],
                min_nodes: int):
    """Flower's FedAvg, sending each round only to the online agents, each with its own training seed.

    ``seed_of(round, node)``: the node's training seed; ``online_of(round)``: the node IDs online in
    that round; ``on_replies(round, sent, replies)`` sees every round's messages before aggregation.
    """
    from flwr.serverapp.strategy import FedAvg

    class OnlineFedAvg(FedAvg):
        def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:
            up = online_of(server_round)
            out = []
            for m in super().configure_train(server_round, arrays, config, grid):
                node = m.metadata.dst_node_id
                if node not in up:
                    continue
                cfg = ConfigRecord(dict(m.content["config"]))
                cfg["seed"] = seed_of(server_round, node)
                out.append(Message(RecordDict({"arrays": m.content["arrays"], "config": cfg}),
                                   message_type=m.metadata.message_type, dst_node_id=node))
            out.sort(key=lambda m: device_of[m.metadata.dst_node_id])
            self._sent = out
            return out

        def aggregate_train(self, server_round, replies):
            replies = sorted(replies, key=lambda m: device_of.get(m.metadata.src_node_id, len(device_of)))
            on_replies(server_round, self._sent, replies)
            return super().aggregate_train(server_round, replies)

    return OnlineFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_evaluate_nodes=0,
                        min_available_nodes=min_nodes)


def run_flat(exp, out: Path, *, on_step=None):
    """Run ``exp`` as the flat FedAvg baseline and write its artefacts into ``out``."""
    from hyprstream.fog.aggregator import FogRound
    from hyprstream.fog.discovery import discover, wait_for_nodes
    from hyprstream.learning.task import get_task
    from hyprstream.sim.harness import SimulationResult, check_runtime, prepare_run, simulate
    from hyprstream.sim.metrics import MetricsLog

    started = time.monotonic()
    check_runtime(exp)  # what Flower's runtime would refuse, refused before anything is prepared
    prep = prepare_run(exp, out)
    task = get_task(exp.task.name)
    initial = prep.initial  # the same start as the hierarchical run (hyprstream.sim.pretrain)
    layers = tuple(task.layer_groups(prep.model))  # the baseline trains every layer group
    metrics = MetricsLog()
    state: dict = {"sim_s": 0.0, "weights": initial}
    per_fog = exp.fleet.agents_per_fog

    def main(grid) -> None:
        logging.getLogger("flwr").setLevel(max(logging.WARNING, logging.getLogger("flwr").level))
        node_ids = wait_for_nodes(grid, exp.num_agents, timeout_s=exp.runtime.round_timeout_s)
        devices = discover(grid, node_ids, timeout_s=exp.runtime.round_timeout_s)
        node_ids = sorted(node_ids, key=lambda n: devices[n].device_id)
        device_of = {node: i for i, node in enumerate(node_ids)}
        n_params = sum(a.size for a in initial.values())
        pending: dict[int, FogRound] = {}

        def seed_of(rnd: int, node: int) -> int:
            # the seed the hierarchical run gives this device (its fog's seed and its index there)
            d = device_of[node]
            return train_seed(exp.seed + d // per_fog, rnd, d % per_fog)

        def online_of(rnd: int) -> set[int]:
            # the hierarchical run's fleet model: online and not in the minimal strategy (FedAvg has
            # no partial updates, so a device in hybrid trains the whole model here)
            plan = prep.fleet.plan_step(rnd, state["sim_s"])
            metrics.add_fleet(plan, prep.fleet.names)
            return {n for n in node_ids if plan.trains(device_of[n])}

        def on_replies(rnd: int, sent: list[Message], replies: list[Message]) -> None:
            uplink, losses, contributors = {}, [], []
            failed = 0
            for m in replies:
                if m.has_error():
                    failed += 1
                    continue
                node = m.metadata.src_node_id
                uplink[node] = payload_bytes(m.content["arrays"])
                mr = m.content["metrics"]
                losses.append((float(mr["train_loss"]), int(mr["num-examples"])))
                contributors.append(node)
            failed += len(sent) - len(replies)
            down = sum(payload_bytes(m.content["arrays"]) for m in sent)
            n = sum(k for _, k in losses)
            pending[rnd] = FogRound(
                fog=FLAT, round=rnd, base_version=rnd - 1, version=rnd if contributors else None, layers=layers,
                participants=len(contributors), declined=0, refused=0, failed=failed,
                bytes_up=sum(uplink.values()), bytes_down=down,
                train_loss=sum(v * k for v, k in losses) / n if n else float("nan"), seconds=0.0,
                nodes=tuple(m.metadata.dst_node_id for m in sent), contributors=tuple(contributors),
                uplink=uplink)

        def evaluate_fn(rnd: int, arrays: ArrayRecord):
            if rnd == 0:
                return None
            weights = record_to_arrays(arrays)
            state["weights"] = weights
            loss, acc = prep.score(weights)
            r = pending.pop(rnd)
            agents = prep.fleet.agent_seconds(r, device_of, base_params=n_params, trained_params=n_params)
            seconds = prep.fleet.round_seconds(r, device_of, base_params=n_params, trained_params=n_params,
                                               push_to_core=False, agents=agents)
            state["sim_s"] += seconds
            prep.fleet.finish_step(agents, seconds)
            wall = time.monotonic() - started
            metrics.add_fog_round(r, accuracy=acc, loss=loss, wall_s=wall, sim_s=state["sim_s"])
            metrics.add_participation(r, device_of)
            row = metrics.add_global(rnd, rnd, accuracy=acc, loss=loss, rounds=[r], wall_s=wall,
                                     sim_s=state["sim_s"], fog=FLAT)
            if on_step is not None:
                on_step(rnd, [r], row, None)
            return MetricRecord({"accuracy": acc, "loss": loss})

        strategy = flat_fedavg(seed_of=seed_of, online_of=online_of, device_of=device_of,
                               on_replies=on_replies, min_nodes=exp.num_agents)
        train_config = ConfigRecord({"model": f"{exp.task.name}-model", "task": exp.task.name,
                                     "layers": list(layers), "local-steps": exp.training.local_steps,
                                     "batch-size": exp.training.batch_size, "lr": exp.training.lr, "seed": 0})
        strategy.start(grid, arrays_to_record(initial), num_rounds=exp.training.global_steps,
                       timeout=exp.runtime.round_timeout_s, train_config=train_config,
                       evaluate_fn=evaluate_fn)

    simulate(exp, out, main, f"{__name__}:app")
    if len(metrics.global_rows()) != exp.training.global_steps:
        raise HyprstreamError(f"the flat baseline finished {len(metrics.global_rows())} of "
                              f"{exp.training.global_steps} rounds")
    weights = {k: np.array(v) for k, v in state["weights"].items()}
    _, accuracy = prep.score(weights)
    metrics.read_device_privacy(out / "devices", step_of=lambda base_version: base_version + 1)
    metrics.write_run(out)
    return SimulationResult(out, metrics, exp.training.global_steps, accuracy, weights)


__all__ = ["FLAT", "app", "flat_fedavg", "request_from", "run_flat"]
