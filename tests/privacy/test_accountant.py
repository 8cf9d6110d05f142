"""hyprstream.privacy.accountant against Google's dp-accounting (an independent implementation): the PLD
accountant the ledger uses, and the RDP one kept beside it."""

from __future__ import annotations

import logging

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant as ReferencePld
from dp_accounting.rdp import RdpAccountant as ReferenceAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from hyprstream.privacy.accountant import (
    VALUE_DISCRETIZATION_INTERVAL,
    GaussianEvent,
    PldAccountant,
    RdpAccountant,
    epsilon,
    gaussian_epsilon,
    rdp_epsilon,
    rdp_subsampled_gaussian,
)

pytestmark = pytest.mark.unit
logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's warnings about orders it drops


def reference_epsilon(history: list[GaussianEvent], delta: float) -> float:
    acc = ReferenceAccountant()
    for e in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)),
                    e.steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("z", [0.6, 1.0, 1.5, 4.0])
@pytest.mark.parametrize("q", [0.001, 0.01, 0.1, 1.0])
@pytest.mark.parametrize("steps", [1, 100, 3000])
def test_rdp_epsilon_agrees_with_dp_accounting(z: float, q: float, steps: int) -> None:
    history = [GaussianEvent(z, q, steps)]
    ours, ref = rdp_epsilon(history, 1e-5), reference_epsilon(history, 1e-5)
    assert ours == pytest.approx(ref, rel=0.01)


@settings(max_examples=15, deadline=None)
@given(events=st.lists(st.tuples(st.floats(0.5, 5.0), st.floats(1e-3, 1.0), st.integers(1, 500)), min_size=1, max_size=4),
       delta=st.sampled_from([1e-3, 1e-5, 1e-7]))
def test_rdp_composed_histories_agree_with_dp_accounting(events: list[tuple[float, float, int]], delta: float) -> None:
    history = [GaussianEvent(z, q, s) for z, q, s in events]
    acc = RdpAccountant()
    for e in history:
        acc.compose(e)
    ref = reference_epsilon(history, delta)
    assert acc.epsilon(delta) == pytest.approx(ref, rel=0.01)
    assert rdp_epsilon(history, delta) == pytest.approx(ref, rel=0.01)


def test_hand_computed_values() -> None:
    # q = 1: RDP(alpha) = alpha / (2 z^2) exactly
    assert rdp_subsampled_gaussian(1.0, 2.0, [2.0, 10.0]).tolist() == [0.25, 1.25]
    # Flower's measured RdpAccountant figures for z = 1, all 10 of 10 clients, delta = 1e-5 (FLOWER.md)
    for rounds, eps in [(1, 4.73), (2, 7.08), (3, 9.01)]:
        assert rdp_epsilon([GaussianEvent(1.0, 1.0, rounds)], 1e-5) == pytest.approx(eps, abs=0.005)


def test_rdp_epsilon_if_does_not_compose() -> None:
    acc = RdpAccountant([GaussianEvent(1.0, 0.1, 10)])
    before = acc.epsilon(1e-5)
    after = acc.epsilon_if(GaussianEvent(1.0, 0.1, 10), 1e-5)
    assert after > before == acc.epsilon(1e-5)
    assert after == pytest.approx(rdp_epsilon([GaussianEvent(1.0, 0.1, 20)], 1e-5))
    assert RdpAccountant().epsilon(1e-5) == 0.0


def test_events_are_validated() -> None:
    for bad in [(0.0, 0.1, 1), (1.0, 1.5, 1), (1.0, 0.1, -1), (float("nan"), 0.1, 1)]:
        with pytest.raises(ValueError):
            GaussianEvent(*bad)


# ----------------------------------------------------------------------------------------- PLD


def reference_pld(history: list[GaussianEvent], delta: float, interval: float = VALUE_DISCRETIZATION_INTERVAL) -> float:
    acc = ReferencePld(value_discretization_interval=interval)
    for e in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)),
                    e.steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize(("z", "q", "steps"), [(0.8, 1.0, 1), (1.0, 0.01, 1000), (1.1, 0.1, 50), (4.0, 1.0, 100)])
