"""Secure aggregation at the fog over a Flower Grid (in-process loopback) with the agent's real train handler,
pushing to a real core Flight server on loopback."""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.clientapp import ClientApp
from privacy_helpers import LoopbackCore, agent_app, make_devices, one_thread_agent_app, one_torch_thread, start_core

from hyprstream.agent.client_app import handle_train
from hyprstream.errors import ValidationError
from hyprstream.fog.aggregator import FogAggregator, RoundPlan
from hyprstream.privacy import secagg_messages as wire
from hyprstream.privacy.accountant import GaussianEvent, epsilon
from hyprstream.privacy.client_dp import NoisePlacement
from hyprstream.privacy.config import ClientDpConfig, SecAggConfig, Weighting
from hyprstream.privacy.contribution import encode
from hyprstream.privacy.ledger import PrivacyLedger, Scope
from hyprstream.fog.loopback import LoopbackGrid, ProcessLoopbackGrid
from hyprstream.privacy.noise import SeededRandom
from hyprstream.fog.secure import SecureFogAggregator
from hyprstream.protocol import TrainRequest
from hyprstream.store import Store

pytestmark = pytest.mark.unit

# The loopback grid answers during push_messages: a timeout only ever runs out for a silent agent.
PLAN = RoundPlan(task="digits", layers=("head",), local_steps=3, batch_size=16, lr=0.05, timeout_s=1.0)


class Recording:
    """Keeps every reply the fog pulls, to check what the fog was ever given."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.received = []

    def pull_messages(self, message_ids):
        out = list(super().pull_messages(message_ids))
        self.received.extend(out)
        return out


class RecordingGrid(Recording, LoopbackGrid):
    """Agents answer in this process, one after another."""


class RecordingProcessGrid(Recording, ProcessLoopbackGrid):
    """Agents answer in worker processes at once."""


@pytest.fixture()
def core(tmp_path: Path):
    core = start_core(tmp_path / "core")
    yield core
    core.close()


def setup_fog(tmp_path: Path, core: LoopbackCore, n: int, *, app: ClientApp | None = None, drop=None,
              secagg: SecAggConfig | None = None, client_dp: ClientDpConfig | None = None, ledger=None, seed: int = 0,
              workers: int = 0):
    paths = make_devices(tmp_path, n)
    nodes = list(range(101, 101 + n))
    store_of = dict(zip(nodes, paths))
    config = {"node_config": lambda node: {"store-dir": str(store_of[node])}, "drop": drop}
    grid = (RecordingProcessGrid(one_thread_agent_app, nodes, workers=workers, **config) if workers
            else RecordingGrid(app or agent_app(), nodes, **config))
    fog = FogAggregator("fog-a", grid, nodes, core.client, "digits", PLAN, seed=seed)
    secure = SecureFogAggregator(fog, secagg or SecAggConfig(clip=0.5, stage_timeout_s=0.3), client_dp,
                                 ledger=ledger, source=SeededRandom(seed))
    return secure, grid, store_of


def expected_mean(secure: SecureFogAggregator, pending, store_of, contributors) -> dict[str, np.ndarray]:
    """The plain mean of the same clipped, quantized deltas: each agent's training redone by hand."""
    from hyprstream.store import layer_table as lt

    spec = pending.spec
    base = pending.base

    total = np.zeros(spec.dim, dtype=np.int64)
    index = {node: i for i, node in enumerate(secure.node_ids)}
    for pos, node in enumerate(pending.nodes, start=1):
        if node not in contributors:
            continue
        seed = secure.fog.seed * 1_000_003 + pending.round * 1009 + index[node]
        req = TrainRequest("digits", base.version, "digits", pending.layers, PLAN.local_steps, PLAN.batch_size,
                           PLAN.lr, seed, lt.to_arrays(base.table))
        reply = handle_train(req, store_of[node])
        enc = encode(reply.delta, reply.num_examples, spec, SeededRandom(seed * 1_000_003 + pos))
        total += spec.quantizer.decode_sum(enc.vector, 1)
    mean = spec.quantizer.dequantize(total[:spec.layout.size]) / len(contributors)
    return spec.layout.unflatten(mean, np.float32)


