import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyprstream.errors import ValidationError
from hyprstream.sim.partition import dirichlet, iid

pytestmark = pytest.mark.unit


@given(st.integers(1, 20), st.integers(0, 10_000), st.floats(0.05, 100), st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_dirichlet_is_a_partition(parts, extra, alpha, seed):
    labels = np.random.default_rng(seed).integers(0, 10, size=parts * 5 + extra % 500)
    try:
        split = dirichlet(labels, parts, alpha, np.random.default_rng(seed), min_samples=1)
    except ValidationError:
        return  # a very skewed draw may not satisfy min_samples: that is reported, never silently wrong
    joined = np.sort(np.concatenate(split))
    np.testing.assert_array_equal(joined, np.arange(len(labels)))
    assert len(split) == parts and min(len(p) for p in split) >= 1


def test_dirichlet_skews_labels_and_is_seeded():
    labels = np.repeat(np.arange(10), 100)
    a = dirichlet(labels, 5, 0.1, np.random.default_rng(1), min_samples=5)
    b = dirichlet(labels, 5, 0.1, np.random.default_rng(1), min_samples=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # with alpha 0.1 most parts are dominated by few classes
    top_share = [np.bincount(labels[p], minlength=10).max() / len(p) for p in a]
    assert np.mean(top_share) > 0.3


def test_iid_and_errors():
    split = iid(10, 3, np.random.default_rng(0))
    assert sorted(len(p) for p in split) == [3, 3, 4]
    with pytest.raises(ValidationError):
        iid(2, 3, np.random.default_rng(0))
    with pytest.raises(ValidationError, match="cannot give"):
        dirichlet(np.zeros(5, int), 3, 1.0, np.random.default_rng(0), min_samples=2)
