"""Jitted generation with a KV cache: a prefill, then a `lax.while_loop` of single-token steps.

Shapes are static (the cache holds prefix + prompt + `max_new_tokens` slots), so a batch
compiles once per (batch size, prefix length, prompt bucket, max_new_tokens, number of
interventions). The same intervention is active during prefill and every decode step.
`generate_each` runs one batch under several interventions of one kind at once (the forward
passes vmapped over them inside one decode loop), so a decode step reads each weight once for
all of them. The prefill is shared: a prefix every row starts with (the chat template's
opening) runs once for all rows, and the layers below the first one any of the interventions
acts at (``first_active_layer``) run once for all of them; each then runs from there, one
after another.
Greedy decoding is the default; temperature and top-p sampling take an explicit PRNG key, and
their values are traced arrays (changing them does not recompile).

On a mesh, the caller passes the KV cache's layout (``cache_shardings``: a `KVCache` of
shardings for B rows and prompt + ``max_new_tokens`` slots, e.g. ``Placement.kv_cache``) and the
cache is constrained to it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from refusal_jax.models.batching import forward_after_prefix
from refusal_jax.models.config import ModelConfig
from refusal_jax.models.core import KVCache, forward
from refusal_jax.models.params import Params


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Generation:
    """tokens: [B, max_new_tokens], `pad_id` after each row's stop; lengths: [B] tokens
    generated per row, the stop token included."""

    tokens: jax.Array
    lengths: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Sampling:
    """Temperature / nucleus sampling parameters (arrays, so sweeps do not recompile)."""

    temperature: jax.Array
    top_p: jax.Array

    @classmethod
    def create(cls, temperature: float = 1.0, top_p: float = 1.0) -> "Sampling":
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p};"
                             " use sampling=None for greedy decoding")
        return cls(jnp.asarray(temperature, jnp.float32), jnp.asarray(top_p, jnp.float32))


def _choose(logits: jax.Array, sampling: Sampling | None, key: jax.Array | None) -> jax.Array:
    """The next token of each row of `logits` [..., vocab]."""
    if sampling is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
    keep = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p
    choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    return jnp.take_along_axis(order, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)


def _constrain(cache: KVCache, cache_shardings: tuple | None) -> KVCache:
    """`cache` with its layout pinned (`cache_shardings`: its leaves' NamedShardings, in order)."""
    if cache_shardings is None:
        return cache
    layout = jax.tree.unflatten(jax.tree.structure(cache), cache_shardings)
    return jax.lax.with_sharding_constraint(cache, layout)


def _count(interventions: Any) -> int:
    """The length of the leading variant axis of `interventions` (1 for None)."""
    leaves = jax.tree.leaves(interventions)
    return 1 if not leaves else leaves[0].shape[0]


def _first_active_layer(interventions: Any, n_layers: int) -> jax.Array:
    """The lowest layer any of the stacked ``interventions`` acts at (int32): every variant runs
    the unsteered model below it. ``n_layers`` for None; 0 when the interventions cannot tell
    (no ``first_active_layer`` method, e.g. a user-defined kind)."""
    if interventions is None:
        return jnp.asarray(n_layers, jnp.int32)
    first = getattr(interventions, "first_active_layer", None)
    if first is None:
        return jnp.zeros((), jnp.int32)
    return jnp.minimum(first(), n_layers).astype(jnp.int32)


def _add_caches(lower: KVCache, upper: KVCache) -> KVCache:
    """One cache from a run up to a layer and one from it (each holds zeros where the other
    holds keys and values, so their sum is exact)."""
    return dataclasses.replace(upper, keys=lower.keys + upper.keys,
                               values=lower.values + upper.values)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "cache_shardings",
                                             "share_prefill"))