def test_secure_round_pushes_exactly_the_mean_of_the_quantized_deltas(tmp_path: Path, core: LoopbackCore) -> None:
    secure, grid, store_of = setup_fog(tmp_path, core, 6)
    pending = secure.start_round(1)
    result = secure.finish_round(pending)
    assert result.version == 1 and result.participants == 6, result.reasons
    assert result.failed == result.declined == result.refused == 0
    assert math.isnan(result.train_loss)  # no loss is released per client
    pushed = core.pushes[0]
    assert pushed["participants"] == 6 and pushed["privacy"] is None
    assert len(pushed["transcript_sha256"]) == 64 == len(secure.last.transcript_sha256)
    expected = expected_mean(secure, pending, store_of, set(pending.nodes))
    assert set(pushed["delta"]) == {"head.weight", "head.bias"}
    for name, value in expected.items():
        np.testing.assert_array_equal(pushed["delta"][name], value)
        np.testing.assert_array_equal(result.delta[name], value)
    assert np.abs(expected["head.weight"]).sum() > 0


def test_agents_answering_in_worker_processes_give_the_same_exact_mean(tmp_path: Path, core: LoopbackCore) -> None:
    secure, grid, store_of = setup_fog(tmp_path, core, 6, workers=3)
    with grid:
        pending = secure.start_round(1)
        result = secure.finish_round(pending)
        assert result.version == 1 and result.participants == 6, result.reasons
        stages = Counter(node for node, _type, _seconds in grid.seconds)
        assert stages == {node: 5 for node in pending.nodes}  # setup, share, mask, consistency, unmask: each in its worker
        with one_torch_thread():  # as the workers train
            expected = expected_mean(secure, pending, store_of, set(pending.nodes))
        for name, value in expected.items():
            np.testing.assert_array_equal(core.pushes[0]["delta"][name], value)
    assert not any(proc.is_alive() for proc in grid.processes)


def test_a_worker_process_lost_mid_round_drops_its_agents_and_the_rest_still_sum_exactly(
        tmp_path: Path, core: LoopbackCore) -> None:
    secure, grid, store_of = setup_fog(tmp_path, core, 9, workers=3,
                                       secagg=SecAggConfig(clip=0.5, stage_timeout_s=0.3, degree=8,
                                                           threshold_fraction=0.5))
    with grid:
        pending = secure.start_round(1)  # every agent has trained and advertised its keys
        lost = grid.processes[1]
        lost.kill()
        lost.join(timeout=10)
        gone = {node for node, w in grid.worker_of.items() if w == 1}
        assert len(gone) == 3
        result = secure.finish_round(pending)
        assert result.version == 1, result.reasons
        contributors = set(pending.nodes) - gone
        assert set(result.contributors) == contributors and result.participants == 6
        assert result.failed == 3  # silent from the share stage on: no masks of theirs in anyone's input
        assert not set(secure.last.dropped_before_masking + secure.last.dropped_after_masking) & gone
        with one_torch_thread():  # as the workers train
            expected = expected_mean(secure, pending, store_of, contributors)
        for name, value in expected.items():
            np.testing.assert_array_equal(core.pushes[0]["delta"][name], value)