def test_pld_epsilon_agrees_with_dp_accounting_and_is_below_rdp(z: float, q: float, steps: int) -> None:
    history = [GaussianEvent(z, q, steps)]
    ours, reference = epsilon(history, 1e-5), reference_pld(history, 1e-5)
    if q == 1.0:  # no subsampling: our closed form is exact, dp-accounting's discretized PLD a little above it
        assert reference * (1 - 1e-5) <= ours <= reference
    else:
        assert ours == pytest.approx(reference, rel=1e-6)
    assert ours < 0.95 * reference_epsilon(history, 1e-5)  # the point of PLD: at least 5 % below RDP here


@settings(max_examples=5, deadline=None)
@given(events=st.lists(st.tuples(st.floats(0.8, 3.0), st.sampled_from([0.02, 0.1, 0.5, 1.0]), st.integers(1, 50)),
                       min_size=1, max_size=4),
       delta=st.sampled_from([1e-3, 1e-5, 1e-7]))
def test_pld_composed_histories_agree_with_dp_accounting(events: list[tuple[float, float, int]], delta: float) -> None:
    history = [GaussianEvent(z, q, s) for z, q, s in events]
    incremental = PldAccountant()
    for e in history:
        incremental.epsilon(delta)  # built, then kept up to date event by event
        incremental.compose(e)
    ref = reference_pld(history, delta)
    assert incremental.epsilon(delta) == pytest.approx(ref, rel=1e-6)
    assert PldAccountant(history).epsilon(delta) == pytest.approx(ref, rel=1e-6)  # built from the history at once
    assert epsilon(history, delta) <= reference_epsilon(history, delta) * (1 + 1e-9)


def test_pld_is_a_pessimistic_upper_bound_of_a_finer_grid() -> None:
    # the coarser grid the ledger uses rounds privacy losses up: never below the finer grid's epsilon,
    # and close to it
    history = [GaussianEvent(1.1, 0.1, 100)]
    fine = reference_pld(history, 1e-5, interval=1e-4)
    ours = epsilon(history, 1e-5)
    assert fine <= ours <= fine * 1.001


def test_pld_epsilon_if_does_not_compose_and_empty_histories_spend_nothing() -> None:
    acc = PldAccountant([GaussianEvent(1.0, 0.1, 10)])
    before = acc.epsilon(1e-5)
    after = acc.epsilon_if(GaussianEvent(1.0, 0.1, 10), 1e-5)
    assert after > before == acc.epsilon(1e-5)
    assert after == pytest.approx(reference_pld([GaussianEvent(1.0, 0.1, 20)], 1e-5), rel=1e-6)
    acc.compose(GaussianEvent(1.0, 0.1, 10))
    assert acc.epsilon(1e-5) == pytest.approx(after, rel=1e-9)
    assert acc.history == [GaussianEvent(1.0, 0.1, 10)] * 2
    assert PldAccountant().epsilon(1e-5) == 0.0 == epsilon([GaussianEvent(1.0, 0.0, 5), GaussianEvent(1.0, 0.5, 0)], 1e-5)
    assert acc.epsilon_if(GaussianEvent(1.0, 0.1, 0), 1e-5) == acc.epsilon(1e-5)


def test_non_subsampled_events_compose_to_one_gaussian_in_closed_form() -> None:
    # q = 1 events (client-level DP of every agent; a group's DP-SGD event): exact, and as dp-accounting's PLD
    history = [GaussianEvent(1.3, 1.0, 1), GaussianEvent(0.9, 1.0, 2)]
    mu = (1 / 1.3**2 + 2 / 0.9**2) ** 0.5
    assert epsilon(history, 1e-5) == gaussian_epsilon(mu, 1e-5) == pytest.approx(reference_pld(history, 1e-5), rel=1e-6)
    # a multiplier so small that a PLD grid would take gigabytes (z = 1.1 / 511, mu = 465): closed form
    tiny = [GaussianEvent(1.1 / 511, 1.0, 1)]
    mu = 511 / 1.1
    assert mu * mu / 2 < epsilon(tiny, 1e-5) < rdp_epsilon(tiny, 1e-5)
    acc = PldAccountant()
    assert acc.epsilon_if(tiny[0], 1e-5) == epsilon(tiny, 1e-5)
    # mixed with subsampled events beyond the PLD's range of mu: an upper bound, infinite
    assert epsilon([*tiny, GaussianEvent(1.0, 0.1, 10)], 1e-5) == float("inf")
    mixed = [GaussianEvent(1.0, 1.0, 3), GaussianEvent(1.1, 0.1, 50)]
    assert epsilon(mixed, 1e-5) == pytest.approx(reference_pld(mixed, 1e-5), rel=1e-6)
