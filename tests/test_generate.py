"""KV-cache generation against recomputing the full forward at every step."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import ragged_batch, tiny_hf_model, to_ours

from refusal_jax import interventions
from refusal_jax.models import core
from refusal_jax.models.core import KVCache, forward
from refusal_jax.models.generate import Sampling, generate, generate_each

NEW_TOKENS = 8
NEVER = 127  # a stop id; tests that need a stop pick one from the generated text
# The package re-exports the `generate` function under the module's name.
generate_module = importlib.import_module("refusal_jax.models.generate")


@functools.lru_cache(maxsize=None)
def _model(name):
    return to_ours(tiny_hf_model(name, seed=1))


def _greedy_by_full_recompute(params, tokens, valid, config, intervention, n):
    """Reference decoding: re-run the whole sequence without a cache at every step.

    The sequence lives in a fixed buffer whose not-yet-generated tail is marked invalid (never
    attended to), so the reference compiles once.
    """
    B, T = tokens.shape
    tokens = np.concatenate([tokens, np.zeros((B, n), np.int32)], axis=1)
    valid = np.concatenate([valid, np.zeros((B, n), bool)], axis=1)
    run = jax.jit(forward, static_argnames=("config", "logits"))
    for step in range(n):
        logits = run(params, tokens, valid, config=config, intervention=intervention).logits
        tokens[:, T + step] = np.argmax(logits[:, T + step - 1], axis=-1)
        valid[:, T + step] = True
    return tokens[:, T:]


def _ablation(config, seed=0):
    direction = jax.random.normal(jax.random.key(seed), (config.d_model,))
    return interventions.directional_ablation(direction, n_layers=config.n_layers, layers=None)


@pytest.mark.parametrize("name", ["llama3_gqa_rope_scaling", "gemma2_gqa_softcap_sliding"])
@pytest.mark.parametrize("with_intervention", [False, True])
def test_cached_greedy_generation_equals_full_recompute(name, with_intervention):
    config, params = _model(name)
    tokens, valid = ragged_batch(lengths=(9, 5, 2), vocab=config.vocab_size, seed=3)
    intervention = _ablation(config) if with_intervention else None
    out = generate(params, tokens, valid, config=config, max_new_tokens=NEW_TOKENS,
                   intervention=intervention, stop_ids=[NEVER])
    expected = _greedy_by_full_recompute(params, tokens, valid, config, intervention, NEW_TOKENS)
    assert not np.any(expected == NEVER), "pick another never-generated stop id"
    np.testing.assert_array_equal(out.tokens, expected)
    np.testing.assert_array_equal(out.lengths, NEW_TOKENS)


@pytest.mark.parametrize("name", ["llama3_gqa_rope_scaling", "gemma2_gqa_softcap_sliding"])
def test_a_decode_step_is_the_same_through_either_attention_kernel(name, monkeypatch):
    """On the CPU a decode step attends through its own kernels (`core._one_query_kernels`);
    the grouped products that other backends run give the same logits and new keys."""
    config, params = _model(name)
    tokens, valid = ragged_batch(lengths=(9, 5, 2), vocab=config.vocab_size, seed=3)
    cache = forward(params, tokens, valid, config=config, logits="none",
                    cache=KVCache.empty(config, len(tokens), tokens.shape[1] + 1)).cache

    def step():  # not jitted: each call traces the kernel choice anew
        out = forward(params, tokens[:, -1:], np.ones((len(tokens), 1), bool), config=config,
                      cache=cache, logits="last")
        return out.logits, out.cache.keys

    assert core._one_query_kernels(1) and not core._one_query_kernels(2)
    one_query = step()
    monkeypatch.setattr(core, "_one_query_kernels", lambda n_queries: False)
    grouped = step()
    # Equal up to float32 rounding: the kernels sum in other orders.
    for ours, theirs in zip(one_query, grouped):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_intervention_changes_generation():
    config, params = _model("llama3_gqa_rope_scaling")
    tokens, valid = ragged_batch(lengths=(9, 5, 2), vocab=config.vocab_size, seed=3)
    plain = generate(params, tokens, valid, config=config, max_new_tokens=NEW_TOKENS,
                     stop_ids=[NEVER])
    steered = interventions.activation_addition(
        jnp.ones(config.d_model), 5.0, n_layers=config.n_layers, layers=[1])
    pushed = generate(params, tokens, valid, config=config, max_new_tokens=NEW_TOKENS,
                      intervention=steered, stop_ids=[NEVER])
    assert np.any(np.asarray(plain.tokens) != np.asarray(pushed.tokens))


def test_rows_stop_at_their_stop_token_and_are_padded_after():
    config, params = _model("llama3_gqa_rope_scaling")
    tokens, valid = ragged_batch(lengths=(9, 5, 2), vocab=config.vocab_size, seed=3)
    free = np.asarray(generate(params, tokens, valid, config=config, max_new_tokens=NEW_TOKENS,
                               stop_ids=[NEVER]).tokens)
    stop = int(free[0, 2])
    out = generate(params, tokens, valid, config=config, max_new_tokens=NEW_TOKENS,
                   stop_ids=[stop], pad_id=0)
    for row in range(len(tokens)):
        hits = np.flatnonzero(free[row] == stop)
        n = hits[0] + 1 if hits.size else NEW_TOKENS
        assert out.lengths[row] == n
        np.testing.assert_array_equal(out.tokens[row, :n], free[row, :n])
        assert np.all(np.asarray(out.tokens[row, n:]) == 0)


def test_generate_each_equals_one_generate_per_intervention():
    """Tokens and lengths row for row, with rows and variants stopping at different steps."""
    config, params = _model("llama3_gqa_rope_scaling")
    tokens, valid = ragged_batch(lengths=(9, 5, 2), vocab=config.vocab_size, seed=3)
    sweep = [interventions.activation_addition(jax.random.normal(jax.random.key(seed),
                                                                 (config.d_model,)),
                                               coeff, n_layers=config.n_layers, layers=[1])
             for seed, coeff in ((0, 0.0), (1, 4.0), (2, -4.0))]
    free = np.asarray(generate(params, tokens, valid, config=config, max_new_tokens=NEW_TOKENS,
                               stop_ids=[NEVER]).tokens)
    stop_ids = [int(free[0, 1]), int(free[1, 4])]  # some rows stop early, some never
    one_by_one = [generate(params, tokens, valid, config=config, max_new_tokens=NEW_TOKENS,
                           intervention=intervention, stop_ids=stop_ids)
                  for intervention in sweep]
    together = generate_each(params, tokens, valid, sweep, config=config,
                             max_new_tokens=NEW_TOKENS, stop_ids=stop_ids)
    assert together.tokens.shape == (len(sweep), len(tokens), NEW_TOKENS)
    lengths = np.stack([np.asarray(out.lengths) for out in one_by_one])
    assert len(set(lengths.ravel())) > 1, "pick stop ids that end rows at different steps"
    np.testing.assert_array_equal(together.lengths, lengths)
    np.testing.assert_array_equal(together.tokens,
                                  np.stack([np.asarray(out.tokens) for out in one_by_one]))


def _ablation_at(config, layers, seed):
    direction = jax.random.normal(jax.random.key(seed), (config.d_model,))
    return interventions.directional_ablation(direction, n_layers=config.n_layers, layers=layers)


@pytest.mark.parametrize("name", ["llama3_gqa_rope_scaling", "gemma2_gqa_softcap_sliding"])
def test_shared_prefill_generates_what_the_plain_prefill_does(name):
    """The prefix run once for all rows and the layers below the first intervened one run
    once for all variants: the same tokens as the plain path, whose prefill runs every layer
    on each row's whole prompt (their logits differ by float rounding only, bounded in
    test_forward_start_layer)."""
    config, params = _model(name)
    n_layers = config.n_layers
    tokens, valid = ragged_batch(lengths=(9, 5, 2), vocab=config.vocab_size, seed=3)
    prefix = np.asarray([5, 9, 11, 3], np.int32)
    free = np.asarray(generate(params, tokens, valid, config=config, max_new_tokens=NEW_TOKENS,
                               stop_ids=[NEVER], share_prefill=False).tokens)
    stop_ids = [int(free[0, 2]), int(free[2, 5])]
    groups = {"none": None, "late": [_ablation_at(config, [n_layers - 1], 0)],
              "spread": [_ablation_at(config, [n_layers - 1], 0), _ablation_at(config, [1], 1),
                         _ablation_at(config, None, 2)]}
    for label, group in groups.items():
        for rows_prefix in (None, prefix):
            kwargs = dict(config=config, max_new_tokens=NEW_TOKENS, stop_ids=stop_ids,
                          prefix=rows_prefix)
            if group is None:
                shared = generate(params, tokens, valid, **kwargs)
                plain = generate(params, tokens, valid, share_prefill=False, **kwargs)
            else:
                shared = generate_each(params, tokens, valid, group, **kwargs)
                plain = generate_each(params, tokens, valid, group, share_prefill=False,
                                      **kwargs)
            np.testing.assert_array_equal(shared.tokens, plain.tokens, err_msg=label)
            np.testing.assert_array_equal(shared.lengths, plain.lengths, err_msg=label)


def test_a_prefix_generates_what_the_same_tokens_in_every_row_do():
    config, params = _model("llama3_gqa_rope_scaling")
    tokens, valid = ragged_batch(lengths=(9, 5, 2), vocab=config.vocab_size, seed=3)
    prefix = np.asarray([5, 9, 11, 3], np.int32)
    joined_tokens = np.concatenate([np.broadcast_to(prefix, (3, 4)), tokens], axis=1)
    joined_valid = np.concatenate([np.ones((3, 4), bool), valid], axis=1)
    kwargs = dict(config=config, max_new_tokens=NEW_TOKENS, stop_ids=[NEVER],
                  intervention=_ablation_at(config, [1], 0))
    split = generate(params, tokens, valid, prefix=prefix, **kwargs)
    joined = generate(params, joined_tokens, joined_valid, **kwargs)
    np.testing.assert_array_equal(split.tokens, joined.tokens)
    with pytest.raises(ValueError, match="one row of token ids"):
        generate(params, tokens, valid, prefix=prefix[None], **kwargs)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(params, tokens, valid, prefix=np.zeros(config.max_context, np.int32),
                 **kwargs)


def test_generate_each_needs_an_intervention():
    config, params = _model("llama_mha")
    tokens, valid = ragged_batch(lengths=(6,), vocab=config.vocab_size)
    with pytest.raises(ValueError, match="at least one intervention"):
        generate_each(params, tokens, valid, [], config=config, max_new_tokens=2)


def test_sampling_is_reproducible_and_tiny_top_p_is_greedy():
    config, params = _model("llama_mha")
    tokens, valid = ragged_batch(lengths=(6, 4), vocab=config.vocab_size)
    greedy = generate(params, tokens, valid, config=config, max_new_tokens=6, stop_ids=[NEVER])

    def run(top_p, seed):
        return generate(params, tokens, valid, config=config, max_new_tokens=6, stop_ids=[NEVER],
                        sampling=Sampling.create(temperature=1.5, top_p=top_p),
                        key=jax.random.key(seed)).tokens

    np.testing.assert_array_equal(run(1e-6, 0), greedy.tokens)
    np.testing.assert_array_equal(run(1.0, 7), run(1.0, 7))
    assert np.any(np.asarray(run(1.0, 7)) != np.asarray(run(1.0, 8)))


def test_new_intervention_values_reuse_the_compiled_generation():
    config, params = _model("llama_mha")
    tokens, valid = ragged_batch(lengths=(6, 4), vocab=config.vocab_size)
    generate(params, tokens, valid, config=config, max_new_tokens=4, stop_ids=[NEVER],
             intervention=_ablation(config, seed=0))
    compiled = generate_module._generate._cache_size()
    for seed in range(1, 4):
        generate(params, tokens, valid, config=config, max_new_tokens=4, stop_ids=[NEVER],
                 intervention=_ablation(config, seed=seed))
    assert generate_module._generate._cache_size() == compiled


def test_generation_longer_than_the_context_is_rejected():
    config, params = _model("llama_mha")
    tokens, valid = ragged_batch(lengths=(6,), vocab=config.vocab_size)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(params, tokens, valid, config=config, max_new_tokens=config.max_context)
