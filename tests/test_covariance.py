"""kdray/specialists/covariance.py: the streaming covariance equals the covariance of all predictions at once."""

import numpy as np
import pytest

from kdray.specialists.covariance import CovarianceAccumulator, class_covariance


def _probabilities(rng, rows, classes, scale=3.0):
    logits = rng.normal(scale=scale, size=(rows, classes))
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def test_streaming_covariance_equals_covariance_of_all_rows():
    rng = np.random.default_rng(0)
    p = _probabilities(rng, 1000, 7)
    cuts = [0, 1, 2, 130, 131, 600, 1000]  # uneven batches, including single rows
    batches = [p[a:b] for a, b in zip(cuts, cuts[1:])]
    np.testing.assert_allclose(class_covariance(batches, 7), np.cov(p, rowvar=False), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(class_covariance(batches, 7, ddof=0), np.cov(p, rowvar=False, ddof=0),
                               rtol=1e-12, atol=1e-15)


def test_merging_accumulators_of_disjoint_rows_equals_one_pass():
    rng = np.random.default_rng(1)
    p = _probabilities(rng, 500, 5)
    left = CovarianceAccumulator(5).update(p[:123]).update(p[123:300])
    right = CovarianceAccumulator(5).update(p[300:])
    merged = left.merge(right).merge(CovarianceAccumulator(5))  # an empty accumulator changes nothing
    assert merged.rows == 500
    np.testing.assert_allclose(merged.mean, p.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.covariance(), np.cov(p, rowvar=False), rtol=1e-12, atol=1e-15)


def test_no_cancellation_when_the_mean_dwarfs_the_variance():
    # Raw sums of p p^T would lose the tiny spread around 0.5 to rounding; centred updates keep it.
    rng = np.random.default_rng(2)
    spread = rng.normal(scale=1e-7, size=(20_000, 1))
    p = np.hstack([0.5 + spread, 0.5 - spread])
    batches = np.array_split(p, 50)
    np.testing.assert_allclose(class_covariance(batches, 2), np.cov(p, rowvar=False), rtol=1e-6)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"shape \[B, 3\]"):
        CovarianceAccumulator(3).update(np.ones((4, 2)))
    with pytest.raises(ValueError, match="num_classes"):
        CovarianceAccumulator(0)
    with pytest.raises(ValueError, match="undefined"):
        CovarianceAccumulator(3).update(np.ones((1, 3))).covariance()
