"""hyprstream.privacy.ledger: durable per-device / per-model spends and budget enforcement."""

from __future__ import annotations

import logging
from pathlib import Path

import dp_accounting
import pyarrow as pa
import pytest
from dp_accounting.pld import PLDAccountant as ReferencePld
from dp_accounting.rdp import RdpAccountant as ReferenceRdp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyprstream.privacy.accountant import GaussianEvent, epsilon
from hyprstream.privacy.errors import BudgetExceeded, PrivacyViolation
from hyprstream.privacy.ledger import LEGACY_SCHEMA, TABLE, Budget, Charge, PrivacyLedger, Scope, check_budget
from hyprstream.store import Retention, Store

pytestmark = pytest.mark.unit
logging.getLogger("absl").setLevel(logging.ERROR)


def charge(event: GaussianEvent, version: int = 1, *, mechanism: str = "dpsgd") -> Charge:
    return Charge(event, model="digits", base_version=version, round=f"fog-a/round-{version}", mechanism=mechanism)


def test_check_budget_rule() -> None:
    check_budget(1.0, 2.0, Budget(2.0, 1e-5), "x")  # at the budget: allowed
    with pytest.raises(BudgetExceeded, match="over the budget of 2") as err:
        check_budget(1.0, 2.0000001, Budget(2.0, 1e-5), "x")
    assert (err.value.spent, err.value.budget) == (1.0, 2.0)


def test_spend_composes_across_restarts(tmp_path: Path) -> None:
    events = [GaussianEvent(1.1, 0.05, 40), GaussianEvent(0.9, 0.1, 25), GaussianEvent(1.1, 0.05, 40)]
    budget = Budget(100.0, 1e-5)
    with Store.open(tmp_path / "dev", create=True) as store:
        ledger = PrivacyLedger(store)
        for v, e in enumerate(events[:2], start=1):
            ledger.charge(Scope.DEVICE, "device-0001", charge(e, v), budget)
    with Store.open(tmp_path / "dev") as store:  # a restart
        ledger = PrivacyLedger(store)
        assert ledger.history(Scope.DEVICE, "device-0001") == events[:2]
        entry = ledger.charge(Scope.DEVICE, "device-0001", charge(events[2], 3), budget)
    assert entry.epsilon == pytest.approx(epsilon(events, 1e-5))
    assert entry.seq == 3 and entry.charge.base_version == 3
    with Store.open(tmp_path / "dev", readonly=True) as store:
        ledger = PrivacyLedger(store)
        assert ledger.spent(Scope.DEVICE, "device-0001", 1e-5) == pytest.approx(entry.epsilon)
        assert ledger.spent(Scope.DEVICE, "device-0002", 1e-5) == 0.0
        assert [e.charge.base_version for e in ledger.entries()] == [1, 2, 3]


def test_device_at_its_budget_declines_and_records_nothing(tmp_path: Path) -> None:
    event = GaussianEvent(1.0, 0.1, 50)
    one, two = epsilon([event], 1e-5), epsilon([event, event], 1e-5)
    budget = Budget((one + two) / 2, 1e-5)  # room for one round, not two
    with Store.open(tmp_path / "dev", create=True) as store:
        ledger = PrivacyLedger(store)
        ledger.charge(Scope.DEVICE, "d", charge(event), budget)
        with pytest.raises(BudgetExceeded, match="over the budget"):
            ledger.charge(Scope.DEVICE, "d", charge(event, 2), budget)
        assert len(ledger.entries()) == 1
        assert store.num_rows(TABLE) == 1
        # other subjects and scopes have their own accounts
        ledger.charge(Scope.MODEL, "d", charge(event, mechanism="client-gaussian"), budget)


def test_a_ledger_table_with_retention_is_refused(tmp_path: Path) -> None:
    from hyprstream.privacy.ledger import SCHEMA

    with Store.open(tmp_path / "dev", create=True) as store:
        store.create_table(TABLE, SCHEMA, Retention(max_bytes=1 << 20))
        with pytest.raises(PrivacyViolation, match="retention"):
            PrivacyLedger(store)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(budget=st.floats(0.5, 20.0),
       events=st.lists(st.tuples(st.floats(0.5, 3.0), st.sampled_from([0.01, 0.05, 0.2, 1.0]), st.integers(1, 200)),
                       min_size=1, max_size=6))