def test_dropouts_at_every_stage_are_recovered_exactly(tmp_path: Path, core: LoopbackCore) -> None:
    silent = {102: wire.Stage.SETUP, 104: wire.Stage.MASK, 106: wire.Stage.UNMASK, 107: wire.Stage.UNMASK}

    def drop(node, msg):
        return msg.metadata.message_type == wire.SECAGG_MESSAGE_TYPE and silent.get(node) is wire.header(msg.content).stage

    secure, grid, store_of = setup_fog(tmp_path, core, 10, drop=drop,
                                             secagg=SecAggConfig(clip=0.5, stage_timeout_s=0.3, degree=9,
                                                                 threshold_fraction=0.5))
    pending = secure.start_round(1)
    result = secure.finish_round(pending)
    assert result.version == 1, result.reasons
    contributors = set(pending.nodes) - {102, 104}
    assert set(result.contributors) == contributors and result.participants == 8
    assert set(secure.last.dropped_before_masking) == {104}  # 102 never advertised keys
    assert set(secure.last.dropped_after_masking) == {106, 107}
    assert result.failed == 4  # silent at some stage, each waited for until its stage's timeout only
    expected = expected_mean(secure, pending, store_of, contributors)
    for name, value in expected.items():
        np.testing.assert_array_equal(core.pushes[0]["delta"][name], value)


def test_the_fog_receives_no_plaintext_update_and_no_num_examples(tmp_path: Path, core: LoopbackCore) -> None:
    secure, grid, store_of = setup_fog(tmp_path, core, 5)
    pending = secure.start_round(1)
    secure.finish_round(pending)
    assert grid.received
    masked = 0
    for msg in grid.received:
        content = msg.content
        assert set(content.keys()) == {wire.RECORD}  # no 'delta', 'metrics' or 'config' record
        cfg = content[wire.RECORD]
        assert isinstance(cfg, ConfigRecord)
        # one packed entry: the header and the body (keys, sealed shares, indices, the masked vector)
        assert set(cfg.keys()) == {wire.FIELD} and isinstance(cfg[wire.FIELD], bytes)
        assert "num_examples" not in cfg and "train_loss" not in cfg
        assert not any(isinstance(v, (float, ArrayRecord)) for v in cfg.values())
        h = wire.header(content)
        if h.stage is wire.Stage.MASK and h.status is wire.Status.OK:
            masked += 1
            y = wire.masked_from(content, np.uint32).vector
            assert y.dtype == np.uint32 and y.shape == (pending.spec.dim,)
            # the masked vector's high bits are spread over the whole field (3/4 of uniform values are beyond
            # 2**29 in magnitude), unlike a small quantized delta (none are); 0.5 keeps random masks from failing
            assert np.mean(np.abs(y.view(np.int32).astype(np.int64)) > 2 ** 29) > 0.5
    assert masked == 5


def test_an_agent_without_the_middleware_never_sends_its_delta(tmp_path: Path, core: LoopbackCore) -> None:
    from hyprstream.agent.client_app import train

    plain = ClientApp()
    plain.train("layerwise")(train)  # no train.secagg handler
    secure, grid, _ = setup_fog(tmp_path, core, 4, app=plain)
    result = secure.run_round(1)
    assert result.version is None and result.failed == 4
    assert any("secure aggregation aborted" in r for r in result.reasons)
    assert all(m.has_error() for m in grid.received) and not core.pushes


def test_declining_agents_are_left_out(tmp_path: Path, core: LoopbackCore) -> None:
    app = agent_app()
    secure, grid, store_of = setup_fog(tmp_path, core, 5, app=app)
    # one device loses its data: the agent declines with the reason, the round goes on without it
    import shutil

    shutil.rmtree(store_of[103])
    result = secure.run_round(1)
    assert result.version == 1 and result.declined == 1 and result.participants == 4
    assert any("declined" in r and "no store" in r for r in result.reasons)


