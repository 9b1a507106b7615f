"""Sampling temperature against its definition: at temperature T (top_p = 1) the next token is
drawn from softmax(logits / T). Checked on the empirical distribution of many independent
draws (rows of one batch draw independently), against softmax computed here in float64."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import tiny_hf_model, to_ours

from refusal_jax.models.core import forward
from refusal_jax.models.generate import Sampling, _choose, generate

# Largest allowed |empirical - expected| of a token's frequency, in standard errors
# sqrt(p (1 - p) / n) (plus 1/n): the draws are seeded, so the test is deterministic; with
# 128 tokens a correct sampler exceeds 5 standard errors at one of them with probability < 1e-4.
Z_LIMIT = 5.0


def softmax64(logits, temperature):
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max()
    return np.exp(z) / np.exp(z).sum()


def assert_frequencies_match(tokens, expected):
    n = tokens.size
    counts = np.bincount(np.asarray(tokens).ravel(), minlength=expected.size) / n
    bound = Z_LIMIT * np.sqrt(expected * (1 - expected) / n) + 1.0 / n
    worst = np.argmax(np.abs(counts - expected) - bound)
    assert np.all(np.abs(counts - expected) <= bound), (
        f"token {worst}: frequency {counts[worst]:.4f}, softmax(logits / T) {expected[worst]:.4f}")


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_the_next_token_follows_softmax_of_logits_over_temperature(temperature):
    logits = np.array([0.0, 1.0, 2.0, 3.0], np.float32)
    n = 100_000
    tokens = _choose(jnp.broadcast_to(jnp.asarray(logits), (n, 4)),
                     Sampling.create(temperature=temperature), jax.random.key(0))
    assert_frequencies_match(np.asarray(tokens), softmax64(logits, temperature))


def test_temperature_changes_the_distribution():
    """The frequencies at T = 0.5 and T = 2 differ from each other and from T = 1's by far more
    than the sampling error (e.g. the top token: 0.87, 0.64 and 0.46)."""
    logits = jnp.broadcast_to(jnp.asarray([0.0, 1.0, 2.0, 3.0]), (100_000, 4))
    top = {t: float(np.mean(np.asarray(_choose(logits, Sampling.create(temperature=t),
                                                 jax.random.key(1))) == 3))
           for t in (0.5, 1.0, 2.0)}
    assert top[0.5] > top[1.0] + 0.1 > top[2.0] + 0.2


@functools.lru_cache(maxsize=None)
def _peaked_model():
    """A tiny random Llama whose LM head is scaled up, so that its next-token logits spread over
    several nats (temperature then matters)."""
    config, params = to_ours(tiny_hf_model("llama_mha", seed=1))
    return config, dataclasses.replace(params, lm_head=params.lm_head * 40.0)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_generate_samples_its_first_token_from_softmax_over_temperature(temperature):
    config, params = _peaked_model()
    prompt = np.array([[5, 17, 33, 2, 90]], np.int32)
    logits = np.asarray(forward(params, jnp.asarray(prompt), jnp.ones(prompt.shape, bool),
                                config=config, logits="last").logits)[0]
    expected = softmax64(logits, temperature)
    plain = softmax64(logits, 1.0)
    assert np.abs(expected - plain).max() > 0.1  # the test can tell T from 1
    n = 8192
    tokens = np.repeat(prompt, n, axis=0)
    out = generate(params, tokens, np.ones(tokens.shape, bool), config=config, max_new_tokens=1,
                   stop_ids=[127], sampling=Sampling.create(temperature=temperature),
                   key=jax.random.key(3))
    assert_frequencies_match(np.asarray(out.tokens)[:, 0], expected)
