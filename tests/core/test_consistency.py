import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyprstream.core.consistency import ConsistencyMode, ConsistencyPolicy, decide, staleness_weight
from hyprstream.core.vector_clock import VectorClock

pytestmark = pytest.mark.unit

base = VectorClock.of({"fog-a": 2, "fog-b": 1})
two_behind = VectorClock.of({"fog-a": 3, "fog-b": 2})


def test_strong_accepts_only_current_base():
    p = ConsistencyPolicy(ConsistencyMode.STRONG, max_staleness=0)
    assert decide(p, base, base).accept
    d = decide(p, base, two_behind)
    assert not d.accept and d.staleness == 2 and "behind" in d.reason


def test_bounded_limit_and_weight():
    p = ConsistencyPolicy(ConsistencyMode.BOUNDED, max_staleness=2, staleness_exponent=0.5)
    d = decide(p, base, two_behind)
    assert d.accept and d.staleness == 2
    assert d.weight == pytest.approx(3 ** -0.5)
    tight = ConsistencyPolicy(ConsistencyMode.BOUNDED, max_staleness=1)
    assert not decide(tight, base, two_behind).accept


def test_eventual_always_merges_known_history():
    p = ConsistencyPolicy(ConsistencyMode.EVENTUAL, staleness_exponent=1.0)
    far = VectorClock.of({"fog-a": 50, "fog-b": 1})
    d = decide(p, base, far)
    assert d.accept and d.staleness == 48 and d.weight == pytest.approx(1 / 49)


@pytest.mark.parametrize("mode", list(ConsistencyMode))
def test_base_from_outside_history_is_refused(mode):
    p = ConsistencyPolicy(mode, max_staleness=0 if mode is ConsistencyMode.STRONG else 4)
    future = VectorClock.of({"fog-a": 9})
    assert not decide(p, future, base).accept


@given(st.integers(0, 1000), st.floats(0, 4))
def test_weight_in_unit_interval_and_monotone(s, a):
    w = staleness_weight(s, a)
    assert 0 < w <= 1
    assert staleness_weight(s + 1, a) <= w