def hybrid_app(hybrid: tuple[str, ...] = ("device-0000",)) -> ClientApp:
    """The agent's train handler; the devices of the stores named in ``hybrid`` are in their hybrid
    strategy (they train the last requested layer group only)."""
    from hyprstream.agent.client_app import query_device
    from hyprstream.privacy.secagg_messages import SECAGG_ACTION
    from hyprstream.privacy.secagg_mod import make_secagg_mod
    from hyprstream.protocol import ReplyStatus

    def train(msg, context):
        request = TrainRequest.from_content(msg.content)
        store = Path(context.node_config["store-dir"])
        reply = handle_train(request, store, plan=hybrid_plan(request) if store.name in hybrid else None)
        assert reply.status is ReplyStatus.OK
        from flwr.app import Message

        return Message(reply.to_content(), reply_to=msg)

    app = ClientApp()
    app.query("device")(query_device)
    app.train(SECAGG_ACTION, mods=[make_secagg_mod(secure=False)])(train)
    return app


def hybrid_plan(request: TrainRequest):
    from hyprstream.agent.policy import TrainPlan

    return TrainPlan(True, "hybrid", request.layers[-1:], request.local_steps, request.batch_size, "cpu", math.inf)


@pytest.mark.parametrize("weighting", [Weighting.UNIFORM, Weighting.EXAMPLES])
def test_a_device_training_fewer_layer_groups_takes_part_in_a_secure_round(tmp_path: Path, core: LoopbackCore,
                                                                            weighting) -> None:
    """A device in its hybrid strategy trains only some requested layer groups: it sends zeros and a zero
    weight (masked) for the others, so each group's mean is over the devices that trained it -- exactly the
    plain fog's per-group mean of the same quantized deltas -- and the fog never learns who skipped what."""
    from hyprstream.store import layer_table as lt

    n = 4
    secure, _grid, store_of = setup_fog(tmp_path, core, n, app=hybrid_app(),
                                       secagg=SecAggConfig(clip=0.5, stage_timeout_s=0.3, weighting=weighting,
                                                           max_weight=100.0))
    secure.fog.plan = dataclasses.replace(PLAN, layers=("fc2", "head"))
    pending = secure.start_round(1)
    result = secure.finish_round(pending)
    assert result.version == 1 and result.participants == n and result.declined == 0, result.reasons
    spec = pending.spec
    assert spec.n_groups == 2 and spec.carries_weights

    # the same requests answered by hand, encoded with the groups each device trained, summed in the field
    total = np.zeros(spec.dim, dtype=np.int64)
    index = {node: i for i, node in enumerate(secure.node_ids)}
    for pos, node in enumerate(pending.nodes, start=1):
        seed = secure.fog.seed * 1_000_003 + pending.round * 1009 + index[node]
        req = TrainRequest("digits", pending.base.version, "digits", pending.layers, PLAN.local_steps,
                           PLAN.batch_size, PLAN.lr, seed, lt.to_arrays(pending.base.table))
        hybrid = store_of[node].name == "device-0000"
        reply = handle_train(req, store_of[node], plan=hybrid_plan(req) if hybrid else None)
        trained = [pending.layers.index(layer) for layer in reply.layers]
        assert len(trained) == (1 if hybrid else 2)
        enc = encode(reply.delta, reply.num_examples, spec, SeededRandom(seed * 1_000_003 + pos), trained)
        total += spec.quantizer.decode_sum(enc.vector, 1)
    d = spec.layout.size
    weights = total[d:] / spec.quantizer.bound
    if weighting is Weighting.UNIFORM:
        assert weights.tolist() == [n - 1, n]  # fc2 from three devices, head from all four
    sums = spec.quantizer.dequantize(total[:d])
    expected = spec.layout.unflatten(
        np.concatenate([sums[a:a + size] / weights[spec.group_of(name)] for name, a, size in
                        zip(spec.layout.names, np.cumsum((0, *spec.layout.sizes[:-1])), spec.layout.sizes,
                            strict=True)]))
    pushed = core.pushes[0]["delta"]
    assert set(pushed) == {"fc2.weight", "fc2.bias", "head.weight", "head.bias"}
    for name, value in expected.items():
        np.testing.assert_allclose(pushed[name], value, rtol=1e-6, atol=1e-9)
    # the hybrid device's setup reply carried no plaintext and the fog saw only masked vectors
    assert all("delta" not in str(r) for r in result.reasons)


