import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyprstream.config import ConfigError, parse
from hyprstream.consistency import ConsistencyMode, ConsistencyPolicy, decide, plan_merge, staleness_weight
from hyprstream.vector_clock import VectorClock

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
def test_mixing_scales_every_merge(mode):
    """Two fogs pushing from the same base with mixing 1/2 move the model by (about) their mean."""
    stale = 0 if mode is ConsistencyMode.STRONG else 1
    p = ConsistencyPolicy(mode, max_staleness=stale, staleness_exponent=0.0, mixing=0.5)
    assert decide(p, base, base).weight == 0.5
    if stale:
        assert decide(p, base, base.increment("fog-a")).weight == 0.5
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ConfigError, match="mixing"):
            parse(ConsistencyPolicy, {"mode": mode.value, "max_staleness": stale, "mixing": bad})


@pytest.mark.parametrize("mode", list(ConsistencyMode))
def test_unset_mixing_is_one_over_the_number_of_fogs_and_a_set_one_applies_as_is(mode):
    p = ConsistencyPolicy(mode, max_staleness=0 if mode is ConsistencyMode.STRONG else 4, staleness_exponent=0.0)
    assert p.mixing is None
    assert [decide(p, base, base, fogs).weight for fogs in (1, 2, 4, 10)] == [1.0, 0.5, 0.25, 0.1]
    assert plan_merge(p, {"l1": base}, {"l1": base}, ["l1"], "fog-a", fogs=3).weight == pytest.approx(1 / 3)
    fixed = ConsistencyPolicy(mode, max_staleness=p.max_staleness, staleness_exponent=0.0, mixing=0.8)
    assert decide(fixed, base, base, 4).weight == 0.8


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


layer_names = st.sampled_from(["l1", "l2", "l3", "l4"])
fog_clocks = st.dictionaries(st.sampled_from(["fog-a", "fog-b", "fog-c"]), st.integers(0, 5)).map(VectorClock.of)
policies = st.builds(ConsistencyPolicy, st.sampled_from([ConsistencyMode.BOUNDED, ConsistencyMode.EVENTUAL]),
                     st.integers(0, 6), st.floats(0, 2), st.floats(0.01, 1))


@given(policies, st.dictionaries(layer_names, fog_clocks, min_size=4), st.dictionaries(layer_names, fog_clocks),
       st.sets(layer_names, min_size=1), st.sampled_from(["fog-a", "fog-b", "fog-z"]))
def test_merge_plan_properties(policy, current, base, touched, fog):
    plan = plan_merge(policy, current, base, touched, fog)
    if not plan.accept:
        assert plan.new_clocks == {} and plan.reason
        return
    assert set(plan.new_clocks) == touched  # untouched layers keep their clocks
    for layer in touched:
        assert current[layer] < plan.new_clocks[layer]
        assert plan.new_clocks[layer].missing_from(current[layer]) == 1  # exactly this one update is added
        assert plan.new_clocks[layer][fog] == current[layer][fog] + 1
        assert plan.staleness[layer] == current[layer].missing_from(base[layer])
    assert plan.weight == min(policy.mixing * staleness_weight(s, policy.staleness_exponent)
                              for s in plan.staleness.values())


@given(policies, st.dictionaries(layer_names, fog_clocks, min_size=4), fog_clocks, fog_clocks)
def test_pushes_to_disjoint_layers_never_conflict(policy, current, fresh_a, fresh_b):
    """Whatever one fog committed on l1/l2, a push on l3/l4 from current bases is decided as before."""
    strong = ConsistencyPolicy(ConsistencyMode.STRONG, max_staleness=0)
    for p in (policy, strong):
        second = {"l3": current["l3"], "l4": current["l4"]}
        alone = plan_merge(p, current, second, ["l3", "l4"], "fog-b")
        first = plan_merge(p, current, {"l1": current["l1"], "l2": current["l2"]}, ["l1", "l2"], "fog-a")
        assert first.accept and alone.accept
        after = {**current, **first.new_clocks}
        assert plan_merge(p, after, second, ["l3", "l4"], "fog-b") == alone


def test_merge_plan_refusals_name_the_layer():
    p = ConsistencyPolicy(ConsistencyMode.BOUNDED, max_staleness=1)
    cur = {"l1": two_behind}
    assert "lacks the base clock of layer 'l1'" in plan_merge(p, cur, {}, ["l1"], "fog-a").reason
    assert "unknown layer 'l9'" in plan_merge(p, cur, {"l9": base}, ["l9"], "fog-a").reason
    assert "layer 'l1': bounded consistency: staleness 2" in plan_merge(p, cur, {"l1": base}, ["l1"], "fog-a").reason
