"""hyprstream.privacy.accountant against Google's dp-accounting (an independent implementation)."""

from __future__ import annotations

import logging

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant as ReferenceAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from hyprstream.privacy.accountant import GaussianEvent, RdpAccountant, epsilon, rdp_subsampled_gaussian

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
def test_epsilon_agrees_with_dp_accounting(z: float, q: float, steps: int) -> None:
    history = [GaussianEvent(z, q, steps)]
    ours, ref = epsilon(history, 1e-5), reference_epsilon(history, 1e-5)
    assert ours == pytest.approx(ref, rel=0.01)


@settings(max_examples=15, deadline=None)
@given(events=st.lists(st.tuples(st.floats(0.5, 5.0), st.floats(1e-3, 1.0), st.integers(1, 500)), min_size=1, max_size=4),
       delta=st.sampled_from([1e-3, 1e-5, 1e-7]))
def test_composed_histories_agree_with_dp_accounting(events: list[tuple[float, float, int]], delta: float) -> None:
    history = [GaussianEvent(z, q, s) for z, q, s in events]
    acc = RdpAccountant()
    for e in history:
        acc.compose(e)
    ref = reference_epsilon(history, delta)
    assert acc.epsilon(delta) == pytest.approx(ref, rel=0.01)
    assert epsilon(history, delta) == pytest.approx(ref, rel=0.01)


def test_hand_computed_values() -> None:
    # q = 1: RDP(alpha) = alpha / (2 z^2) exactly
    assert rdp_subsampled_gaussian(1.0, 2.0, [2.0, 10.0]).tolist() == [0.25, 1.25]
    # Flower's measured RdpAccountant figures for z = 1, all 10 of 10 clients, delta = 1e-5 (FLOWER.md)
    for rounds, eps in [(1, 4.73), (2, 7.08), (3, 9.01)]:
        assert epsilon([GaussianEvent(1.0, 1.0, rounds)], 1e-5) == pytest.approx(eps, abs=0.005)


def test_epsilon_if_does_not_compose() -> None:
    acc = RdpAccountant([GaussianEvent(1.0, 0.1, 10)])
    before = acc.epsilon(1e-5)
    after = acc.epsilon_if(GaussianEvent(1.0, 0.1, 10), 1e-5)
    assert after > before == acc.epsilon(1e-5)
    assert after == pytest.approx(epsilon([GaussianEvent(1.0, 0.1, 20)], 1e-5))
    assert RdpAccountant().epsilon(1e-5) == 0.0


def test_events_are_validated() -> None:
    for bad in [(0.0, 0.1, 1), (1.0, 1.5, 1), (1.0, 0.1, -1), (float("nan"), 0.1, 1)]:
        with pytest.raises(ValueError):
            GaussianEvent(*bad)