def test_a_secure_round_no_survivor_trained_a_group_of_pushes_the_others(tmp_path: Path, core: LoopbackCore) -> None:
    """When every device skipped a layer group, that group has no mean: the push carries the others only."""
    secure, _, _ = setup_fog(tmp_path, core, 2, app=hybrid_app(("device-0000", "device-0001")))
    secure.fog.plan = dataclasses.replace(PLAN, layers=("fc2", "head"))
    result = secure.run_round(1)
    assert result.version == 1, result.reasons
    assert set(core.pushes[0]["delta"]) == {"head.weight", "head.bias"}


def test_weighted_rounds_reveal_only_the_sum_of_weights(tmp_path: Path, core: LoopbackCore) -> None:
    cfg = SecAggConfig(clip=0.5, stage_timeout_s=0.3, weighting=Weighting.EXAMPLES, max_weight=100.0)
    secure, grid, store_of = setup_fog(tmp_path, core, 4, secagg=cfg)
    pending = secure.start_round(1)
    result = secure.finish_round(pending)
    assert result.version == 1, result.reasons
    # every device holds 60 examples: weights 0.6 each, so the weighted mean is the uniform one (up to
    # the rounding of 0.6 * delta), and the fog only ever held the masked weights and their sum
    # (expected_mean encodes with the round's weighted spec: it averages 0.6 * delta, hence the / 0.6)
    scaled = expected_mean(secure, pending, store_of, set(pending.nodes))
    step = pending.spec.quantizer.resolution
    for name, value in scaled.items():
        np.testing.assert_allclose(core.pushes[0]["delta"][name], value / 0.6, rtol=1e-6, atol=4 * step)
    assert all(set(m.content.keys()) == {wire.RECORD} for m in grid.received)


def test_central_client_dp_charges_the_model_ledger_and_binds_the_version(tmp_path: Path, core: LoopbackCore) -> None:
    dp = ClientDpConfig(noise_multiplier=1.0, placement=NoisePlacement.CENTRAL, epsilon_budget=11.0)
    with Store.open(tmp_path / "fog-ledger", create=True) as store:
        ledger = PrivacyLedger(store)
        secure, grid, _ = setup_fog(tmp_path, core, 4, client_dp=dp, ledger=ledger)
        versions = []
        for r in range(1, 6):
            result = secure.run_round(r)
            versions.append(result.version)
        # z = 1, all agents every round: eps 4.38, 6.57, 8.39, 10.0, 11.5 at delta 1e-5 (PLD): four rounds fit 11
        assert versions[:4] == [1, 2, 3, 4] and versions[4] is None
        assert any("over the budget" in r for r in result.reasons)
        entries = ledger.entries(Scope.MODEL, "digits")
        assert [e.charge.version for e in entries] == [1, 2, 3, 4]
        assert [core.pushes[i]["privacy"]["epsilon"] for i in range(4)] == [e.epsilon for e in entries]
        audited = core.audited_pushes()  # core's signed audit entry of each version carries the spend
        assert [a["version"] for a in audited] == [1, 2, 3, 4]
        assert [a["privacy"]["epsilon"] for a in audited] == [e.epsilon for e in entries]
        assert all(a["privacy"]["noise_multiplier"] == 1.0 and a["privacy"]["delta"] == 1e-5 for a in audited)
        assert [a["transcript_sha256"] for a in audited] == [p["transcript_sha256"] for p in core.pushes]
        assert entries[-1].epsilon <= 11.0
    with Store.open(tmp_path / "fog-ledger", readonly=True) as store:  # bound versions survive a restart
        assert [e.charge.version for e in PrivacyLedger(store).entries()] == [1, 2, 3, 4]


