"""hyprstream.privacy.dpsgd: Opacus DP-SGD on exactly the trained layers, its spend composed across rounds and restarts."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import hypothesis
from hypothesis import strategies as st

pytest.importorskip("opacus")

import dp_accounting  # noqa: E402
import torch  # noqa: E402
from dp_accounting.pld import PLDAccountant as ReferencePld  # noqa: E402
from dp_accounting.rdp import RdpAccountant as ReferenceAccountant  # noqa: E402
from opacus.accountants import RDPAccountant as OpacusAccountant  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402

from hyprstream.learning.task import Dataset, get_task  # noqa: E402
from hyprstream.learning.tasks.sensor import WINDOW, window_features  # noqa: E402
from hyprstream.privacy.accountant import GaussianEvent, epsilon  # noqa: E402
from hyprstream.privacy.dpsgd import (  # noqa: E402
    ClipEngine,
    DpSgd,
    DpSgdTrainer,
    dp_train_layers,
    gaussian_epsilon,
    ledger_dir_for,
)
from hyprstream.privacy.errors import BudgetExceeded  # noqa: E402
from hyprstream.privacy.ledger import Budget, PrivacyLedger, Scope  # noqa: E402
from hyprstream.store import Store  # noqa: E402

pytestmark = pytest.mark.unit
logging.getLogger("absl").setLevel(logging.ERROR)

TASK = get_task("digits")
TRAIN, _ = TASK.load_reference_data(seed=0)
DATA = Dataset(TRAIN.x[:400], TRAIN.y[:400])
SENSOR = get_task("sensor")


def settings(**over) -> DpSgd:
    return DpSgd(**{"noise_multiplier": 1.1, "max_grad_norm": 1.0, "budget": Budget(50.0, 1e-5), "secure": False, **over})


def test_only_the_trained_layers_get_per_sample_gradients_from_opacus(monkeypatch) -> None:
    model = TASK.build_model(seed=0)
    seen: list[set[str]] = []
    original = DPOptimizer.clip_and_accumulate

    def spy(self):
        seen.append({n for n, p in model.named_parameters() if getattr(p, "grad_sample", None) is not None})
        return original(self)

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", spy)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = dp_train_layers(TASK, model, ["head"], DATA, steps=5, batch_size=32, lr=0.05, settings=settings(),
                             generator=torch.Generator().manual_seed(0), engine=ClipEngine.OPACUS)
    assert seen and all(s == {"head.weight", "head.bias"} for s in seen)
    assert set(result.delta) == {"head.weight", "head.bias"}
    after = model.state_dict()
    assert list(after) == list(before)  # bare parameter names: no Opacus "_module." prefix
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        assert torch.equal(after[name], before[name])  # frozen layers untouched
    np.testing.assert_allclose(result.delta["head.weight"], (after["head.weight"] - before["head.weight"]).numpy())
    assert not hasattr(model, "autograd_grad_sample_hooks")  # Opacus' hooks are gone
    assert all(not hasattr(p, "grad_sample") or p.grad_sample is None for p in model.parameters())


def test_noise_is_calibrated_and_reproducible_with_a_seed() -> None:
    def run(seed: int, z: float) -> np.ndarray:
        model = TASK.build_model(seed=0)
        r = dp_train_layers(TASK, model, ["head"], DATA, steps=3, batch_size=32, lr=0.01,
                            settings=settings(noise_multiplier=z), generator=torch.Generator().manual_seed(seed))
        return r.delta["head.weight"]

    np.testing.assert_array_equal(run(1, 1.0), run(1, 1.0))
    assert not np.array_equal(run(1, 1.0), run(2, 1.0))


def test_empty_poisson_samples_take_noise_only_steps() -> None:
    tiny = Dataset(TRAIN.x[:50], TRAIN.y[:50])
    model = TASK.build_model(seed=0)
    r = dp_train_layers(TASK, model, ["head"], tiny, steps=30, batch_size=1, lr=0.01, settings=settings(),
                        generator=torch.Generator().manual_seed(0))  # q = 0.02: most samples are empty
    assert r.steps == 30 and np.all(np.isfinite(r.delta["head.weight"]))
    assert np.abs(r.delta["head.weight"]).sum() > 0


def reference_epsilon(history: list[GaussianEvent], delta: float, acc=None) -> float:
    acc = acc if acc is not None else ReferenceAccountant()
    for e in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)),
                    e.steps)
    return acc.get_epsilon(delta)


def test_spend_composes_across_rounds_and_restarts(tmp_path: Path) -> None:
    ledger_dir = ledger_dir_for(tmp_path / "device-0001")
    assert ledger_dir.name == "device-0001.privacy"
    rounds = [(["head"], 20, 32), (["fc2", "head"], 10, 64), (["head"], 20, 32)]
    for version, (layers, steps, batch) in enumerate(rounds, start=1):
        trainer = DpSgdTrainer(settings(), ledger_dir, "device-0001")  # a fresh process each round
        train = trainer.bind(model="digits", base_version=version, round=f"fog-a/round-{version}")
        result = train(TASK, TASK.build_model(seed=0), layers, DATA, steps=steps, batch_size=batch, lr=0.05, seed=version)
        assert result.privacy.charge.base_version == version
    history = [GaussianEvent(1.1, batch / len(DATA), steps) for _, steps, batch in rounds]
    with Store.open(ledger_dir, readonly=True) as store:
        ledger = PrivacyLedger(store)
        assert ledger.history(Scope.DEVICE, "device-0001") == history
        spent = ledger.spent(Scope.DEVICE, "device-0001", 1e-5)
    assert spent == pytest.approx(epsilon(history, 1e-5))
    # dp-accounting's PLD accountant agrees; its RDP accountant and Opacus' (RDP), given the persisted
    # history, are looser
    assert spent == pytest.approx(reference_epsilon(history, 1e-5, ReferencePld(value_discretization_interval=1e-3)),
                                  rel=1e-6)
    assert spent < reference_epsilon(history, 1e-5)
    opacus_acc = OpacusAccountant()
    opacus_acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in history]
    assert spent < opacus_acc.get_epsilon(1e-5)
    assert trainer.status()["epsilon_spent"] == pytest.approx(spent)


def test_a_device_at_its_budget_declines_before_training(tmp_path: Path) -> None:
    one = epsilon([GaussianEvent(1.1, 32 / len(DATA), 20)], 1e-5)
    two = epsilon([GaussianEvent(1.1, 32 / len(DATA), 20)] * 2, 1e-5)
    trainer = DpSgdTrainer(settings(budget=Budget((one + two) / 2, 1e-5)), tmp_path / "ledger", "d")
    train = trainer.bind(model="digits", base_version=1, round="r1")
    train(TASK, TASK.build_model(seed=0), ["head"], DATA, steps=20, batch_size=32, lr=0.05, seed=1)
    model = TASK.build_model(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetExceeded, match="over the budget") as err:
        trainer.bind(model="digits", base_version=2, round="r2")(TASK, model, ["head"], DATA, steps=20, batch_size=32,
                                                                 lr=0.05, seed=2)
    assert err.value.spent == pytest.approx(one) and err.value.would_be == pytest.approx(two)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing trained
    assert trainer.spent() == pytest.approx(one)  # nothing charged


def test_a_time_limit_stops_early_and_still_charges_the_planned_steps(tmp_path: Path) -> None:
    trainer = DpSgdTrainer(settings(), tmp_path / "ledger", "d")
    result = trainer.bind(model="digits", base_version=1, round="r1")(
        TASK, TASK.build_model(seed=0), ["head"], DATA, steps=50, batch_size=32, lr=0.05, seed=1, max_seconds=0.0)
    assert result.steps == 1  # at least one step, then the limit
    assert result.privacy.charge.event == GaussianEvent(1.1, 32 / len(DATA), 50)  # over-counts, never under


# ------------------------------------------------------------------------------------ unit of privacy
@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), motes=st.integers(1, 3), n=st.integers(2, 60), window=st.integers(2, 12),
       data=st.data())
def test_one_sensor_reading_enters_at_most_a_window_of_examples(seed, motes, n, window, data) -> None:
    """Removing one stored reading removes its example and changes only examples of its mote among the next
    ``window - 1`` readings: the group a reading is accounted as (``examples_per_record``) covers it."""
    rng = np.random.default_rng(seed)
    mote = rng.integers(0, motes, n)
    time = np.arange(n) * 10
    hum, temp = 40 + rng.normal(0, 5, n), 20 + rng.normal(0, 2, n)
    gone = data.draw(st.integers(0, n - 1), label="removed reading")
    keep = np.arange(n) != gone
    full = window_features(mote, time, hum, temp, window=window)
    less = window_features(mote[keep], time[keep], hum[keep], temp[keep], window=window)
    changed = np.flatnonzero(np.any(full[keep] != less, axis=1))
    same_mote_after = np.flatnonzero((mote[keep] == mote[gone]) & (np.arange(n)[keep] > gone))[:window - 1]
    assert set(changed) <= set(same_mote_after)


def sensor_data(n: int = 600) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(np.abs(rng.normal(0, 2, (n, 4))).astype(np.float32), (rng.random(n) < 0.05).astype(np.int64))


def test_a_sensor_round_is_accounted_for_one_reading(tmp_path: Path) -> None:
    """The ledger entry names the unit, and its epsilon is that of the reading from first principles: one
    reading enters WINDOW examples (one added or removed, WINDOW - 1 changed), so it moves a step's clipped
    sum by at most (2 WINDOW - 1) C; noise z C; steps composed without amplification by sampling."""
    assert SENSOR.examples_per_record == WINDOW and TASK.examples_per_record == 1
    group = 2 * WINDOW - 1
    z = 3.0 * group  # a per-reading noise multiplier of 3
    trainer = DpSgdTrainer(settings(noise_multiplier=z), tmp_path / "ledger", "d")
    result = trainer.bind(model="sensor", base_version=1, round="r1")(
        SENSOR, SENSOR.build_model(seed=0), ["fc2", "head"], sensor_data(), steps=5, batch_size=32, lr=0.01, seed=1)
    entry = result.privacy
    assert entry.charge.unit == f"reading (group of {WINDOW} examples)"
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(dp_accounting.GaussianDpEvent(z / group), 5)
    rdp = ReferenceAccountant()
    rdp.compose(dp_accounting.GaussianDpEvent(z / group), 5)
    assert entry.epsilon == pytest.approx(pld.get_epsilon(1e-5), rel=0.01)
    assert entry.epsilon <= rdp.get_epsilon(1e-5)
    assert entry.epsilon == pytest.approx(gaussian_epsilon(math.sqrt(5) * group / z, 1e-5), rel=0.01)
    with Store.open(tmp_path / "ledger", readonly=True) as store:  # the unit is stored with the entry
        assert [e.charge.unit for e in PrivacyLedger(store).entries()] == [entry.charge.unit]
    digits = DpSgdTrainer(settings(), tmp_path / "digits-ledger", "d").bind(model="digits", base_version=1, round="r1")(
        TASK, TASK.build_model(seed=0), ["head"], DATA, steps=2, batch_size=32, lr=0.01, seed=1)
    assert digits.privacy.charge.unit == "example"
    assert digits.privacy.to_dict()["unit"] == "example"


def test_a_sensor_round_at_a_per_example_noise_is_declined_for_a_reading(tmp_path: Path) -> None:
    """At z = 1.1 one reading's epsilon is in the hundreds of thousands: declined with the unit named,
    nothing trained, nothing charged (and no PLD of a multiplier of 0.002 computed)."""
    trainer = DpSgdTrainer(settings(noise_multiplier=1.1, budget=Budget(8.0, 1e-5)), tmp_path / "ledger", "d")
    model = SENSOR.build_model(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetExceeded, match="per reading") as err:
        trainer.bind(model="sensor", base_version=1, round="r1")(
            SENSOR, model, ["head"], sensor_data(), steps=20, batch_size=32, lr=0.01, seed=1)
    assert err.value.would_be > 1e4
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert trainer.spent() == 0.0
