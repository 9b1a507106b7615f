"""The study's intervals against references: scipy's Wilson interval, the published values of
Newcombe's difference interval, and the normal-theory interval for a bootstrap of a large sample."""

import numpy as np
import pytest
from scipy.stats import binomtest

from refusal_jax.evaluation.intervals import (
    mean_estimate,
    rate_difference_interval,
    rate_estimate,
    wilson_interval,
)


@pytest.mark.parametrize("successes,n", [(0, 10), (5, 10), (10, 10), (3, 16), (1, 50), (49, 50)])
def test_wilson_matches_scipy(successes, n):
    reference = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    np.testing.assert_allclose(wilson_interval(successes, n), (reference.low, reference.high),
                               rtol=0, atol=1e-12)


def test_wilson_bounds_are_exact_at_the_ends():
    assert wilson_interval(0, 16)[0] == 0.0 and wilson_interval(16, 16)[1] == 1.0


def test_rate_estimate_counts_true_flags():
    estimate = rate_estimate([True, False, False, True])
    assert estimate.value == 0.5
    assert estimate.interval == list(wilson_interval(2, 4))


# Newcombe (1998), Statistics in Medicine 17:873-890, Table II, method 10.
@pytest.mark.parametrize("counts,published", [
    ((56, 70, 48, 80), (0.0524, 0.3339)),
    ((9, 10, 3, 10), (0.1705, 0.8090)),
    ((5, 56, 0, 29), (-0.0381, 0.1926)),
])
def test_rate_difference_matches_newcombe(counts, published):
    np.testing.assert_allclose(rate_difference_interval(*counts), published, atol=5e-5)


def test_bootstrap_mean_agrees_with_normal_theory_on_a_large_sample():
    values = np.random.default_rng(1).normal(2.0, 3.0, 400)
    estimate = mean_estimate(values, n_resamples=4000)
    half = 1.959964 * values.std(ddof=1) / np.sqrt(values.size)
    assert estimate.value == pytest.approx(values.mean())
    np.testing.assert_allclose([estimate.low, estimate.high],
                               [values.mean() - half, values.mean() + half], atol=0.06 * half)
    assert mean_estimate(values) == mean_estimate(values)  # seeded: reproducible


@pytest.mark.parametrize("call,message", [
    (lambda: wilson_interval(3, 2), "successes <= n"),
    (lambda: wilson_interval(0, 0), "n >= 1"),
    (lambda: mean_estimate([]), "non-empty"),
    (lambda: mean_estimate([1.0, float("nan")]), "NaN"),
])
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