def test_distributed_noise_is_not_released_below_its_client_count(tmp_path: Path, core: LoopbackCore) -> None:
    dp = ClientDpConfig(noise_multiplier=1.0, placement=NoisePlacement.DISTRIBUTED, min_clients=4)

    def drop(node, msg):  # one of four goes silent at setup: 3 inputs would carry 3/4 of the noise
        return node == 101 and wire.header(msg.content).stage is wire.Stage.SETUP

    secure, grid, _ = setup_fog(tmp_path, core, 4, client_dp=dp, drop=drop)
    result = secure.run_round(1)
    assert result.version is None and not core.pushes
    assert any("at least 4" in r for r in result.reasons)
    secure2, _, _ = setup_fog(tmp_path / "b", core, 4, client_dp=dp)
    assert secure2.run_round(1).version == 1


def test_client_dp_without_a_ledger_still_enforces_the_budget_in_memory(tmp_path: Path, core: LoopbackCore) -> None:
    dp = ClientDpConfig(noise_multiplier=1.0, epsilon_budget=8.0)
    secure, grid, _ = setup_fog(tmp_path, core, 3, client_dp=dp)
    versions = [secure.run_round(r).version for r in range(1, 4)]
    assert versions == [1, 2, None]  # 4.38, 6.57, then 8.39 > 8
    expected = [epsilon([GaussianEvent(1.0, 1.0, r)], 1e-5) for r in (1, 2)]
    assert [p["privacy"]["epsilon"] for p in core.pushes] == pytest.approx(expected)


@pytest.mark.integration
def test_a_secure_round_while_core_is_down_waits_in_the_outbox_and_is_applied_once(tmp_path: Path) -> None:
    """The fog is cut from core: the released (noised) mean of a secure round waits in the durable
    outbox, the fog trains on with it applied locally, and on reconnect core applies it once, with its
    privacy record; the ledger entry is bound to that version when core answers."""
    from hyprstream.core.server import CoreFlightServer
    from hyprstream.fog.outbox import Outbox

    core = start_core(tmp_path / "core")
    dp = ClientDpConfig(noise_multiplier=1.0, placement=NoisePlacement.CENTRAL)
    try:
        with Store.open(tmp_path / "fog-ledger", create=True) as store:
            ledger = PrivacyLedger(store)
            secure, _, _ = setup_fog(tmp_path, core, 3, client_dp=dp, ledger=ledger)
            secure.fog.outbox = Outbox(tmp_path / "outbox")
            assert secure.run_round(1).version == 1
            port = int(core.location.rsplit(":", 1)[1])
            core.server.stop()  # partition
            cut = secure.run_round(2)  # trains on version 1 as last pulled
            assert cut.version is None and any("buffered" in r for r in cut.reasons)
            assert len(secure.fog.outbox) == 1
            entries = ledger.entries(Scope.MODEL, "digits")
            assert [e.charge.version for e in entries] == [1, -1]  # charged, not bound yet
            # core comes back on the same address with its state; the next round delivers the buffered push first
            core.server = CoreFlightServer(core.server.repository, core.server.authenticator,
                                           f"grpc://127.0.0.1:{port}")
            core.server.start_background()
            deadline = time.monotonic() + 60  # the client's gRPC channel reconnects with backoff
            while len(secure.fog.outbox) and time.monotonic() < deadline:
                secure.fog.deliver()  # what the fog's next pull does first
                time.sleep(0.5)
            assert len(secure.fog.outbox) == 0
            third = secure.run_round(3)
            assert third.version == 3 and len(secure.fog.outbox) == 0
            assert [e.charge.version for e in ledger.entries(Scope.MODEL, "digits")] == [1, 2, 3]
        audited = core.audited_pushes()
        assert [a["version"] for a in audited] == [1, 2, 3]
        assert len({a["seq"] for a in audited}) == 3  # each push applied exactly once
        assert [a["privacy"]["epsilon"] for a in audited] == [e.epsilon for e in entries] + [audited[2]["privacy"]["epsilon"]]
    finally:
        core.close()


