"""Federated evaluation: each version a fog pushed, scored on its agents' held-out data.

After a round whose push core committed, the fog sends that version's weights to its agents as an
``evaluate.heldout`` message. An agent with a held-out split (``training.holdout_share`` in its profile:
examples chosen by a keyed hash of their content, never trained on) answers with its mean loss and
accuracy on that split and the split's size as a data bucket; an agent without one declines. The fog
averages the answers over the devices (each device counts once: no example count leaves a device) and
reports the result to core (``report_evaluation``), which keeps it in the version's lineage entry.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from flwr.app import Message
from flwr.serverapp import Grid

from hyprstream.coreapi.client import CoreClient
from hyprstream.errors import HyprstreamError, ValidationError
from hyprstream.fog.discovery import send_and_receive
from hyprstream.protocol import EVALUATE_MESSAGE_TYPE, EvaluateReply, EvaluateRequest, ReplyStatus
from hyprstream.store import layer_table as lt

log = logging.getLogger("hyprstream.fog.evaluation")


@dataclass(frozen=True)
class FederatedScore:
    version: int
    loss: float
    accuracy: float
    devices: int  # agents that answered with a score
    declined: int  # agents that declined (no held-out split, too little data) or sent a bad reply
    silent: int  # agents that did not answer in time


def evaluate_version(grid: Grid, nodes: Sequence[int], core: CoreClient, *, fog: str, model: str, task: str,
                     version: int, timeout_s: float, poll_s: float = 0.25) -> FederatedScore | None:
    """Score ``version`` on the held-out data of the agents at ``nodes`` and report it to core; None when no
    agent answered with a score (nothing is reported then)."""
    snapshot = core.get_weights(model, version)
    weights = lt.to_arrays(snapshot.table)
    content = EvaluateRequest(model, version, task, weights).to_content()
    messages = [Message(content, dst_node_id=node, message_type=EVALUATE_MESSAGE_TYPE,
                        group_id=f"{fog}/evaluate-v{version}") for node in nodes]
    replies = send_and_receive(grid, messages, timeout_s, poll_s)
    scores, declined = [], 0
    for message in replies:
        try:
            if message.has_error():
                raise ValidationError(f"error {message.error.code}")
            reply = EvaluateReply.from_content(message.content)
            if reply.model_version != version:
                raise ValidationError(f"a reply for version {reply.model_version}")
        except (ValidationError, KeyError) as exc:
            log.warning("fog %s: evaluation reply of node %s refused: %s", fog, message.metadata.src_node_id, exc)
            declined += 1
            continue
        if reply.status is ReplyStatus.OK:
            scores.append(reply)
        else:
            declined += 1
    silent = len(nodes) - len(replies)
    if not scores:
        log.warning("fog %s: version %d not evaluated: no agent answered with a score (%d declined, %d silent; "
                    "agents evaluate with training.holdout_share > 0)", fog, version, declined, silent)
        return None
    score = FederatedScore(version, sum(r.loss for r in scores) / len(scores),
                           sum(r.accuracy for r in scores) / len(scores), len(scores), declined, silent)
    try:
        core.report_evaluation(model, version, fog=fog, loss=score.loss, accuracy=score.accuracy,
                               devices=score.devices)
    except HyprstreamError as exc:
        log.warning("fog %s: core did not record the evaluation of version %d: %s", fog, version, exc)
    log.info("fog %s: version %d on %d agents' held-out data: accuracy %.4f, loss %.4f", fog, version,
             score.devices, score.accuracy, score.loss,
             extra={"fog": fog, "model": model, "model_version": version, "participants": score.devices})
    return score


__all__ = ["FederatedScore", "evaluate_version"]