def _generate(params, prefix, tokens, valid, interventions, stop_ids, pad_id, sampling, key, *,
              config: ModelConfig, max_new_tokens: int, cache_shardings: tuple | None,
              share_prefill: bool) -> Generation:
    """Generation under each of `interventions` (leaves with a leading variant axis [V, ...];
    None for V = 1 without intervention) of rows that start with `prefix` [P] followed by their
    own left-padded `tokens` [B, T]: tokens [V, B, max_new_tokens], lengths [V, B].

    With `share_prefill`, the prefill is shared where it can be: the prefix runs once (one
    row) for all rows, and with several variants the layers below the first one any of them
    acts at run once for all (no variant changes the stream there); each variant then runs
    from that layer. Without it (the plain path, kept as the reference), each variant's
    prefill runs every layer on the prefix and the rows together. The decode steps are
    vmapped over the variants inside one loop, so a step reads each weight once for all V x B
    rows, and the loop ends once every row of every variant has stopped (a vmapped
    `while_loop` would instead carry, and copy, every variant's KV cache through a select at
    each step).
    """
    if not share_prefill and prefix.shape[0]:  # the plain path: the prefix in every row
        rows = tokens.shape[0]
        tokens = jnp.concatenate([jnp.broadcast_to(prefix, (rows,) + prefix.shape), tokens], 1)
        valid = jnp.concatenate([jnp.ones((rows,) + prefix.shape, bool), valid], 1)
        prefix = prefix[:0]
    B, T = tokens.shape
    V = _count(interventions)
    constrain = functools.partial(_constrain, cache_shardings=cache_shardings)
    # The prefix runs once, in one row, and every row's own tokens extend its cache.
    prefill_rows = functools.partial(forward_after_prefix, params, valid=valid, config=config,
                                     cache_length=prefix.shape[0] + T + max_new_tokens,
                                     constrain=constrain)
    # Below `split` no variant acts: with several variants, those layers run once for all (the
    # prefill then holds one cache more than the V it returns).
    share_layers = share_prefill and V > 1
    split = _first_active_layer(interventions, config.n_layers) if share_layers else 0
    prefix_in, rows_in = prefix, tokens
    if share_layers:
        lower_prefix, lower = prefill_rows(prefix, tokens, logits="none", stop_layer=split)
        lower_cache = constrain(lower.cache)
        prefix_in = prefix if lower_prefix is None else lower_prefix.hidden[0]
        rows_in = lower.hidden

    def prefill(intervention):
        """The first token's logits and the KV cache of one variant (from `split` up)."""
        _, out = prefill_rows(prefix_in, rows_in, intervention=intervention, start_layer=split,
                              logits="last")
        cache = _add_caches(lower_cache, out.cache) if share_layers else out.cache
        return out.logits, constrain(cache)

    def decode(intervention, last, cache):
        out = forward(params, last[:, None], jnp.ones((B, 1), bool), config=config,
                      intervention=intervention, cache=cache, logits="last")
        return out.logits, constrain(out.cache)

    # The variants' prefills run one after another: they are compute-bound already, and on the
    # CPU one matmul over every variant's prompt tokens ran at half the speed of V smaller ones.
    logits, cache = (jax.vmap(prefill, axis_size=1)(None) if interventions is None
                     else jax.lax.map(prefill, interventions))
    first = _choose(logits, sampling, None if key is None else jax.random.fold_in(key, 0))
    generated = jnp.full((V, B, max_new_tokens), pad_id, jnp.int32).at[..., 0].set(first)
    done = jnp.isin(first, stop_ids)
    lengths = jnp.ones((V, B), jnp.int32)

    def not_finished(state):
        step, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def step_fn(state):
        step, last, cache, done, generated, lengths = state
        logits, cache = jax.vmap(decode)(interventions, last, cache)
        step_key = None if key is None else jax.random.fold_in(key, step)
        token = jnp.where(done, pad_id, _choose(logits, sampling, step_key))
        generated = jax.lax.dynamic_update_index_in_dim(generated, token, step, 2)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, stop_ids)
        return step + 1, token, cache, done, generated, lengths

    state = (jnp.ones((), jnp.int32), first, cache, done, generated, lengths)
    _, _, _, _, generated, lengths = jax.lax.while_loop(not_finished, step_fn, state)
    return Generation(tokens=generated, lengths=lengths)


