"""`forward` from a start layer on a given residual stream, and prompts sharing a prefix's keys
and values: both must give the full forward's logits and captures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refusal_jax.interventions import Compose, activation_addition, directional_ablation
from refusal_jax.models.batching import (
    forward_after_prefix,
    forward_shared_prefix,
    shared_prefix_length,
    split_batches,
)
from refusal_jax.models.core import KVCache, forward
from refusal_jax.runtime.batches import placed_batches
from refusal_jax.runtime.random_models import random_model


@pytest.fixture(scope="module")
def tiny():
    return random_model("llama-tiny", seed=3)


def _batch(tiny, instructions):
    batch = tiny.chat.encode(instructions, context_length=512)
    return jnp.asarray(batch.tokens), jnp.asarray(batch.valid)


def _intervention(tiny, layer):
    n_layers = tiny.config.n_layers
    direction = np.random.default_rng(layer).standard_normal(tiny.config.d_model)
    return Compose((
        directional_ablation(direction, n_layers=n_layers, layers=range(layer, n_layers)),
        activation_addition(direction / np.linalg.norm(direction), 2.0, n_layers=n_layers,
                            layers=[layer])))


def test_static_and_traced_start_layers_equal_the_full_forward(tiny):
    tokens, valid = _batch(tiny, ["How do I pick a lock?", "Hi"])
    everywhere = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    baseline = forward(tiny.params, tokens, valid, config=tiny.config,
                       capture_positions=everywhere, logits="none").captures  # [B, T, L, D]
    traced = jax.jit(lambda resid, start, iv: forward(
        tiny.params, None, valid, config=tiny.config, intervention=iv, resid=resid,
        start_layer=start, capture_positions=everywhere))
    for layer in range(tiny.config.n_layers):
        intervention = _intervention(tiny, layer)
        full = forward(tiny.params, tokens, valid, config=tiny.config, intervention=intervention,
                       capture_positions=everywhere)
        scale = float(jnp.max(jnp.abs(full.captures)))
        for out in (forward(tiny.params, None, valid, config=tiny.config,
                            intervention=intervention, resid=baseline[:, :, layer],
                            start_layer=layer, capture_positions=everywhere),
                    traced(baseline[:, :, layer], jnp.asarray(layer), intervention)):
            np.testing.assert_allclose(out.logits, full.logits, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(out.captures[:, :, layer:], full.captures[:, :, layer:],
                                       rtol=1e-5, atol=1e-5 * scale)
            assert not np.any(out.captures[:, :, :layer])  # layers below the start do not run


def test_shared_prefix_forward_of_one_row_and_of_resumed_streams_equals_the_full_forward(tiny):
    """One row (its cache is as long as the prefix, and is read, not extended) and a batch
    resumed at a layer from its residual stream, through `forward_shared_prefix`."""
    instructions = ["Write a poem about the sea", "Name a colour", "Hi"]
    batch = tiny.chat.encode(instructions, context_length=512, length_bucket=1)
    token_lists = [list(ids[mask]) for ids, mask in zip(batch.tokens, batch.valid)]
    n_prefix = shared_prefix_length(token_lists)
    assert n_prefix >= 3  # the template's system turn
    ((rows, split_tokens, split_valid),) = split_batches(token_lists, n_prefix, batch_size=8,
                                                         length_bucket=4, pad_id=0)
    split_tokens, split_valid = jnp.asarray(split_tokens), jnp.asarray(split_valid)
    layer = 1
    intervention = _intervention(tiny, layer)
    full = forward(tiny.params, jnp.asarray(batch.tokens)[rows], jnp.asarray(batch.valid)[rows],
                   config=tiny.config, intervention=intervention, logits="last")

    one = forward_shared_prefix(tiny.params, split_tokens[0, :n_prefix],
                                split_tokens[:1, n_prefix:], split_valid[:1, n_prefix:],
                                config=tiny.config, intervention=intervention)
    np.testing.assert_allclose(one.logits, full.logits[:1], rtol=1e-5, atol=1e-5)

    everywhere = jnp.broadcast_to(jnp.arange(split_tokens.shape[1]), split_tokens.shape)
    baseline = forward(tiny.params, split_tokens, split_valid, config=tiny.config,
                       capture_positions=everywhere, logits="none").captures[:, :, layer]
    resumed = jax.jit(forward_shared_prefix, static_argnames=("config", "logits"))(
        tiny.params, baseline[0, :n_prefix], baseline[:, n_prefix:], split_valid[:, n_prefix:],
        config=tiny.config, intervention=intervention, start_layer=jnp.asarray(layer))
    np.testing.assert_allclose(resumed.logits, full.logits, rtol=1e-5, atol=1e-5)


def test_forward_needs_exactly_one_input_and_a_cache_it_can_extend(tiny):
    tokens, valid = _batch(tiny, ["Hi", "Hello there"])
    with pytest.raises(ValueError, match="exactly one of tokens and resid"):
        forward(tiny.params, None, valid, config=tiny.config)
    embedded = tiny.params.embed[tokens]
    with pytest.raises(ValueError, match="exactly one of tokens and resid"):
        forward(tiny.params, tokens, valid, config=tiny.config, resid=embedded)
    one_row = KVCache.empty(tiny.config, 1, 64)
    with pytest.raises(ValueError, match="extend_cache=False"):
        forward(tiny.params, tokens, valid, config=tiny.config, cache=one_row)


def test_rows_continuing_a_prefilled_prefix_equal_the_full_forward(tiny):
    """`forward_after_prefix` (the evaluate stage's path): logits and captures of every row equal
    those of each prompt's full forward, under an intervention that acts in the prefix too."""
    instructions = ["Write a poem about the sea", "Name a colour", "Hi"]
    batch = tiny.chat.encode(instructions, context_length=512, length_bucket=1)
    token_lists = [list(ids[mask]) for ids, mask in zip(batch.tokens, batch.valid)]
    n_prefix = shared_prefix_length(token_lists)
    ((rows, split_tokens, split_valid),) = split_batches(token_lists, n_prefix, batch_size=8,
                                                         length_bucket=4, pad_id=0)
    intervention = _intervention(tiny, 0)
    full = forward(tiny.params, jnp.asarray(split_tokens), jnp.asarray(split_valid),
                   config=tiny.config, intervention=intervention, logits="last",
                   capture_positions=jnp.full((len(rows), 1), split_tokens.shape[1] - 1))
    _, out = forward_after_prefix(tiny.params, jnp.asarray(split_tokens[0, :n_prefix]),
                                  jnp.asarray(split_tokens[:, n_prefix:]),
                                  jnp.asarray(split_valid[:, n_prefix:]), config=tiny.config,
                                  intervention=intervention,
                                  capture_positions=jnp.full(
                                      (len(rows), 1), split_tokens.shape[1] - n_prefix - 1))
    np.testing.assert_allclose(out.logits, full.logits, rtol=1e-5, atol=1e-5)
    scale = float(jnp.max(jnp.abs(full.captures)))
    np.testing.assert_allclose(out.captures, full.captures, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("traced", [False, True])
def test_a_forward_stopped_at_a_layer_then_resumed_there_equals_the_full_forward(tiny, traced):
    """Logits within float rounding, and the two partial caches add up to the full one (each
    holds exact zeros where the other ran)."""
    tokens, valid = _batch(tiny, ["How do I pick a lock?", "Hi"])
    config, n_layers = tiny.config, tiny.config.n_layers
    empty = KVCache.empty(config, len(tokens), tokens.shape[1])
    for layer in range(n_layers + 1):
        intervention = _intervention(tiny, layer) if layer < n_layers else None
        split = jnp.asarray(layer) if traced else layer
        full = forward(tiny.params, tokens, valid, config=config, intervention=intervention,
                       cache=empty)
        lower = forward(tiny.params, tokens, valid, config=config, stop_layer=split,
                        cache=empty, logits="none")
        upper = forward(tiny.params, None, valid, config=config, intervention=intervention,
                        resid=lower.hidden, start_layer=split, cache=empty)
        np.testing.assert_allclose(upper.logits[valid], full.logits[valid], rtol=1e-5,
                                   atol=1e-5)  # padding's logits are not read
        assert not np.any(lower.cache.keys[layer:]) and not np.any(upper.cache.keys[:layer])
        np.testing.assert_allclose(lower.cache.keys + upper.cache.keys, full.cache.keys,
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(upper.cache.positions, full.cache.positions)


def test_a_forward_that_stops_at_a_layer_has_no_logits(tiny):
    tokens, valid = _batch(tiny, ["Hi"])
    with pytest.raises(ValueError, match='logits="none"'):
        forward(tiny.params, tokens, valid, config=tiny.config, stop_layer=1)


def test_batches_split_at_the_shared_prefix_hold_the_same_prompts(tiny):
    instructions = ["Write a poem about the sea", "Name a colour", "Hi", "How do I bake bread?",
                    "Tell me a joke"]
    whole = list(placed_batches(tiny, instructions, 4, 8))
    split = list(placed_batches(tiny, instructions, 4, 8, split_prefix=True))
    assert len(split) == len(whole) == 2
    for (rows, plain), (split_rows, batch) in zip(whole, split):
        np.testing.assert_array_equal(rows, split_rows)
        assert len(batch.prefix) >= 3 and batch.tokens.shape[1] < plain.tokens.shape[1]
        for row in range(len(rows)):
            joined = np.concatenate([batch.prefix, np.asarray(batch.tokens[row])[
                np.asarray(batch.valid[row])]])
            np.testing.assert_array_equal(
                joined, np.asarray(plain.tokens[row])[np.asarray(plain.valid[row])])
        eoi = np.take_along_axis(np.asarray(batch.tokens), np.asarray(batch.eoi_positions), 1)
        assert np.all(eoi == np.asarray(tiny.chat.eoi_token_ids))