# --------------------------------------------------------------------------------------------
# the wire format: every stage's message round-trips, and tampered or malformed ones are refused


def _wire_messages():
    from hyprstream.privacy.clipping import Layout
    from hyprstream.privacy.contribution import InputSpec
    from hyprstream.privacy.quantize import Quantizer
    from hyprstream.privacy.secagg import KeyAdvert, MaskedInput, NeighbourKeys, SealedShares, UnmaskRequest, UnmaskShares

    rid = bytes(range(16))
    key = lambda i: bytes([i]) * 32  # noqa: E731
    spec = InputSpec(Layout.of({"a.w": (3, 2), "b": (5,)}), 0.5, Quantizer.for_clients(clip=0.5, max_clients=7),
                     weighted=True, max_weight=50.0)
    setup = wire.Setup(rid, 3, (1, 2, 4, 7), 2, spec)
    advert = KeyAdvert(key(1), key(2), key(3), b"certificate")
    keys = NeighbourKeys({4: KeyAdvert(key(4), key(5), key(6), b"c" * 300),
                          2: KeyAdvert(key(7), key(8), key(9), key(10))})
    sealed = SealedShares({7: b"x" * 168, 2: b"y" * 168})
    masked = MaskedInput(np.arange(2 ** 32 - 12, 2 ** 32, dtype=np.uint64).astype(np.uint32))
    req = UnmaskRequest({1: key(11), 4: key(12)})
    shares = UnmaskShares({1: b"s" * 66, 4: b"t" * 66}, {2: b"u" * 66})
    return rid, setup, advert, keys, sealed, masked, req, shares


def test_every_stage_message_round_trips() -> None:
    from hyprstream.protocol import TrainRequest as Req

    rid, setup, advert, keys, sealed, masked, req, shares = _wire_messages()
    train = Req("m", 3, "digits", ("a",), 1, 1, 0.1, 5, {"a.w": np.zeros((3, 2), np.float32)}).to_content()
    got, train_back = wire.setup_from(wire.setup_content(train, setup))
    assert got == setup and set(train_back.keys()) == set(train.keys())
    assert wire.advert_from(wire.advert_content(rid, advert)) == advert
    assert dict(wire.keys_from(wire.keys_content(rid, keys)).adverts) == dict(keys.adverts)
    for stage in (wire.Stage.SHARE, wire.Stage.MASK):
        content = wire.sealed_content(stage, rid, sealed)
        assert wire.header(content) == wire.Header(stage, rid)
        assert dict(wire.sealed_from(content).sealed) == dict(sealed.sealed)
    y = wire.masked_from(wire.masked_content(rid, masked), np.uint32).vector
    assert y.dtype == np.uint32 and np.array_equal(y, masked.vector)
    assert wire.survivors_from(wire.survivors_content(rid, (1, 3, 4))) == (1, 3, 4)
    tags = {2: bytes([13]) * 32, 4: bytes([14]) * 32}
    assert wire.confirmation_from(wire.confirmation_content(rid, tags)) == tags
    assert dict(wire.unmask_from(wire.unmask_content(rid, req)).tags) == dict(req.tags)
    back = wire.shares_from(wire.shares_content(rid, shares))
    assert dict(back.self_mask) == dict(shares.self_mask) and dict(back.mask_key) == dict(shares.mask_key)
    refused = wire.header(wire.reply_status(wire.Stage.MASK, rid, wire.Status.REFUSED, "out of order ü"))
    assert refused == wire.Header(wire.Stage.MASK, rid, wire.Status.REFUSED, "out of order ü")


def _with_raw(raw: bytes):
    from flwr.app import RecordDict

    return RecordDict({wire.RECORD: ConfigRecord({wire.FIELD: raw})})