def _settings(tokens, prefix, config: ModelConfig, max_new_tokens: int, stop_ids, pad_id,
              sampling, key) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Checks the request; returns (prefix [P] int32, stop ids, pad id)."""
    prefix = jnp.zeros((0,), jnp.int32) if prefix is None else jnp.asarray(prefix, jnp.int32)
    if prefix.ndim != 1:
        raise ValueError(f"prefix must be one row of token ids [P], got shape {prefix.shape}")
    prompt = prefix.shape[0] + tokens.shape[1]
    if prompt + max_new_tokens > config.max_context:
        raise ValueError(f"prompt of {prompt} tokens + {max_new_tokens} new tokens exceeds"
                         f" the model's context of {config.max_context}; shorten the prompts or "
                         "generate fewer tokens")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if sampling is not None and key is None:
        raise ValueError("sampling needs an explicit PRNG key (key=jax.random.key(seed))")
    stop_ids = list(config.eos_token_ids if stop_ids is None else stop_ids)
    if not stop_ids:
        raise ValueError("no stop token: pass stop_ids or use a config with eos_token_ids")
    pad_id = stop_ids[0] if pad_id is None else pad_id
    return prefix, jnp.asarray(stop_ids, jnp.int32), jnp.asarray(pad_id, jnp.int32)


def _leaves(cache_shardings: KVCache | None) -> tuple | None:
    """The shardings of a cache layout as a hashable tuple (a static jit argument)."""
    return None if cache_shardings is None else tuple(jax.tree.leaves(cache_shardings))


def generate(params: Params, tokens: jax.Array, valid: jax.Array, *, config: ModelConfig,
             max_new_tokens: int, intervention: Any = None, prefix: jax.Array | None = None,
             stop_ids: Sequence[int] | None = None, pad_id: int | None = None,
             sampling: Sampling | None = None, key: jax.Array | None = None,
             cache_shardings: KVCache | None = None, share_prefill: bool = True) -> Generation:
    """Generates up to `max_new_tokens` for a left-padded batch (greedy unless `sampling`).

    `prefix` [P]: token ids every row starts with, before its own `tokens` (e.g. the chat
    template's opening); they run once for all rows, so the intervention must not depend on
    the row (no per-row position windows). Rows stop at the first token in
    `stop_ids` (default: the config's EOS ids); the loop ends early once every row has
    stopped. `cache_shardings`, on a mesh, lays out the KV cache of B rows and P + T +
    `max_new_tokens` slots (see the module docstring). `share_prefill=False` runs the plain
    prefill (every layer, the prefix with each row), the reference for the shared one.
    """
    prefix, stop, pad = _settings(tokens, prefix, config, max_new_tokens, stop_ids, pad_id,
                                  sampling, key)
    one = jax.tree.map(lambda leaf: leaf[None], intervention)
    out = _generate(params, prefix, jnp.asarray(tokens, jnp.int32), jnp.asarray(valid, bool),
                    one, stop, pad, sampling, key, config=config, max_new_tokens=max_new_tokens,
                    cache_shardings=_leaves(cache_shardings), share_prefill=share_prefill)
    return Generation(tokens=out.tokens[0], lengths=out.lengths[0])


def generate_each(params: Params, tokens: jax.Array, valid: jax.Array,
                  interventions: Sequence[Any], *, config: ModelConfig, max_new_tokens: int,
                  prefix: jax.Array | None = None, stop_ids: Sequence[int] | None = None,
                  pad_id: int | None = None, sampling: Sampling | None = None,
                  key: jax.Array | None = None, cache_shardings: KVCache | None = None,
                  share_prefill: bool = True) -> Generation:
    """`generate` of the same batch under each of `interventions` (one kind and shape, e.g.
    a sweep of directions or coefficients), in one pass: tokens [V, B, max_new_tokens] and
    lengths [V, B] for V interventions.

    Row for row the same tokens as V calls of `generate` (up to float rounding), but the
    layers below the first one any of them acts at run once for all, a decode step reads the
    weights once for all V x B rows, and the KV caches of all V variants are held at once.
    Sampling uses the same random numbers for every variant.
    """
    if not interventions:
        raise ValueError("generate_each needs at least one intervention")
    prefix, stop, pad = _settings(tokens, prefix, config, max_new_tokens, stop_ids, pad_id,
                                  sampling, key)
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *interventions)
    return _generate(params, prefix, jnp.asarray(tokens, jnp.int32), jnp.asarray(valid, bool),
                     stacked, stop, pad, sampling, key, config=config,
                     max_new_tokens=max_new_tokens, cache_shardings=_leaves(cache_shardings),
                     share_prefill=share_prefill)
