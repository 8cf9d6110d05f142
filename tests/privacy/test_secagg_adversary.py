"""SecAgg+ against a fog that deviates: the split-request attack, scripted as a malicious fog over the
loopback grid, with the project's own client code (the secagg middleware) answering."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message
from flwr.clientapp import ClientApp

from hyprstream.fog.loopback import LoopbackGrid
from hyprstream.privacy import masking, shamir
from hyprstream.privacy import secagg_messages as wire
from hyprstream.privacy.clipping import Layout
from hyprstream.privacy.contribution import InputSpec
from hyprstream.privacy.noise import SeededRandom
from hyprstream.privacy.quantize import Quantizer
from hyprstream.privacy.secagg import SecAggServer, _commit, new_round_id, plan_graph
from hyprstream.privacy.secagg_messages import SECAGG_ACTION, Stage, Status
from hyprstream.privacy.secagg_mod import make_secagg_mod
from hyprstream.protocol import ReplyStatus, TrainReply, TrainRequest

pytestmark = pytest.mark.unit

PARAM = "head.weight"
DIM = 4


def fixed_delta_app() -> ClientApp:
    def train(msg, context):
        req = TrainRequest.from_content(msg.content)
        delta = np.full(DIM, 0.01 * (context.node_id % 7), np.float32)
        reply = TrainReply(ReplyStatus.OK, req.model_version, req.layers, {PARAM: delta}, num_examples=10,
                           train_loss=0.0, steps=1)
        return Message(reply.to_content(), reply_to=msg)

    app = ClientApp()
    app.train(SECAGG_ACTION, mods=[make_secagg_mod(secure=False)])(train)
    return app


class MaliciousFog:
    """Runs the honest stages with the project's SecAggServer, then lies at unmasking: it tells about half of
    a target's share holders that the target survived and the others that it dropped."""

    def __init__(self, n: int, dropout: float, seed: int) -> None:
        self.n = n
        self.nodes = list(range(1, n + 1))
        self.grid = LoopbackGrid(fixed_delta_app(), self.nodes)
        self.k, self.t = plan_graph(n, expected_dropout=dropout)
        q = Quantizer.for_clients(clip=1.0, max_clients=n)
        self.spec = InputSpec(Layout.of({PARAM: (DIM,)}), 1.0, q)
        self.rid = new_round_id()
        self.server = SecAggServer(n, degree=self.k, threshold=self.t, dim=DIM, dtype=q.dtype, round_id=self.rid,
                                   source=SeededRandom(seed))
        rng = np.random.default_rng(seed)
        self.dropped = {i for i in self.nodes if rng.random() < dropout}
        self.refused: list[str] = []

    def exchange(self, contents: dict[int, object]) -> dict[int, object]:
        messages = [Message(c, dst_node_id=i, message_type=wire.SECAGG_MESSAGE_TYPE, group_id="attack")
                    for i, c in contents.items()]
        ids = list(self.grid.push_messages(messages))
        out = {}
        for m in self.grid.pull_messages(ids):
            h = wire.header(m.content)
            if h.status is Status.OK:
                out[m.metadata.src_node_id] = m.content
            else:
                self.refused.append(h.reason)
        return out

    def honest_until_masked(self) -> None:
        s = self.server
        request = TrainRequest(model="m", model_version=0, task="digits", layers=("head",), local_steps=1,
                               batch_size=1, lr=0.1, seed=0, weights={PARAM: np.zeros(DIM, np.float32)})
        replies = self.exchange({i: wire.setup_content(request.to_content(), wire.Setup(
            self.rid, i, s.neighbours(i), s.threshold, self.spec)) for i in self.nodes})
        s.collect_adverts({i: wire.advert_from(c) for i, c in replies.items()})
        replies = self.exchange({i: wire.keys_content(self.rid, s.keys_for(i)) for i in sorted(s.advertised)})
        s.collect_shares({i: wire.sealed_from(c) for i, c in replies.items()})
        replies = self.exchange({i: wire.sealed_content(Stage.MASK, self.rid, s.inbox_for(i))
                                 for i in sorted(s.shared - self.dropped)})
        for i, c in replies.items():
            s.add_masked(i, wire.masked_from(c, s.dtype))

    def target(self) -> int:
        """The survivor with the most live share holders."""
        s = self.server
        return max(sorted(s.masked), key=lambda v: len(set(s._outbox[v]) & s.masked))

    def split_unmask(self, v: int) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """Shares of v's self-mask seed and of its mask key that the lying fog collects."""
        s = self.server
        holders = sorted(set(s._outbox[v]) & s.masked)
        told_dropped = set(holders[self.t:])
        contents = {}
        for w in sorted(s.masked):
            req = s.unmask_request_for(w)
            if w in told_dropped:
                req = type(req)(tuple(x for x in req.survivors if x != v), tuple(sorted({*req.dropped, v})))
            contents[w] = wire.unmask_content(self.rid, req)
        b_shares, s_shares = {}, {}
        for w, c in self.exchange(contents).items():
            got = wire.shares_from(c)
            if v in got.self_mask:
                b_shares[w] = got.self_mask[v]
            if v in got.mask_key:
                s_shares[w] = got.mask_key[v]
        return b_shares, s_shares

    def recovered(self, v: int, b_shares: dict[int, bytes], s_shares: dict[int, bytes]) -> bool:
        """Whether the fog rebuilt both of v's secrets (then its input is y_v minus masks the fog can compute)."""
        if len(b_shares) < self.t or len(s_shares) < self.t:
            return False
        advert = self.server.public_keys()[v]
        seed = shamir.combine(b_shares, self.t)
        key = masking.load_private(shamir.combine(s_shares, self.t))
        return _commit(self.rid, v, seed) == advert.commitment and masking.public_bytes(key) == advert.mask_key


@pytest.mark.parametrize(("n", "dropout"), [(10, 0.0), (20, 0.1), (40, 0.3), (100, 0.0), (100, 0.3)])
def test_a_fog_splitting_unmask_requests_recovers_no_input(n: int, dropout: float) -> None:
    fog = MaliciousFog(n, dropout, seed=n)
    fog.honest_until_masked()
    v = fog.target()
    b_shares, s_shares = fog.split_unmask(v)
    assert not fog.recovered(v, b_shares, s_shares)
    assert min(len(b_shares), len(s_shares)) < fog.t
