import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyprstream.sim import clock
from hyprstream.sim.fleet import assign_profiles, online

pytestmark = pytest.mark.unit


def test_transfer_and_round_hand_computed():
    # 1 MB over 8 Mbit/s = 1 s, plus 50 ms one-way latency
    assert clock.transfer_s(1_000_000, 8.0, 50.0) == pytest.approx(1.05)
    flops = clock.training_flops(total_params=1000, trained_params=100, samples=500)
    assert flops == 500 * (2000 + 400)
    link = clock.Link(uplink_mbps=8.0, downlink_mbps=16.0, latency_ms=0.0)
    t = clock.agent_round_s(link, 0.5, down_bytes=2_000_000, up_bytes=1_000_000, flops=clock.REFERENCE_FLOPS)
    assert t == pytest.approx(1.0 + 2.0 + 1.0)  # down 1 s, compute 2 s at half speed, up 1 s
    assert clock.sync_round_s([1.0, 3.5, 2.0], push_s=0.25) == 3.75
    assert clock.sync_round_s([], push_s=0.0) == 0.0


@given(st.integers(0, 500), st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.floats(0.01, 10), min_size=1),
       st.integers(0, 2**31))
def test_assign_profiles_is_proportional_and_seeded(n, shares, seed):
    names = assign_profiles(n, shares, np.random.default_rng(seed))
    assert len(names) == n
    assert names == assign_profiles(n, shares, np.random.default_rng(seed))
    total = sum(shares.values())
    for name, share in shares.items():
        assert abs(names.count(name) - n * share / total) < 1.0 + 1e-9  # largest remainder


def test_online_follows_availability():
    avail = np.array([1.0, 0.0] + [0.7] * 2000)
    up = online(avail, seed=3, step=1)
    assert up[0] and not up[1]
    assert abs(up[2:].mean() - 0.7) < 0.05
    assert np.array_equal(up, online(avail, seed=3, step=1))
    assert not np.array_equal(up, online(avail, seed=3, step=2))
