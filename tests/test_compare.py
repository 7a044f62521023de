import numpy as np
import pytest

from virchow_rt.compare import compare, knn_overlap
from virchow_rt.errors import InputError


def test_identical_embeddings_pass():
    x = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
    c = compare(x, x, tolerance=0.99999)
    assert c and c.min_cosine == pytest.approx(1.0) and c.max_abs == 0 and c.knn10_overlap == 1.0
    assert str(c).startswith("PASS")


def test_perturbed_embeddings_fail_with_numbers():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 16))
    c = compare(x + rng.normal(scale=0.5, size=x.shape), x, tolerance=0.999)
    assert not c and c.min_cosine < 0.99 and c.rel_l2 > 0.1
    assert str(c).startswith("FAIL")


def test_nan_fails_even_if_cosine_would_pass():
    x = np.ones((4, 8))
    y = x.copy()
    y[0, 0] = np.nan
    assert not compare(y, x, tolerance=0.0)


def test_knn_overlap_detects_shuffled_neighbourhoods():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(100, 8))
    assert knn_overlap(x, x) == 1.0
    assert knn_overlap(x, rng.normal(size=(100, 8))) < 0.5


def test_shape_mismatch_is_an_input_error():
    with pytest.raises(InputError, match="shapes"):
        compare(np.zeros((2, 3)), np.zeros((3, 3)), 0.9)
