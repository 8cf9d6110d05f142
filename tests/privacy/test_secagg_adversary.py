"""SecAgg+ against a fog that deviates, scripted as a malicious fog over the loopback grid with the project's
own client code (the secagg middleware) answering: the split-request attack (some of a client's share holders
told it survived, the others that it dropped), forged keys and credentials, forged confirmations and forged
survivor sets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from hypothesis import given, settings
from hypothesis import strategies as st

from hyprstream.fog.loopback import LoopbackGrid
from hyprstream.privacy import masking, shamir
from hyprstream.privacy import secagg_messages as wire
from hyprstream.privacy.clipping import Layout
from hyprstream.privacy.config import SecAggConfig
from hyprstream.privacy.contribution import InputSpec, encode
from hyprstream.privacy.errors import SecAggAborted
from hyprstream.core.certs import init_deployment
from hyprstream.errors import ValidationError
from hyprstream.privacy.identity import DeviceIdentity, deployment_ca, issue_identity, write_identity
from hyprstream.privacy.noise import SeededRandom
from hyprstream.privacy.quantize import Quantizer
from hyprstream.privacy.secagg import SecAggServer, _commit, harary_graph, new_round_id, plan_graph
from hyprstream.privacy.secagg_messages import SECAGG_ACTION, Stage, Status
from hyprstream.privacy.secagg_mod import make_secagg_mod
from hyprstream.protocol import ReplyStatus, TrainReply, TrainRequest

pytestmark = pytest.mark.unit

PARAM = "head.weight"
DIM = 4


def delta_of(node: int) -> np.ndarray:
    return np.full(DIM, 0.01 * (node % 7), np.float32)


def fixed_delta_app() -> ClientApp:
    def train(msg, context):
        req = TrainRequest.from_content(msg.content)
        delta = delta_of(context.node_id)
        reply = TrainReply(ReplyStatus.OK, req.model_version, req.layers, {PARAM: delta}, num_examples=10,
                           train_loss=0.0, steps=1)
        return Message(reply.to_content(), reply_to=msg)

    app = ClientApp()
    app.train(SECAGG_ACTION, mods=[make_secagg_mod(secure=False)])(train)
    return app


def certified_nodes(root: Path, nodes) -> dict[int, dict[str, str]]:
    """Each node's secure-aggregation identity issued by the deployment CA of ``hyprstream certs init``
    (which also made a fog's client certificate), as node-config paths."""
    init_deployment(root / "deployment", clients=("fog-a",))
    ca, ca_key = deployment_ca(root / "deployment")
    out = {}
    for node in nodes:
        key_path, cert_path = root / f"{node}.key", root / f"{node}.pem"
        write_identity(issue_identity(f"device-{node}", ca, ca_key), key_path, cert_path)
        out[node] = {"secagg-identity-key": str(key_path), "secagg-identity-cert": str(cert_path),
                     "secagg-ca": str(root / "deployment" / "ca.pem")}
    return out


class MaliciousFog:
    """Drives the stages itself, with the project's SecAggServer for the honest parts, so that a test can lie
    at any point. Clients in ``dropped`` drop before masking."""

    def __init__(self, n: int, dropout: float, seed: int, node_config=None) -> None:
        self.n = n
        self.nodes = list(range(1, n + 1))
        self.grid = LoopbackGrid(fixed_delta_app(), self.nodes, node_config=node_config)
        self.k, self.t = plan_graph(n, threshold_fraction=SecAggConfig().threshold_fraction, expected_dropout=dropout)
        q = Quantizer.for_clients(clip=1.0, max_clients=n)
        self.spec = InputSpec(Layout.of({PARAM: (DIM,)}), 1.0, q)
        self.rid = new_round_id()
        self.server = SecAggServer(n, degree=self.k, threshold=self.t, dim=DIM, dtype=q.dtype, round_id=self.rid,
                                   source=SeededRandom(seed))
        rng = np.random.default_rng(seed)
        self.dropped = {i for i in self.nodes if rng.random() < dropout}
        self.refused: dict[int, str] = {}

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
                self.refused[m.metadata.src_node_id] = h.reason
        return out

    def advertise(self) -> None:
        s = self.server
        request = TrainRequest(model="m", model_version=0, task="digits", layers=("head",), local_steps=1,
                               batch_size=1, lr=0.1, seed=0, weights={PARAM: np.zeros(DIM, np.float32)})
        replies = self.exchange({i: wire.setup_content(request.to_content(), wire.Setup(
            self.rid, i, s.neighbours(i), s.threshold, self.spec)) for i in self.nodes})
        s.collect_adverts({i: wire.advert_from(c) for i, c in replies.items()})

    def share(self, keys_for=None) -> None:
        s = self.server
        keys_for = keys_for or s.keys_for
        replies = self.exchange({i: wire.keys_content(self.rid, keys_for(i)) for i in sorted(s.advertised)})
        s.collect_shares({i: wire.sealed_from(c) for i, c in replies.items()})

    def mask(self) -> None:
        s = self.server
        replies = self.exchange({i: wire.sealed_content(Stage.MASK, self.rid, s.inbox_for(i))
                                 for i in sorted(s.shared - self.dropped)})
        for i, c in replies.items():
            s.add_masked(i, wire.masked_from(c, s.dtype))

    def honest_until_masked(self) -> None:
        self.advertise()
        self.share()
        self.mask()

    def confirm(self, survivor_sets: dict[int, tuple[int, ...]]) -> dict[int, dict[int, bytes]]:
        """Each client's MACs of the set it was told, by the neighbour each is for."""
        replies = self.exchange({i: wire.survivors_content(self.rid, u3) for i, u3 in survivor_sets.items()})
        return {i: wire.confirmation_from(c) for i, c in replies.items()}

    def unmask(self, requests: dict[int, dict[int, bytes]]) -> dict[int, object]:
        from hyprstream.privacy.secagg import UnmaskRequest

        replies = self.exchange({i: wire.unmask_content(self.rid, UnmaskRequest(tags)) for i, tags in requests.items()})
        return {i: wire.shares_from(c) for i, c in replies.items()}

    def target(self) -> int:
        """The survivor with the most live share holders."""
        s = self.server
        return max(sorted(s.masked), key=lambda v: len(set(s._outbox[v]) & s.masked))

    def split_attack(self, v: int) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """Tell t of v's live share holders the true survivor set U3 and the others U3 without v; each
        confirms what it was told and gets its neighbours' confirmations of it; collect every share of v."""
        s = self.server
        u3 = s.survivor_set()
        holders = sorted(set(s._outbox[v]) & s.masked)
        told_dropped = set(holders[self.t:])
        lie = tuple(x for x in u3 if x != v)
        told = {w: lie if w in told_dropped else u3 for w in u3}
        tags = self.confirm(told)
        requests = {w: {x: by[w] for x, by in tags.items() if w in by and told[x] == told[w]} for w in tags}
        b_shares, s_shares = {}, {}
        for w, got in self.unmask(requests).items():
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


@pytest.mark.parametrize(("n", "dropout"), [(10, 0.0), (30, 0.3), (100, 0.0), (100, 0.1)])
def test_a_fog_splitting_the_survivor_set_recovers_no_input(n: int, dropout: float) -> None:
    fog = MaliciousFog(n, dropout, seed=n)
    fog.honest_until_masked()
    v = fog.target()
    b_shares, s_shares = fog.split_attack(v)
    assert not fog.recovered(v, b_shares, s_shares)
    assert min(len(b_shares), len(s_shares)) < fog.t
    # the clients told the lie reveal nothing of v's mask key: too few of their neighbours confirmed their set
    assert not s_shares and fog.refused


@settings(max_examples=60, deadline=None)
@given(n=st.integers(10, 1000), dropout=st.floats(0.0, 0.3), seed=st.integers(0, 2 ** 16))
def test_no_plan_from_10_to_1000_clients_lets_two_disjoint_sets_of_holders_reach_the_threshold(
        n: int, dropout: float, seed: int) -> None:
    """The attack on the share-holding plan alone (full rounds of 1,000 clients are too slow for a unit test):
    each of v's holders reveals one kind of share of v (the client code above), so the fog holds
    min(#b, #s) <= floor(holders / 2) of the scarcer kind, which the planned threshold exceeds."""
    k, t = plan_graph(n, threshold_fraction=SecAggConfig().threshold_fraction, expected_dropout=dropout)
    graph = harary_graph(n, k, SeededRandom(seed))
    for v, holders in graph.items():
        assert len(holders) == k and max(min(a, len(holders) - a) for a in range(len(holders) + 1)) < t <= k


def test_a_threshold_fraction_below_one_half_is_refused() -> None:
    from hyprstream.errors import ConfigError
    from hyprstream.privacy.config import parse_privacy

    with pytest.raises(ConfigError, match="threshold_fraction.*strict majority"):
        parse_privacy({"privacy": {"secagg": {"threshold_fraction": 0.4}}})
    with pytest.raises(ValidationError, match="threshold_fraction must lie in"):
        plan_graph(100, threshold_fraction=0.3)


@pytest.fixture(scope="module")
def certified(tmp_path_factory) -> dict[int, dict[str, str]]:
    return certified_nodes(tmp_path_factory.mktemp("identities"), range(1, 9))


def test_an_honest_round_with_certified_identities_is_exact(certified) -> None:
    fog = MaliciousFog(8, 0.0, seed=3, node_config=lambda node: certified[node])
    fog.honest_until_masked()
    s = fog.server
    s.close_masking()
    tags = fog.confirm({i: s.survivor_set() for i in sorted(s.masked)})
    s.collect_confirmations(tags)
    result = s.finish(fog.unmask({i: s.unmask_request_for(i).tags for i in sorted(tags)}))
    assert not fog.refused
    expected = np.zeros(DIM, s.dtype)
    for node in fog.nodes:  # node i is client i; the middleware (secure=False) rounds with seed 0's source i
        expected += encode({PARAM: delta_of(node)}, 10, fog.spec, SeededRandom(node)).vector
    np.testing.assert_array_equal(result.total, expected)


def honest_round(fog: MaliciousFog) -> np.ndarray:
    fog.honest_until_masked()
    s = fog.server
    s.close_masking()
    tags = fog.confirm({i: s.survivor_set() for i in sorted(s.masked)})
    s.collect_confirmations(tags)
    return s.finish(fog.unmask({i: s.unmask_request_for(i).tags for i in sorted(tags)})).total


def test_static_agreements_are_remembered_across_rounds_and_stay_exact(certified, monkeypatch) -> None:
    """A device keeps its certified identity's agreements with its neighbours in its own state across rounds: a
    second round over the same devices agrees only with neighbours not met before, and sums exactly."""
    from hyprstream.privacy.identity import pairs_from_bytes
    from hyprstream.privacy.secagg_mod import PAIRS

    fog = MaliciousFog(8, 0.0, seed=6, node_config=lambda node: certified[node])
    first = honest_round(fog)
    identities = {node: DeviceIdentity.load(*(certified[node][k] for k in
                                              ("secagg-identity-key", "secagg-identity-cert", "secagg-ca")))
                  for node in fog.nodes}
    for node, ctx in fog.grid.contexts.items():
        known = pairs_from_bytes(identities[node], ctx.state[PAIRS]["pairs"])
        neighbours = {identities[v].public for v in fog.server.neighbours(node)}
        assert set(known) == neighbours  # exactly this round's neighbours, each with the true static secret
        assert all(known[p] == identities[node].key.exchange(x25519.X25519PublicKey.from_public_bytes(p))
                   for p in known)
    calls = []
    real = DeviceIdentity.agree

    def counting(self, peer, known=None):
        calls.append(known is not None and peer in known)
        return real(self, peer, known)

    monkeypatch.setattr(DeviceIdentity, "agree", counting)
    again = MaliciousFog(8, 0.0, seed=6, node_config=lambda node: certified[node])
    again.grid = fog.grid  # the same devices, with their state
    second = honest_round(again)
    assert all(calls) and len(calls) == sum(len(again.server.neighbours(i)) for i in again.nodes)
    np.testing.assert_array_equal(second, first)  # the same deltas and seeded rounding: the same sum


def test_remembered_agreements_belong_to_one_identity_and_are_bounded(certified) -> None:
    from hyprstream.privacy.identity import PAIRS_KEPT, pairs_from_bytes, pairs_to_bytes

    a, b, c = (DeviceIdentity.load(*(certified[n][k] for k in ("secagg-identity-key", "secagg-identity-cert",
                                                                 "secagg-ca"))) for n in (1, 2, 3))
    known: dict[bytes, bytes] = {}
    assert a.agree(b.public, known) == b.agree(a.public) == known[b.public]
    blob = pairs_to_bytes(a, known)
    assert pairs_from_bytes(a, blob) == known
    assert pairs_from_bytes(c, blob) == {}  # another (or a rotated) identity starts afresh
    assert pairs_from_bytes(a, blob[:-1]) == {}  # a damaged blob is dropped, not half-read
    fresh = DeviceIdentity.uncertified()  # a per-round key remembers nothing
    mine: dict[bytes, bytes] = {}
    fresh.agree(b.public, mine)
    assert mine == {} and pairs_from_bytes(fresh, pairs_to_bytes(fresh, {b.public: bytes(32)})) == {}
    many = {i.to_bytes(32, "big"): bytes(32) for i in range(PAIRS_KEPT + 5)}
    a.agree(b.public, many)
    assert len(many) == PAIRS_KEPT and b.public in many  # the least recently used go first


def test_a_fog_that_presents_a_credential_not_issued_to_a_device_is_refused(certified, tmp_path: Path) -> None:
    """In a neighbour's advert the fog presents a bare key of its own making, a device certificate from another
    CA, or its own client certificate from the deployment CA: every client given it refuses."""
    fog = MaliciousFog(8, 0.0, seed=4, node_config=lambda node: certified[node])
    fog.advertise()
    s = fog.server
    init_deployment(tmp_path / "other")
    outsider = issue_identity("device-x", *deployment_ca(tmp_path / "other"))
    deployment = Path(certified[1]["secagg-ca"]).parent
    fog_cert = x509.load_pem_x509_certificate((deployment / "client-fog-a.pem").read_bytes())
    forged = {3: DeviceIdentity.uncertified().credential, 4: outsider.credential,
              5: fog_cert.public_bytes(serialization.Encoding.DER)}

    def keys_for(i: int):  # client i's first neighbour is the one forged
        keys = s.keys_for(i)
        first = min(keys.adverts)
        return type(keys)({v: dataclasses.replace(a, credential=forged[i]) if i in forged and v == first else a
                           for v, a in keys.adverts.items()})

    with pytest.raises(SecAggAborted):  # three of eight refused: too few left for the threshold of 4 of 6
        fog.share(keys_for)
    assert "not from the deployment CA" in fog.refused[3]
    assert "not from the deployment CA" in fog.refused[4]
    assert "not a device identity" in fog.refused[5]
    assert set(fog.refused) == {3, 4, 5}


def test_a_fog_that_substitutes_a_neighbours_keys_can_open_nothing_and_is_refused_before_masking(certified) -> None:
    """The fog swaps client 1's view of a neighbour w's share-channel key for a key of its own (to open the shares 1
    seals for w), and client 2's view of a neighbour x's mask key (to remove that pairwise mask from 2's input).
    The shares stay sealed to the fog: the pair's key also needs the two devices' static secret. And the four
    clients whose pair was tampered with refuse at the mask stage, before sending a masked input."""
    fog = MaliciousFog(8, 0.0, seed=4, node_config=lambda node: certified[node])
    fog.advertise()
    s = fog.server
    own = masking.new_private_key()
    w, x = min(s.keys_for(1).adverts), min(s.keys_for(2).adverts)
    swap = {1: (w, "enc_key"), 2: (x, "mask_key")}

    def keys_for(i: int):
        keys = s.keys_for(i)
        if i not in swap:
            return keys
        v, field = swap[i]
        adverts = dict(keys.adverts)
        adverts[v] = dataclasses.replace(adverts[v], **{field: masking.public_bytes(own)})
        return type(keys)(adverts)

    fog.share(keys_for)
    assert not fog.refused  # nothing is visible yet: every advert carries a valid certificate
    from hyprstream.privacy.secagg import _associated, _pair_context

    sealed = s._outbox[w][1]  # what client 1 sealed for w, under the key it agreed with the fog's c key
    ephemeral_only = masking.agree(own, s.public_keys()[1].enc_key, masking.SHARE_PURPOSE, _pair_context(fog.rid, 1, w))
    with pytest.raises(ValidationError, match="failed authentication"):
        masking.open_sealed(ephemeral_only, sealed, _associated(fog.rid, 1, w))
    with pytest.raises(ValidationError, match="failed authentication"):
        masking.open_sealed(masking.derive(bytes(32), masking.SHARE_PURPOSE, _pair_context(fog.rid, 1, w)), sealed,
                            _associated(fog.rid, 1, w))
    fog.mask()
    assert {1, w, 2}.issubset(fog.refused), fog.refused
    assert all("failed authentication" in fog.refused[i] for i in (1, w, 2)), fog.refused
    assert 1 not in s.masked and w not in s.masked and 2 not in s.masked


def test_a_fog_that_forges_confirmations_or_the_survivor_set_is_refused(certified) -> None:
    fog = MaliciousFog(8, 0.0, seed=5, node_config=lambda node: certified[node])
    fog.honest_until_masked()
    s = fog.server
    u3 = s.survivor_set()
    assert u3 == tuple(fog.nodes)
    tags = fog.confirm({i: u3 for i in u3 if i != 8} | {8: u3[1:]})  # 8 is told client 1 dropped
    assert set(tags[8]) == set(s.graph[8]) - {1}

    def meant_for_another(v: int, i: int) -> bytes:  # v's genuine MAC, made for a neighbour other than i
        return tags[v][min(set(tags[v]) - {i})]

    requests = {
        1: {v: bytes(32) for v in s.graph[1]},  # forged MACs
        2: {v: masking.derive(bytes(32), b"x", b"y") for v in s.graph[2]},  # MACs under a key the fog made
        3: {v: meant_for_another(v, 3) for v in s.graph[3]},  # genuine MACs, replayed to the wrong neighbour
        8: {v: tags[v][8] for v in s.graph[8] if v != 1},  # genuine MACs of the true U3: not what 8 confirmed
    }
    assert fog.unmask(requests) == {}, fog.refused
    assert all("valid neighbour confirmation" in fog.refused[i] for i in requests), fog.refused


def _held_setup(rid: bytes, spec: InputSpec, hold_id: bytes, *, weight: float = 1.0):
    return wire.setup_content(RecordDict(), wire.Setup(rid, 1, (2, 3), 2, spec, weight=weight, hold_id=hold_id))


def test_a_held_delta_is_encoded_once_for_its_own_dispatch_and_with_a_weight_of_at_most_one() -> None:
    """Buffered secure rounds: a fog that replays a hold id (to have one delta in two cohorts' sums, whose
    difference would expose it), names another dispatch's, inflates a weight beyond 1 (to scale one input
    past the clip) or sends a train request with a held setup, is refused by the device."""
    from hyprstream.privacy.secagg_mod import HELD

    grid = LoopbackGrid(fixed_delta_app(), [1])
    spec = InputSpec(Layout.of({PARAM: (DIM,)}), 1.0, Quantizer.for_clients(clip=1.0, max_clients=3))
    request = TrainRequest(model="m", model_version=0, task="digits", layers=("head",), local_steps=1,
                           batch_size=1, lr=0.1, seed=0, weights={PARAM: np.zeros(DIM, np.float32)})

    def send(content) -> wire.Header:
        (reply,) = grid.pull_messages(grid.push_messages([Message(content, dst_node_id=1,
                                                                  message_type=wire.SECAGG_MESSAGE_TYPE)]))
        return wire.header(reply.content)

    hold_id, other = new_round_id(), new_round_id()
    held = send(wire.hold_content(request.to_content(), hold_id))
    assert (held.stage, held.status, held.round_id) == (Stage.HOLD, Status.OK, hold_id)
    assert HELD in grid.contexts[1].state

    wrong = send(_held_setup(new_round_id(), spec, other))
    assert wrong.status is Status.REFUSED and "no delta held" in wrong.reason

    raw = wire._raw(_held_setup(new_round_id(), spec, hold_id))  # a weight of 4 packed by hand
    fields = list(wire._SETUP.unpack_from(raw, wire._HEAD.size))
    fields[-2] = 4.0
    inflated = raw[:wire._HEAD.size] + wire._SETUP.pack(*fields) + raw[wire._HEAD.size + wire._SETUP.size:]
    refused = send(RecordDict({wire.RECORD: ConfigRecord({wire.FIELD: inflated})}))
    assert refused.status is Status.REFUSED and "weight must be in (0, 1]" in refused.reason

    with_request = _held_setup(new_round_id(), spec, hold_id)
    for key, record in request.to_content().items():
        with_request[key] = record
    refused = send(with_request)
    assert refused.status is Status.REFUSED and "carries no train request" in refused.reason

    rid = new_round_id()
    first = send(_held_setup(rid, spec, hold_id, weight=0.5))
    assert (first.stage, first.status) == (Stage.SETUP, Status.OK)  # the held delta, encoded once
    assert HELD not in grid.contexts[1].state
    replay = send(_held_setup(new_round_id(), spec, hold_id))
    assert replay.status is Status.REFUSED and "no delta held" in replay.reason
