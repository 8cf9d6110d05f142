"""hyprstream.privacy: random sources, Gaussian and discrete Gaussian noise, clipping, client-level DP release."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyprstream.privacy.client_dp import ClientDP, NoisePlacement
from hyprstream.privacy.clipping import Layout, clip_l2
from hyprstream.privacy.contribution import InputSpec, decode, encode, group_means
from hyprstream.privacy.errors import PrivacyViolation
from hyprstream.privacy.noise import SecureRandom, SeededRandom, discrete_gaussian, gaussian
from hyprstream.privacy.quantize import Quantizer
from hyprstream.privacy.secagg import run_in_memory

pytestmark = pytest.mark.unit


def test_sources_give_uniforms_and_bytes() -> None:
    for src in (SecureRandom(), SeededRandom(1)):
        u = src.uniform(100_000)
        assert u.min() >= 0 and u.max() < 1
        assert abs(u.mean() - 0.5) < 0.005  # 5.5 sd
        assert len(src.random_bytes(33)) == 33
    assert SecureRandom.secure and not SeededRandom.secure
    np.testing.assert_array_equal(SeededRandom(7).uniform(5), SeededRandom(7).uniform(5))
    assert not np.array_equal(SecureRandom().uniform(5), SecureRandom().uniform(5))


def test_global_numpy_rng_is_untouched() -> None:
    np.random.seed(123)
    expected = np.random.random(3)
    np.random.seed(123)
    gaussian(SeededRandom(0), 1000, 1.0)
    discrete_gaussian(SecureRandom(), 1000, 3.0)
    np.testing.assert_array_equal(np.random.random(3), expected)


@pytest.mark.parametrize("source", [SecureRandom(), SeededRandom(3)], ids=["secure", "seeded"])
def test_gaussian_moments(source) -> None:
    x = gaussian(source, 200_001, 2.5)
    assert x.shape == (200_001,)
    assert abs(x.mean()) < 5 * 2.5 / math.sqrt(len(x))
    assert x.std() == pytest.approx(2.5, rel=0.01)
    assert abs(np.mean(np.abs(x) > 2.5 * 1.96) - 0.05) < 0.003


@pytest.mark.parametrize("sigma", [0.7, 3.0, 40.0, 1e6])
def test_discrete_gaussian_matches_its_distribution(sigma: float) -> None:
    x = discrete_gaussian(SeededRandom(11), 200_000, sigma)
    assert x.dtype == np.int64
    assert abs(x.mean()) < 5 * sigma / math.sqrt(len(x)) + 1e-9
    # the variance of N_Z(0, s^2) is within a hair of s^2 for s >= 1 (and a bit below for s < 1)
    ks = np.arange(-int(12 * sigma) - 1, int(12 * sigma) + 2) if sigma < 100 else None
    if ks is not None:
        p = np.exp(-ks.astype(float) ** 2 / (2 * sigma ** 2))
        p /= p.sum()
        var = float(np.sum(p * ks ** 2))
        assert x.var() == pytest.approx(var, rel=0.02)
        # and the probability mass at 0 matches
        assert np.mean(x == 0) == pytest.approx(float(p[ks == 0][0]), abs=5 * math.sqrt(p[ks == 0][0] / len(x)))
    else:
        assert x.std() == pytest.approx(sigma, rel=0.01)


@settings(max_examples=50, deadline=None)
@given(dim=st.integers(1, 500), bound=st.floats(1e-4, 1e4), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 1000))
def test_clip_l2_bounds_the_norm(dim: int, bound: float, scale: float, seed: int) -> None:
    v = np.random.default_rng(seed).normal(size=dim) * scale
    c = clip_l2(v, bound)
    assert np.linalg.norm(c.vector) <= bound
    if np.linalg.norm(v) <= bound:
        np.testing.assert_array_equal(c.vector, v)
        assert c.factor == 1.0
    else:
        np.testing.assert_allclose(c.vector, v * (bound / np.linalg.norm(v)), rtol=1e-8)


def test_clip_l2_without_copy_returns_the_input_only_when_within_the_bound() -> None:
    v = np.array([0.3, 0.4])
    within = clip_l2(v, 1.0, copy=False)
    assert within.vector is v and within.factor == 1.0
    assert clip_l2(v, 1.0).vector is not v
    over = clip_l2(v, 0.25, copy=False)
    assert over.vector is not v and np.linalg.norm(over.vector) <= 0.25
    np.testing.assert_array_equal(v, [0.3, 0.4])  # the input is never scaled in place


@pytest.mark.parametrize("bits", [32, 64])
def test_one_pass_field_encoding_equals_quantize_then_encode(bits: int) -> None:
    q = Quantizer.for_clients(clip=1.0, max_clients=50, bits=bits)
    x = np.random.default_rng(0).normal(size=5001) * 0.01
    reference = q.encode(q.quantize(x, SeededRandom(3)))
    np.testing.assert_array_equal(q.to_field(x, SeededRandom(3)), reference)
    work = x.copy()
    np.testing.assert_array_equal(q.to_field(work, SeededRandom(3), overwrite=True), reference)
    assert reference.dtype == q.dtype
    from hyprstream.privacy.errors import RangeOverflow

    for bad in ([np.nan], [np.inf], [0.0, -np.inf], [3.0]):
        with pytest.raises(RangeOverflow):
            q.to_field(np.array(bad), SeededRandom(0))


def test_layout_round_trip() -> None:
    layout = Layout.of({"head.weight": (10, 4), "head.bias": (10,)})
    assert layout.names == ("head.bias", "head.weight") and layout.size == 50
    delta = {"head.weight": np.arange(40.0).reshape(10, 4), "head.bias": -np.arange(10.0)}
    back = layout.unflatten(layout.flatten(delta), dtype=np.float64)
    for k in delta:
        np.testing.assert_array_equal(back[k], delta[k])
    flat, ranks = layout.wire_shapes()
    assert Layout.from_wire(layout.names, flat, ranks) == layout


def test_central_noise_is_calibrated_to_the_clip_bound() -> None:
    dp = ClientDP(clip=0.5, noise_multiplier=2.0, placement=NoisePlacement.CENTRAL, min_clients=1, denominator=10.0)
    total = np.zeros(100_000)
    out = dp.release(total, 10, SeededRandom(0))
    assert out.std() == pytest.approx(2.0 * 0.5 / 10.0, rel=0.01)


def test_distributed_noise_survives_secure_aggregation_and_has_the_target_std() -> None:
    """Each client adds N_Z(0, (zC)^2 s^2 / m) before masking; the unmasked sum carries std >= zC."""
    n, dim, clip, z = 8, 40_000, 1.0, 1.5
    dp = ClientDP(clip=clip, noise_multiplier=z, placement=NoisePlacement.DISTRIBUTED, min_clients=n, denominator=n)
    q = Quantizer.for_clients(clip=clip, max_clients=n, bits=32, noise_std=dp.local_std())
    spec = InputSpec(Layout.of({"w": (dim,)}), clip, q, noise_sigma=dp.local_sigma(q, dim))
    encoded = {i: encode({"w": np.zeros(dim)}, 1, spec, SeededRandom(i)).vector for i in range(1, n + 1)}
    result = run_in_memory(encoded, degree=n - 1, threshold=4, source=SeededRandom(0))
    noisy_sum = decode(result.total, n, spec).total
    assert noisy_sum.std() == pytest.approx(z * clip, rel=0.02)
    mean = dp.release(noisy_sum, n, SeededRandom(0))  # no further noise: the sum already has it
    np.testing.assert_allclose(mean, noisy_sum / n)
    with pytest.raises(PrivacyViolation, match="less noise"):
        dp.release(noisy_sum, n - 1, SeededRandom(0))


def test_weighted_sums_refuse_dp_noise() -> None:
    q = Quantizer.for_clients(clip=1.0, max_clients=4, noise_std=0.1)
    with pytest.raises(ValueError, match="weighted"):
        InputSpec(Layout.of({"w": (3,)}), 1.0, q, noise_sigma=10.0, weighted=True)


def test_the_noise_norm_of_a_release_is_checked_against_the_receivers_bound():
    # the digits MLP (17,226 values), z = 1.1, C = 2, D = 6: the noise alone has norm ~48 on the mean
    dp = ClientDP(clip=2.0, noise_multiplier=1.1, placement=NoisePlacement.CENTRAL, min_clients=1, denominator=6.0)
    expected = 1.1 * 2.0 * math.sqrt(17_226) / 6.0
    assert dp.noise_norm(17_226) == pytest.approx(expected)
    released = dp.release(np.zeros(17_226), 6, SeededRandom(3))
    assert np.linalg.norm(released) == pytest.approx(expected, rel=0.02)  # what core would measure
    with pytest.raises(PrivacyViolation, match=r"max_update_norm 40 is below the noise of norm 48\.\d"):
        dp.check_bound(40.0, 17_226, "round 1 of m")
    dp.check_bound(50.0, 17_226, "round 1 of m")
    dp.check_bound(None, 17_226, "round 1 of m")  # no bound at core: nothing to check


def test_per_group_weights_give_each_group_the_mean_of_the_devices_that_trained_it() -> None:
    """Two layer groups ("a": parameter a.w, "b": b.w); device 1 trains both, device 2 only "b" (hybrid).
    Hand-computed: a's mean is device 1's value alone, b's the mean of both; the weights ride masked."""
    layout = Layout.of({"a.w": (2,), "b.w": (1,)})
    q = Quantizer.for_clients(clip=10.0, max_clients=2)
    spec = InputSpec(layout, 10.0, q, groups=(0, 1))
    assert spec.carries_weights and spec.dim == 3 + 2
    one = encode({"a.w": np.array([1.0, 2.0]), "b.w": np.array([4.0])}, 5, spec, SeededRandom(1)).vector
    two = encode({"b.w": np.array([2.0])}, 7, spec, SeededRandom(2), trained=[1]).vector
    result = run_in_memory({1: one, 2: two}, degree=1, threshold=1, source=SeededRandom(0))
    dec = decode(result.total, 2, spec)
    np.testing.assert_array_equal(dec.weights, [1.0, 2.0])
    mean, kept = group_means(dec, spec)
    assert kept == (0, 1)
    np.testing.assert_allclose(mean, [1.0, 2.0, 3.0], atol=2 * q.scale)
    # weighted by examples (capped at max_weight = 10): b = (0.5 * 4 + 0.7 * 2) / 1.2
    weighted = InputSpec(layout, 10.0, q, weighted=True, max_weight=10.0, groups=(0, 1))
    one = encode({"a.w": np.array([1.0, 2.0]), "b.w": np.array([4.0])}, 5, weighted, SeededRandom(1)).vector
    two = encode({"b.w": np.array([2.0])}, 7, weighted, SeededRandom(2), trained=[1]).vector
    mean, kept = group_means(decode(one + two, 2, weighted), weighted)
    np.testing.assert_allclose(mean, [1.0, 2.0, (0.5 * 4 + 0.7 * 2) / 1.2], atol=1e-6)
    # nobody trained "a": no mean for it
    dec = decode(two, 1, spec)
    assert group_means(dec, spec)[1] == (1,)


