"""Difference in means: agreement with numpy, float32 accumulation, input errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from refusal_jax.directions import mean_difference


def test_matches_numpy_for_every_position_and_layer():
    rng = np.random.default_rng(0)
    harmful = rng.normal(size=(7, 3, 5, 16)).astype(np.float32) + 2.0
    harmless = rng.normal(size=(4, 3, 5, 16)).astype(np.float32)
    result = mean_difference(harmful, harmless)
    assert result.shape == (3, 5, 16) and result.dtype == jnp.float32
    expected = harmful.astype(np.float64).mean(0) - harmless.astype(np.float64).mean(0)
    np.testing.assert_allclose(np.asarray(result), expected, rtol=1e-5, atol=1e-6)


def test_any_trailing_shape():
    harmful, harmless = np.array([[1.0], [3.0]]), np.array([[0.5]])
    np.testing.assert_allclose(np.asarray(mean_difference(harmful, harmless)), [1.5])
    np.testing.assert_allclose(float(mean_difference(np.array([2.0, 4.0]), np.array([1.0]))), 2.0)


def test_bfloat16_inputs_are_averaged_in_float32():
    # A quarter of the harmful values are 1 + 2^-7, the rest 1: the mean 1 + 2^-9 falls between
    # two bfloat16 numbers (spacing 2^-7 near 1), so only a float32 mean keeps the difference.
    harmful = jnp.asarray(np.where(np.arange(4096) % 4 == 0, 1.0 + 2.0**-7, 1.0)[:, None],
                          jnp.bfloat16)
    harmless = jnp.ones((4096, 1), jnp.bfloat16)
    result = mean_difference(harmful, harmless)
    assert result.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(result), [2.0**-9], rtol=1e-6)


@pytest.mark.parametrize("harmful, harmless, match", [
    (np.zeros((0, 4)), np.zeros((3, 4)), "harmful activations are empty"),
    (np.zeros((3, 4)), np.zeros((0, 4)), "harmless activations are empty"),
    (np.zeros((3, 4)), np.zeros((3, 5)), r"trailing shape; got \(4,\) and \(5,\)"),
    (np.full((3, 4), np.nan), np.zeros((3, 4)), "NaN or inf"),
    (np.zeros((3, 4)), np.full((3, 4), np.inf), "NaN or inf"),
    (np.float32(1.0), np.zeros((3,)), "leading prompt axis"),
    (np.zeros((3, 4), np.int32), np.zeros((3, 4), np.int32), "floating point"),
])
def test_errors(harmful, harmless, match):
    with pytest.raises(ValueError, match=match):
        mean_difference(harmful, harmless)
