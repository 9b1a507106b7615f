"""Interventions inside the jitted forward: no recompiles, vmapped sweeps, site semantics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import ragged_batch, tiny_hf_model, to_ours

from refusal_jax import interventions
from refusal_jax.models.core import forward


@functools.lru_cache(maxsize=None)
def _model():
    return to_ours(tiny_hf_model("qwen2_gqa_bias", seed=2))


def _jitted():
    return jax.jit(forward, static_argnames=("config", "logits"))


def _candidates(config, n):
    directions = jax.random.normal(jax.random.key(0), (n, config.d_model))
    coeffs = jnp.linspace(-4.0, 4.0, n)
    return [interventions.activation_addition(d, c, n_layers=config.n_layers, layers=[i % 3])
            for i, (d, c) in enumerate(zip(directions, coeffs))]


def test_changing_intervention_values_does_not_recompile():
    config, params = _model()
    tokens, valid = ragged_batch(vocab=config.vocab_size)
    run = _jitted()
    first, *others = _candidates(config, 4)
    outputs = [run(params, tokens, valid, config=config, intervention=first).logits]
    compiled = run._cache_size()  # jit caches are shared per function: count new entries only
    outputs += [run(params, tokens, valid, config=config, intervention=iv).logits for iv in others]
    assert run._cache_size() == compiled
    assert not np.allclose(outputs[0], outputs[1])


def test_vmapped_interventions_equal_one_at_a_time():
    config, params = _model()
    tokens, valid = ragged_batch(vocab=config.vocab_size)
    candidates = _candidates(config, 5)
    run = _jitted()
    one_by_one = np.stack([run(params, tokens, valid, config=config, intervention=iv).logits
                           for iv in candidates])
    batched = jax.jit(jax.vmap(
        lambda iv: forward(params, tokens, valid, config=config, intervention=iv).logits))(
            interventions.stack(candidates))
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_ablation_removes_the_direction_from_every_block_input():
    config, params = _model()
    tokens, valid = ragged_batch(vocab=config.vocab_size)
    r_hat = jax.random.normal(jax.random.key(1), (config.d_model,))
    r_hat = r_hat / jnp.linalg.norm(r_hat)
    T = tokens.shape[1]
    capture_at = jnp.tile(jnp.arange(T)[None], (tokens.shape[0], 1))
    ablation = interventions.directional_ablation(r_hat, n_layers=config.n_layers, layers=None)
    plain = forward(params, tokens, valid, config=config, capture_positions=capture_at)
    ablated = forward(params, tokens, valid, config=config, capture_positions=capture_at,
                      intervention=ablation)
    along_plain = np.abs(np.asarray(plain.captures @ r_hat))[valid]
    along_ablated = np.abs(np.asarray(ablated.captures @ r_hat))[valid]
    assert along_plain.max() > 1e-2
    assert along_ablated.max() < 1e-5


def test_intervention_built_for_another_model_is_rejected_clearly():
    config, params = _model()
    tokens, valid = ragged_batch(vocab=config.vocab_size)
    wrong = interventions.directional_ablation(jnp.ones(config.d_model), n_layers=5, layers=None)
    with pytest.raises(ValueError, match="built for 5 layers"):
        forward(params, tokens, valid, config=config, intervention=wrong)