def test_a_device_must_send_whole_groups_it_trained() -> None:
    from hyprstream.errors import ValidationError

    layout = Layout.of({"a.w": (2,), "a.b": (1,), "b.w": (1,)})
    spec = InputSpec(layout, 10.0, Quantizer.for_clients(clip=10.0, max_clients=2), groups=(0, 0, 1))
    with pytest.raises(ValidationError, match=r"missing \['a.b'\]"):
        encode({"a.w": np.ones(2), "b.w": np.ones(1)}, 1, spec, SeededRandom(0), trained=[0, 1])
    with pytest.raises(ValidationError, match=r"unexpected \['b.w'\]"):
        encode({"a.w": np.ones(2), "a.b": np.ones(1), "b.w": np.ones(1)}, 1, spec, SeededRandom(0), trained=[0])
    with pytest.raises(ValidationError, match="not among the round's"):
        encode({"b.w": np.ones(1)}, 1, spec, SeededRandom(0), trained=[2])
    for groups in ((0, 2, 2), (0, 1)):  # a group number skipped; a parameter without a group
        with pytest.raises(ValueError, match="every layout parameter"):
            InputSpec(layout, 10.0, spec.quantizer, groups=groups)


def test_a_noised_round_carries_no_weights_and_a_skipped_group_counts_zeros() -> None:
    """With distributed DP noise no weight rides along (its sensitivity would need noise too): the fixed
    denominator divides every group, and a hybrid device adds exact zeros to the group it skipped."""
    layout = Layout.of({"a.w": (1,), "b.w": (1,)})
    dp = ClientDP(clip=1.0, noise_multiplier=1e-6, placement=NoisePlacement.DISTRIBUTED, min_clients=2, denominator=2)
    q = Quantizer.for_clients(clip=1.0, max_clients=2, noise_std=dp.local_std())
    spec = InputSpec(layout, 1.0, q, noise_sigma=dp.local_sigma(q, 2), groups=(0, 1))
    assert not spec.carries_weights and spec.dim == 2
    two = encode({"b.w": np.array([0.5])}, 3, spec, SeededRandom(2), trained=[1])
    assert decode(two.vector, 1, spec).total[0] == pytest.approx(0.0, abs=5 * q.scale)
