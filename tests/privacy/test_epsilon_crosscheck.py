"""Every epsilon the project reports, against Google's dp-accounting (PLD and RDP) computed here from the
mechanism's parameters alone -- data size, batch, steps, noise multiplier, client sampling rate, rounds --
never from Hyprstream's accountant.

Reported figures covered: the device ledger's entries and spend (DP-SGD), the telemetry status and the
train reply's ``epsilon`` built from them, a budget decline's figures; the fog's model ledger (client-level
DP), the spend the fog reports (its metrics, its status) and the ``privacy`` of every push and of core's
signed audit entry. The simulation report's figures are read from those same ledgers (sim/metrics.py).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from itertools import groupby
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant as ReferenceRdp

pytest.importorskip("opacus")

from privacy_helpers import LoopbackCore, agent_app, make_devices, start_core  # noqa: E402

from hyprstream.agent.client_app import PrivateTraining, handle_train  # noqa: E402
from hyprstream.learning.task import Dataset, get_task  # noqa: E402
from hyprstream.learning.trainer import model_weights  # noqa: E402
from hyprstream.fog.aggregator import FogAggregator, RoundPlan  # noqa: E402
from hyprstream.fog.loopback import LoopbackGrid  # noqa: E402
from hyprstream.privacy.client_dp import NoisePlacement  # noqa: E402
from hyprstream.privacy.config import ClientDpConfig, SecAggConfig  # noqa: E402
from hyprstream.privacy.dpsgd import DpSgd, DpSgdTrainer, ledger_dir_for  # noqa: E402
from hyprstream.privacy.errors import BudgetExceeded  # noqa: E402
from hyprstream.privacy.ledger import Budget, PrivacyLedger, Scope  # noqa: E402
from hyprstream.privacy.noise import SeededRandom  # noqa: E402
from hyprstream.fog.secure import SecureFogAggregator  # noqa: E402
from hyprstream.protocol import ReplyStatus, TrainRequest  # noqa: E402
from hyprstream.store import Store  # noqa: E402

pytestmark = pytest.mark.unit
logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's notes on RDP orders it drops

DELTA = 1e-5
# The PLD grid the ledger is documented to use (docs/privacy.md): rounded pessimistically, an upper bound.
INTERVAL = 1e-3


def reference(rounds: list[tuple[float, float, int]], delta: float = DELTA) -> tuple[float, float]:
    """(PLD epsilon, RDP epsilon) of ``rounds`` (sample rate, noise multiplier, steps) by dp-accounting."""
    return _reference(tuple(rounds), delta)


@lru_cache(maxsize=None)
def _reference(rounds: tuple[tuple[float, float, int], ...], delta: float) -> tuple[float, float]:
    # consecutive rounds of one (q, z) are one self-composition of all their steps
    runs = [(q, z, sum(steps for *_, steps in group)) for (q, z), group in groupby(rounds, key=lambda r: r[:2])]
    event = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
        for q, z, steps in runs])
    pld, rdp = PLDAccountant(value_discretization_interval=INTERVAL), ReferenceRdp()
    pld.compose(event)
    rdp.compose(event)
    return pld.get_epsilon(delta), rdp.get_epsilon(delta)


def assert_accounted(reported: float, rounds: list[tuple[float, float, int]], delta: float = DELTA) -> None:
    """``reported`` is dp-accounting's PLD epsilon of ``rounds`` and below its RDP epsilon."""
    pld, rdp = reference(rounds, delta)
    assert reported == pytest.approx(pld, rel=1e-6)
    assert reported < rdp


# ----------------------------------------------------------------------------------- DP-SGD on a device

TASK = get_task("digits")
TRAIN, _ = TASK.load_reference_data(seed=0)
N = 300  # the device's data size
DATA = Dataset(TRAIN.x[:N], TRAIN.y[:N])
Z = 1.1


def test_device_ledger_spend_and_status_are_dp_accountings(tmp_path: Path) -> None:
    ledger_dir = tmp_path / "device.privacy"
    budget = Budget(40.0, DELTA)
    plan = [(20, 32), (10, 64)]  # (steps, batch) of each round
    rounds: list[tuple[float, float, int]] = []
    for version, (steps, batch) in enumerate(plan, start=1):
        trainer = DpSgdTrainer(DpSgd(Z, 1.0, budget, secure=False), ledger_dir, "device-0001")  # a fresh process
        result = trainer.bind(model="digits", base_version=version, round=f"r{version}")(
            TASK, TASK.build_model(seed=0), ["head"], DATA, steps=steps, batch_size=batch, lr=0.05, seed=version)
        rounds.append((batch / N, Z, steps))
        assert_accounted(result.privacy.epsilon, rounds)  # the entry charged for the round
        assert_accounted(trainer.spent(), rounds)
        assert_accounted(trainer.status()["epsilon_spent"], rounds)  # what telemetry carries
    with Store.open(ledger_dir, readonly=True) as store:  # re-accounted from the stored history
        ledger = PrivacyLedger(store)
        assert_accounted(ledger.spent(Scope.DEVICE, "device-0001", DELTA), rounds)
        for k, entry in enumerate(ledger.entries(Scope.DEVICE, "device-0001"), start=1):
            assert_accounted(entry.epsilon, rounds[:k])
    # a decline names the spend so far and the spend the round would have reached
    tight = DpSgdTrainer(DpSgd(Z, 1.0, Budget(reference(rounds)[0] + 0.01, DELTA), secure=False), ledger_dir,
                         "device-0001")
    with pytest.raises(BudgetExceeded) as err:
        tight.bind(model="digits", base_version=4, round="r4")(
            TASK, TASK.build_model(seed=0), ["head"], DATA, steps=20, batch_size=32, lr=0.05, seed=4)
    assert_accounted(err.value.spent, rounds)
    assert_accounted(err.value.would_be, [*rounds, (32 / N, Z, 20)])