def test_malformed_or_tampered_messages_are_refused_with_clear_errors() -> None:
    rid, setup, advert, keys, sealed, masked, req, shares = _wire_messages()
    cases = [
        (wire.keys_content(rid, keys), wire.keys_from),
        (wire.sealed_content(wire.Stage.MASK, rid, sealed), wire.sealed_from),
        (wire.unmask_content(rid, req), wire.unmask_from),
        (wire.shares_content(rid, shares), wire.shares_from),
        (wire.advert_content(rid, advert), wire.advert_from),
        (wire.survivors_content(rid, (1, 3, 4)), wire.survivors_from),
        (wire.confirmation_content(rid, {2: bytes(32), 5: bytes(32)}), wire.confirmation_from),
    ]
    for content, parse in cases:
        raw = content[wire.RECORD][wire.FIELD]
        parse(_with_raw(raw))  # the untouched message parses
        for bad, problem in ((raw[:-1], "truncated|trailing|not a"), (raw + b"\x00", "trailing|truncated"),
                             (raw[:40], "truncated"), (raw[:20], "not a")):
            with pytest.raises(ValidationError, match=problem):
                parse(_with_raw(bad))
    # a repeated client index (a second share for one neighbour) is refused, not silently merged
    raw = wire.sealed_content(wire.Stage.MASK, rid, sealed)[wire.RECORD][wire.FIELD]
    dup = raw[:48] + raw[48:52] * 2 + raw[56:]  # both indices now name the first sender
    with pytest.raises(ValidationError, match="repeated client index"):
        wire.sealed_from(_with_raw(dup))
    # not this schema, unknown stage or status, a message without the record, a mis-sized vector
    raw = wire.unmask_content(rid, req)[wire.RECORD][wire.FIELD]
    for bad in (b"hyprstream.secagg/1\n" + raw[20:], raw[:20] + b"\x09" + raw[21:], raw[:21] + b"\x07" + raw[22:]):
        with pytest.raises(ValidationError):
            wire.header(_with_raw(bad))
    from flwr.app import RecordDict

    with pytest.raises(ValidationError, match="not a"):
        wire.header(RecordDict({wire.RECORD: ConfigRecord({"stage": "mask"})}))
    with pytest.raises(ValidationError, match="not a vector"):
        wire.masked_from(_with_raw(wire.masked_content(rid, masked)[wire.RECORD][wire.FIELD] + b"\x01"), np.uint32)
    content = wire.setup_content(RecordDict(), setup)
    raw = content[wire.RECORD][wire.FIELD]
    with pytest.raises(ValidationError, match="truncated"):
        wire.setup_from(_with_raw(raw[:-3]))


def test_a_client_refuses_a_tampered_stage_message_and_forgets_its_round() -> None:
    """Through the middleware: a share request whose body was cut answers ``refused`` with the reason."""
    from flwr.app import Context, Message, RecordDict

    from hyprstream.privacy.secagg_mod import STATE, make_secagg_mod

    from hyprstream.privacy.secagg import SecAggClient

    rid, _, _, keys, _, _, _, _ = _wire_messages()
    mod = make_secagg_mod(secure=False)
    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    client = SecAggClient(rid, 3, (2, 4), 2, 4, np.uint32)
    client.advertise()
    ctx.state[STATE] = ConfigRecord({"client": client.to_bytes()})
    raw = wire.keys_content(rid, keys)[wire.RECORD][wire.FIELD]
    from hyprstream.fog.loopback import _ensure_task_identity

    _ensure_task_identity()
    msg = Message(_with_raw(raw[:-5]), dst_node_id=5, message_type=wire.SECAGG_MESSAGE_TYPE)
    msg.metadata.__dict__["_message_id"] = "m1"
    reply = mod(msg, ctx, lambda m, c: pytest.fail("no training for a share request"))
    h = wire.header(reply.content)
    assert h.status is wire.Status.REFUSED and h.stage is wire.Stage.SHARE and "truncated" in h.reason
    assert STATE not in ctx.state  # the round's secrets are erased
