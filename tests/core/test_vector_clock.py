import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyprstream.vector_clock import Order, VectorClock, clocks_from_json, clocks_to_json
from hyprstream.errors import ValidationError

pytestmark = pytest.mark.unit

actors = st.sampled_from(["fog-a", "fog-b", "fog-c", "fog-d"])
clocks = st.dictionaries(actors, st.integers(0, 6)).map(VectorClock.of)


def test_hand_computed_examples():
    a = VectorClock.of({"fog-a": 2, "fog-b": 1})
    b = VectorClock.of({"fog-a": 3, "fog-b": 1})
    c = VectorClock.of({"fog-a": 1, "fog-b": 4})
    assert a.compare(b) is Order.BEFORE and b.compare(a) is Order.AFTER
    assert b.compare(c) is Order.CONCURRENT
    assert b.merge(c).as_dict() == {"fog-a": 3, "fog-b": 4}
    assert b.merge(c).missing_from(a) == 1 + 3
    assert a.increment("fog-c").as_dict() == {"fog-a": 2, "fog-b": 1, "fog-c": 1}
    assert VectorClock.of({"fog-a": 0}) == VectorClock()


@given(clocks)
def test_reflexive(a):
    assert a <= a and a.compare(a) is Order.EQUAL and not a.concurrent(a)


@given(clocks, clocks)
def test_antisymmetric(a, b):
    if a <= b and b <= a:
        assert a == b


@given(clocks, clocks, clocks)
def test_transitive(a, b, c):
    if a <= b and b <= c:
        assert a <= c


@given(clocks, clocks)
def test_merge_is_pointwise_max_and_least_upper_bound(a, b):
    m = a.merge(b)
    for actor in {*a.as_dict(), *b.as_dict()}:
        assert m[actor] == max(a[actor], b[actor])
    assert a <= m and b <= m
    assert m == b.merge(a)


@given(clocks, clocks)
def test_equal_clocks_are_not_concurrent(a, b):
    if a == b:
        assert a.compare(b) is Order.EQUAL


@given(clocks, actors)
def test_increment_happens_after(a, actor):
    assert a < a.increment(actor)
    assert a.increment(actor).missing_from(a) == 1


@given(st.dictionaries(st.sampled_from(["l1", "l2"]), clocks))
def test_json_round_trip(d):
    assert clocks_from_json(clocks_to_json(d)) == d


@pytest.mark.parametrize("bad", [{"fog": -1}, {"fog": 1.5}, {"fog": True}, {"": 1}, [1, 2], {"l": 3}])
def test_rejects_malformed(bad):
    with pytest.raises(ValidationError):
        if isinstance(bad, dict) and "l" in bad:
            clocks_from_json(bad)
        elif isinstance(bad, dict):
            VectorClock.of(bad)
        else:
            clocks_from_json(bad)