def test_the_train_reply_carries_dp_accountings_epsilon_for_the_stored_rows(tmp_path: Path) -> None:
    rows = 120  # what the device's store holds: the rate is batch / rows
    path = tmp_path / "device-0002"
    with Store.open(path, create=True) as store:
        store.create_table(TASK.table, TASK.schema)
        store.append(TASK.table, TASK.to_table(Dataset(TRAIN.x[:rows], TRAIN.y[:rows])))
    weights = model_weights(TASK.build_model(seed=3))
    private = PrivateTraining(DpSgd(Z, 1.0, Budget(50.0, DELTA), secure=False), ledger_dir_for(path), "dev-2")
    rounds: list[tuple[float, float, int]] = []
    for version, (steps, batch) in enumerate([(5, 16), (8, 24)], start=1):
        req = TrainRequest(model="digits", model_version=version, task="digits", layers=("head",), local_steps=steps,
                           batch_size=batch, lr=0.05, seed=version, weights=weights)
        reply = handle_train(req, path, privacy=private, round=f"fog/round-{version}")
        assert reply.status is ReplyStatus.OK, reply.reason
        rounds.append((batch / rows, Z, steps))
        assert_accounted(reply.epsilon, rounds)
        assert reply.delta_dp == DELTA
        spent, would_be = private.spend(rows, 16, 5)  # the figures a device's budget check uses
        assert_accounted(spent, rounds)
        assert_accounted(would_be, [*rounds, (16 / rows, Z, 5)])


def test_a_fresh_device_plans_with_dp_accountings_epsilon(tmp_path: Path) -> None:
    private = PrivateTraining(DpSgd(Z, 1.0, Budget(50.0, DELTA), secure=False), tmp_path / "none.privacy", "d")
    spent, would_be = private.spend(N, 32, 20)  # no ledger yet: an empty history
    assert spent == 0.0
    assert_accounted(would_be, [(32 / N, Z, 20)])


# ------------------------------------------------------------------------------ client-level DP at a fog

PLAN = RoundPlan(task="digits", layers=("head",), local_steps=2, batch_size=16, lr=0.05, timeout_s=1.0)


@pytest.fixture(scope="module")
def core(tmp_path_factory) -> LoopbackCore:
    core = start_core(tmp_path_factory.mktemp("core"))
    yield core
    core.close()


def fog_with(tmp_path: Path, core: LoopbackCore, n: int, dp: ClientDpConfig, ledger) -> SecureFogAggregator:
    nodes = list(range(101, 101 + n))
    store_of = dict(zip(nodes, make_devices(tmp_path, n)))
    grid = LoopbackGrid(agent_app(), nodes, node_config=lambda node: {"store-dir": str(store_of[node])})
    fog = FogAggregator("fog-a", grid, nodes, core.client, "digits", PLAN, seed=0)
    return SecureFogAggregator(fog, SecAggConfig(clip=0.5, stage_timeout_s=0.3), dp, ledger=ledger,
                               source=SeededRandom(0))


def test_the_fogs_model_ledger_and_every_push_are_dp_accountings(tmp_path: Path, core: LoopbackCore) -> None:
    q, z, rounds = 1.0, 1.3, 3  # every agent every round, as the central placement samples them
    dp = ClientDpConfig(noise_multiplier=z, placement=NoisePlacement.CENTRAL, client_sampling_rate=q)
    before = len(core.pushes)
    with Store.open(tmp_path / "fog-ledger", create=True) as store:
        secure = fog_with(tmp_path, core, 4, dp, PrivacyLedger(store))
        for r in range(1, rounds + 1):
            assert secure.run_round(r).version is not None
            assert_accounted(secure.spent(), [(q, z, 1)] * r)  # the fog's metrics and status report this
        entries = PrivacyLedger(store).entries(Scope.MODEL, "digits")
    assert len(entries) == rounds
    for k, entry in enumerate(entries, start=1):
        assert_accounted(entry.epsilon, [(q, z, 1)] * k)
    pushed = [p["privacy"] for p in core.pushes[before:]]
    assert [(p["noise_multiplier"], p["sample_rate"], p["delta"]) for p in pushed] == [(z, q, DELTA)] * rounds
    for k, p in enumerate(pushed, start=1):
        assert_accounted(p["epsilon"], [(q, z, 1)] * k)
    audited = core.audited_pushes()[-rounds:]  # core's signed audit entry of each version
    assert [a["privacy"]["epsilon"] for a in audited] == [p["epsilon"] for p in pushed]


def test_a_fog_without_a_ledger_accounts_sampled_rounds_in_memory(tmp_path: Path, core: LoopbackCore) -> None:
    q, z = 0.5, 1.5  # a Poisson sample of half the agents each round
    dp = ClientDpConfig(noise_multiplier=z, placement=NoisePlacement.CENTRAL, client_sampling_rate=q)
    secure = fog_with(tmp_path, core, 4, dp, None)
    for r in range(1, 3):
        secure.run_round(r)  # charged before release, whether or not a version results
        assert_accounted(secure.spent(), [(q, z, 1)] * r)


def test_the_reference_itself_tells_pld_from_rdp() -> None:
    # the cross-check can fail: on these histories PLD and RDP differ by far more than its tolerance
    for rounds in ([(32 / N, Z, 20)], [(1.0, 1.3, 1)] * 3, [(0.5, 1.5, 1)] * 2):
        pld, rdp = reference(rounds)
        assert np.isfinite(pld) and pld < 0.95 * rdp