def test_spent_never_exceeds_the_budget(tmp_path_factory, budget: float, events) -> None:
    path = tmp_path_factory.mktemp("ledger")
    b = Budget(budget, 1e-5)
    accepted: list[GaussianEvent] = []
    with Store.open(path, create=True) as store:
        ledger = PrivacyLedger(store)
        for i, (z, q, steps) in enumerate(events):
            e = GaussianEvent(z, q, steps)
            would_be = epsilon([*accepted, e], 1e-5)
            try:
                entry = ledger.charge(Scope.DEVICE, "d", charge(e, i), b)
            except BudgetExceeded:
                assert would_be > budget * (1 - 1e-9)  # declined only when it really would exceed
            else:
                accepted.append(e)
                assert entry.epsilon <= budget
            assert ledger.spent(Scope.DEVICE, "d", 1e-5) <= budget
    with Store.open(path, readonly=True) as store:  # and what was persisted agrees
        assert PrivacyLedger(store).history(Scope.DEVICE, "d") == accepted
    assert epsilon(accepted, 1e-5) <= budget


def reference(q: float, z: float, steps: int, delta: float = 1e-5) -> tuple[float, float]:
    """(PLD, RDP) epsilon by dp-accounting of ``steps`` Poisson-sampled Gaussian steps (rate q, multiplier z)."""
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)),
                                              steps)
    pld, rdp = ReferencePld(value_discretization_interval=1e-3), ReferenceRdp()
    pld.compose(event)
    rdp.compose(event)
    return pld.get_epsilon(delta), rdp.get_epsilon(delta)


def test_a_ledger_written_before_is_re_accounted_with_pld_and_allows_more_rounds(tmp_path: Path) -> None:
    # three DP-SGD rounds (rate 0.05, z 1.0, 100 steps each) as a ledger recorded them with RDP figures, in
    # the table's schema of that time
    q, z, steps = 0.05, 1.0, 100
    rows = [{"seq": k, "time": 1.0e9 + k, "scope": "device", "subject": "d", "model": "digits", "base_version": k,
             "version": -1, "round": f"r{k}", "mechanism": "dpsgd-opacus", "noise_multiplier": z, "sample_rate": q,
             "steps": steps, "delta": 1e-5, "epsilon": reference(q, z, k * steps)[1], "budget": 8.0}
            for k in (1, 2, 3)]
    with Store.open(tmp_path / "dev", create=True) as store:
        store.create_table(TABLE, LEGACY_SCHEMA, Retention())
        store.append(TABLE, pa.Table.from_pylist(rows, schema=LEGACY_SCHEMA))
    pld3, rdp3 = reference(q, z, 3 * steps)
    pld4, rdp4 = reference(q, z, 4 * steps)
    budget = Budget((pld4 + rdp4) / 2, 1e-5)  # a fourth round fits by PLD, not by RDP
    assert pld4 < budget.epsilon < rdp4
    with Store.open(tmp_path / "dev") as store:
        ledger = PrivacyLedger(store)
        assert [e.epsilon for e in ledger.entries()] == [r["epsilon"] for r in rows]  # recorded figures kept
        assert ledger.spent(Scope.DEVICE, "d", 1e-5) == pytest.approx(pld3, rel=1e-6)  # re-accounted
        entry = ledger.charge(Scope.DEVICE, "d", charge(GaussianEvent(z, q, steps), 4), budget)
    assert entry.epsilon == pytest.approx(pld4, rel=1e-6) and entry.seq == 4
    with Store.open(tmp_path / "dev", readonly=True) as store:
        assert store.schema(TABLE).names == LEGACY_SCHEMA.names  # nothing on disk changed format
        assert [e.seq for e in PrivacyLedger(store).entries()] == [1, 2, 3, 4]


def test_a_round_far_over_the_budget_is_refused_without_a_huge_pld(tmp_path: Path) -> None:
    # a group's DP-SGD event (multiplier 1.1 / 511, no sampling: epsilon ~ 1e5) against a budget of 8
    event = GaussianEvent(1.1 / 511, 1.0, 1)
    with Store.open(tmp_path / "dev", create=True) as store:
        ledger = PrivacyLedger(store)
        ledger.charge(Scope.DEVICE, "d", charge(GaussianEvent(1.0, 0.05, 100)), Budget(8.0, 1e-5))
        with pytest.raises(BudgetExceeded, match="over the budget") as err:
            ledger.charge(Scope.DEVICE, "d", charge(event, 2), Budget(8.0, 1e-5))
    assert err.value.would_be > 1e5  # (mixed with a subsampled round beyond the PLD's range: infinite)
    rdp = ReferenceRdp()
    rdp.compose(dp_accounting.GaussianDpEvent(1.1 / 511))
    mu = 511 / 1.1
    assert mu * mu / 2 < ledger.would_spend(Scope.DEVICE, "other", event, 1e-5) < rdp.get_epsilon(1e-5)
