import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hyprstream.codec import Encoding, decode_int8, encode_int8, encoded_nbytes, int8_scale, parse_encoding
from hyprstream.errors import ValidationError

pytestmark = pytest.mark.unit

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
tensors = hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, max_side=8), elements=finite)


@given(tensors, st.integers(0, 2**32 - 1))
@example(np.array(1e-45, np.float32), 0)  # max/127 underflows float32 to 0: the step must not
@example(np.array([3e-44, -1e-45], np.float32), 1)
@settings(max_examples=200, deadline=None)
def test_error_is_within_one_step_and_nothing_clips(x, seed):
    q, scale = encode_int8(x, np.random.default_rng(seed))
    assert q.dtype == np.int8 and q.shape == x.shape and scale.dtype == np.float32
    assert np.all(np.abs(q.astype(np.int16)) <= 127)
    out = decode_int8(q, scale)
    assert out.dtype == np.float32 and out.shape == x.shape
    # float32 arithmetic in decode adds at most a few ulps of the largest value
    slack = 4 * np.finfo(np.float32).eps * float(np.max(np.abs(x), initial=0.0))
    assert np.all(np.abs(x.astype(np.float64) - out.astype(np.float64)) <= float(scale) + slack)
    assert float(scale) * 127 >= float(np.max(np.abs(x), initial=0.0))


@given(tensors, st.integers(0, 2**32 - 1))
@settings(max_examples=50, deadline=None)
def test_encoding_is_reproducible_from_the_seed(x, seed):
    a = encode_int8(x, np.random.default_rng(seed))
    b = encode_int8(x, np.random.default_rng(seed))
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]


def test_stochastic_rounding_is_unbiased():
    # values between grid points: deterministic rounding would be off by up to half a step on each
    x = np.array([1.0, 0.3, -0.77, 0.5, 0.01, -0.999], np.float32)
    rng = np.random.default_rng(0)
    n = 20_000
    mean = np.mean([decode_int8(*encode_int8(x, rng)) for _ in range(n)], axis=0, dtype=np.float64)
    step = float(int8_scale(x))
    # the rounding error of one draw lies in (-step, step): its mean over n draws has std <= step / (2 sqrt n)
    assert np.all(np.abs(mean - x) <= 5 * step / (2 * np.sqrt(n)))
    # and the same values under round-to-nearest are biased by far more than that somewhere
    nearest = np.round(x / step) * step
    assert np.max(np.abs(nearest - x)) > 10 * step / (2 * np.sqrt(n))


def test_zero_and_hand_computed():
    q, scale = encode_int8(np.zeros((3,), np.float32), np.random.default_rng(0))
    assert scale == 0 and not q.any()
    q, scale = encode_int8(np.array([127.0, -63.5, 0.0], np.float32), np.random.default_rng(1))
    assert scale == np.float32(1.0)
    assert q[0] == 127 and q[2] == 0 and q[1] in (-63, -64)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad):
    with pytest.raises(ValidationError, match="NaN or infinite"):
        encode_int8(np.array([1.0, bad], np.float32), np.random.default_rng(0))


def test_decode_refuses_bad_input():
    with pytest.raises(ValidationError, match="int8"):
        decode_int8(np.zeros(2, np.int16), 1.0)
    for scale in (np.nan, np.inf, -1.0):
        with pytest.raises(ValidationError, match="scale"):
            decode_int8(np.zeros(2, np.int8), scale)
    with pytest.raises(ValidationError, match="floating-point"):
        encode_int8(np.zeros(2, np.int32), np.random.default_rng(0))


def test_encoded_sizes_and_names():
    assert encoded_nbytes((10, 10), Encoding.INT8) == 104
    assert encoded_nbytes((10, 10), Encoding.FP32) == 400
    assert parse_encoding("int8") is Encoding.INT8
    with pytest.raises(ValidationError, match="unknown update encoding"):
        parse_encoding("int4")
