"""KL(baseline || intervened) against a float64 numpy reference, and on a tiny model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import ragged_batch, tiny_hf_model, to_ours

from refusal_jax.evaluation.kl import (
    _last_logits,
    kl_divergence,
    last_position_kl,
    last_position_logits,
    mean_kl,
)
from refusal_jax.interventions import activation_addition


def reference_kl(p_logits, q_logits):
    p_logits, q_logits = np.float64(p_logits), np.float64(q_logits)
    log_p = p_logits - np.log(np.sum(np.exp(p_logits - p_logits.max(-1, keepdims=True)), -1,
                                     keepdims=True)) - p_logits.max(-1, keepdims=True)
    log_q = q_logits - np.log(np.sum(np.exp(q_logits - q_logits.max(-1, keepdims=True)), -1,
                                     keepdims=True)) - q_logits.max(-1, keepdims=True)
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def test_matches_float64_reference_over_a_range_of_scales():
    rng = np.random.default_rng(0)
    for scale in (0.01, 1.0, 10.0, 40.0):
        p = rng.normal(size=(6, 500)) * scale
        q = p + rng.normal(size=(6, 500)) * scale * 0.3
        expected = reference_kl(p, q)
        got = np.asarray(kl_divergence(jnp.float32(p), jnp.float32(q)))
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(float(mean_kl(jnp.float32(p), jnp.float32(q))),
                                   expected.mean(), rtol=2e-4, atol=1e-6)


def test_zero_for_identical_inputs_and_positive_otherwise():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 300)) * 20, jnp.float32)
    np.testing.assert_array_equal(np.asarray(kl_divergence(logits, logits)), 0.0)
    # a shift of all logits leaves the distribution unchanged
    np.testing.assert_allclose(np.asarray(kl_divergence(logits, logits + 7.0)), 0.0, atol=2e-5)
    assert np.all(np.asarray(kl_divergence(logits, logits[::-1])) > 0)


def test_not_symmetric_and_stable_at_the_extremes():
    p = jnp.asarray([[80.0, 0.0, 0.0]])  # p is essentially one-hot
    q = jnp.asarray([[0.0, 0.0, 0.0]])
    np.testing.assert_allclose(float(kl_divergence(p, q)[0]), reference_kl(p, q)[0], rtol=1e-5)
    np.testing.assert_allclose(float(kl_divergence(q, p)[0]), reference_kl(q, p)[0], rtol=1e-5)
    assert float(kl_divergence(p, q)[0]) != pytest.approx(float(kl_divergence(q, p)[0]))
    # tokens impossible under p contribute nothing, even when q rules them out too
    masked = jnp.asarray([[1.0, 2.0, -jnp.inf]])
    assert float(kl_divergence(masked, masked)[0]) == 0.0
    # a token possible under p but impossible under q: infinite divergence
    assert float(kl_divergence(q, masked)[0]) == np.inf


def test_low_precision_logits_are_computed_in_float32():
    rng = np.random.default_rng(2)
    p, q = rng.normal(size=(3, 64)) * 5, rng.normal(size=(3, 64)) * 5
    p16, q16 = jnp.asarray(p, jnp.bfloat16), jnp.asarray(q, jnp.bfloat16)
    got = kl_divergence(p16, q16)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), reference_kl(np.float32(p16), np.float32(q16)),
                               rtol=1e-4)


def test_candidate_axis_broadcasts_against_one_baseline():
    rng = np.random.default_rng(3)
    base = jnp.asarray(rng.normal(size=(5, 40)), jnp.float32)
    candidates = jnp.asarray(rng.normal(size=(3, 5, 40)), jnp.float32)
    got = np.asarray(mean_kl(base, candidates))
    assert got.shape == (3,)
    for c in range(3):
        np.testing.assert_allclose(got[c], reference_kl(base, candidates[c]).mean(), rtol=1e-5)
    vmapped = jax.vmap(lambda cand: mean_kl(base, cand))(candidates)
    np.testing.assert_allclose(np.asarray(vmapped), got, rtol=1e-6)


@pytest.mark.parametrize("p, q, message", [
    (np.zeros((2, 5)), np.zeros((2, 6)), "vocabulary sizes differ"),
    (np.zeros((2, 5)), np.zeros((3, 5)), "do not broadcast"),
    (np.zeros((2, 5), np.int32), np.zeros((2, 5)), "float logits"),
])
def test_errors(p, q, message):
    with pytest.raises(ValueError, match=message):
        kl_divergence(p, q)


def test_mean_kl_needs_a_prompt_axis():
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        mean_kl(np.zeros(5, np.float32), np.zeros(5, np.float32))


def test_last_position_kl_on_a_tiny_model():
    config, params = to_ours(tiny_hf_model("llama_mha"))
    tokens, valid = ragged_batch((9, 5, 2))
    rng = np.random.default_rng(4)
    directions = [rng.normal(size=config.d_model) for _ in range(3)]
    # ActAdd at layer 0 with a sizeable coefficient, so that the KL is far above float32 noise
    edits = [activation_addition(d / np.linalg.norm(d), 4.0, n_layers=config.n_layers,
                                     layers=0) for d in directions]
    base = last_position_logits(params, tokens, valid, config=config)
    compiles = _last_logits._cache_size()
    for edit in edits:
        intervened = last_position_logits(params, tokens, valid, config=config,
                                          intervention=edit)
        got = last_position_kl(params, tokens, valid, config=config, intervention=edit,
                               baseline_logits=base)
        np.testing.assert_allclose(got, reference_kl(base, intervened).mean(), rtol=1e-5)
        assert got > 0
        # the baseline is recomputed when not given
        assert last_position_kl(params, tokens, valid, config=config,
                                intervention=edit) == pytest.approx(got, rel=1e-6)
    # new directions are new argument values, not new programs
    assert _last_logits._cache_size() == compiles + 1
    zero = dataclasses.replace(edits[0], site_mask=jnp.zeros_like(edits[0].site_mask))
    assert last_position_kl(params, tokens, valid, config=config, intervention=zero,
                            baseline_logits=base) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        last_position_kl(params, tokens, valid, config=config, intervention=zero,
                         baseline_logits=base[:2])
