"""Prompt batches that share the chat template's opening tokens: the shared prefix is split off
once, each prompt's remaining tokens are left padded to a length bucket, and the forward runs the
prefix once and shares its keys and values with every prompt (:func:`forward_shared_prefix`,
which also resumes at a layer, for selection; :func:`forward_after_prefix`, a KV-cache prefill
that rows continue, for evaluation and generation)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.core import ForwardOutput, KVCache, forward
from refusal_jax.models.loading import Model
from refusal_jax.models.params import Params
from refusal_jax.text.chat import left_pad, pad_token_id


def shared_prefix_length(token_lists: Sequence[Sequence[int]], keep_last: int = 1) -> int:
    """Length of the longest common prefix of the token lists, leaving every list at least its
    last ``keep_last`` tokens (those whose logits or activations are read)."""
    limit = max(min(len(ids) for ids in token_lists) - keep_last, 0)
    first = token_lists[0]
    for index in range(limit):
        if any(ids[index] != first[index] for ids in token_lists):
            return index
    return limit


def split_batches(token_lists: Sequence[Sequence[int]], n_prefix: int, *, batch_size: int,
                  length_bucket: int, pad_id: int):
    """Yields (row indices, tokens [B, P + S], valid [B, P + S]): the shared prefix, then each
    prompt's remaining tokens left padded to a multiple of ``length_bucket``.

    Prompts are sorted by length and split into batches of equal size, at most ``batch_size``
    rows (n <= batch_size prompts are one batch of n rows). Every row costs a forward pass, so
    only the last batch is filled up, with fewer fillers than there are batches (repeats of its
    last prompt; callers ignore their outputs).
    """
    n = len(token_lists)
    n_batches = -(-n // batch_size)
    rows_per_batch = -(-n // n_batches)
    order = np.argsort([len(ids) for ids in token_lists], kind="stable")
    prefix = np.asarray(token_lists[0][:n_prefix], np.int32)
    for start in range(0, n, rows_per_batch):
        rows = order[start:start + rows_per_batch]
        rests = [token_lists[i][n_prefix:] for i in rows]
        rests += [rests[-1]] * (rows_per_batch - len(rows))
        length = -(-max(map(len, rests)) // length_bucket) * length_bucket
        batch = left_pad(rests, length=length, pad_id=pad_id)
        tokens = np.concatenate([np.broadcast_to(prefix, (rows_per_batch, n_prefix)),
                                 batch.tokens], axis=1)
        valid = np.concatenate([np.ones((rows_per_batch, n_prefix), bool), batch.valid], axis=1)
        yield rows, tokens, valid


def shared_prefix_batches(model: Model, instructions: Sequence[str], *, batch_size: int,
                          length_bucket: int, keep_last: int = 1):
    """The chat prompts of ``instructions`` as (P, [(row indices, tokens, valid)]): the number
    of template tokens every prompt starts with, and the batches of :func:`split_batches`.
    Raises ValueError (from ``ChatFormat.encode``) for prompts too long or merged with the
    template."""
    encoded = model.chat.encode(list(instructions), context_length=model.config.max_context,
                                length_bucket=1)
    token_lists = [list(ids[mask]) for ids, mask in zip(encoded.tokens, encoded.valid)]
    n_prefix = shared_prefix_length(token_lists, keep_last)
    return n_prefix, list(split_batches(token_lists, n_prefix, batch_size=batch_size,
                                        length_bucket=length_bucket,
                                        pad_id=pad_token_id(model.tokenizer)))


def _tokens_or_resid(inputs: jax.Array) -> dict[str, jax.Array | None]:
    """`forward`'s inputs: integer token ids, or a float residual stream."""
    if jnp.issubdtype(inputs.dtype, jnp.integer):
        return {"tokens": inputs, "resid": None}
    return {"tokens": None, "resid": inputs}


def forward_shared_prefix(params: Params, prefix: jax.Array, rows: jax.Array, valid: jax.Array,
                          *, config: ModelConfig, intervention: Any = None,
                          capture_positions: jax.Array | None = None,
                          logits: Literal["all", "last", "none"] = "last",
                          start_layer: int | jax.Array = 0) -> ForwardOutput:
    """The forward of prompts that all start with ``prefix`` followed by their own left-padded
    ``rows`` (``valid`` [B, T]; capture positions index into T): each prompt's full forward (up
    to float rounding), with the prefix run once under the same intervention and its keys and
    values shared by every row, which attends to them and to its own in one softmax.

    ``prefix`` is [P] token ids or the [P, D] block input of layer ``start_layer`` (P may be 0);
    ``rows`` is [B, T] token ids or [B, T, D] block inputs of layer ``start_layer``. The
    intervention must not depend on the row (e.g. no per-row position windows).
    """
    n_prefix = prefix.shape[0]
    cache = None
    if n_prefix:
        cache = forward(params, valid=jnp.ones((1, n_prefix), bool), config=config,
                        intervention=intervention, logits="none", start_layer=start_layer,
                        cache=KVCache.empty(config, 1, n_prefix, params.embed.dtype),
                        **_tokens_or_resid(prefix[None])).cache
    return forward(params, valid=valid, config=config, intervention=intervention,
                   capture_positions=capture_positions, cache=cache, extend_cache=False,
                   logits=logits, start_layer=start_layer, **_tokens_or_resid(rows))


def forward_after_prefix(params: Params, prefix: jax.Array, rows: jax.Array, valid: jax.Array,
                         *, config: ModelConfig, intervention: Any = None,
                         capture_positions: jax.Array | None = None,
                         logits: Literal["all", "last", "none"] = "last",
                         start_layer: int | jax.Array = 0,
                         stop_layer: int | jax.Array | None = None,
                         cache_length: int | None = None,
                         constrain: Callable[[KVCache], KVCache] | None = None
                         ) -> tuple[ForwardOutput | None, ForwardOutput]:
    """The KV-cache prefill of prompts that all start with ``prefix`` followed by their own
    left-padded ``rows`` (``valid`` [B, T]; capture positions index into T), as generation
    does it: the prefix runs once, under the same intervention, into a one-row cache that every
    row then continues. Returns the prefix's output (None when P = 0) and the rows'; each
    prompt's full forward up to float rounding. Unlike :func:`forward_shared_prefix`, attention
    sums over the cache and the row's own keys separately.

    ``prefix`` is [P] token ids or the [P, D] block input of layer ``start_layer`` (P may be 0);
    ``rows`` is [B, T] token ids or [B, T, D] block inputs. ``stop_layer`` stops both runs
    there (`forward`; pass logits="none"). The caches have ``cache_length`` slots (default
    P + T; with neither a prefix nor ``cache_length`` the rows run without a cache), and a
    B-row cache passes through ``constrain`` (e.g. a sharding constraint) before the rows
    extend it.
    """
    constrain = constrain or (lambda cache: cache)
    n_rows, length = valid.shape
    n_prefix = prefix.shape[0]
    slots = n_prefix + length if cache_length is None else cache_length
    run = functools.partial(forward, params, config=config, intervention=intervention,
                            start_layer=start_layer, stop_layer=stop_layer)
    prefix_out, cache = None, None
    if n_prefix:
        prefix_out = run(valid=jnp.ones((1, n_prefix), bool), logits="none",
                         cache=KVCache.empty(config, 1, slots, params.embed.dtype),
                         **_tokens_or_resid(prefix[None]))
        cache = constrain(prefix_out.cache.repeat_rows(n_rows))
    elif cache_length is not None:
        cache = constrain(KVCache.empty(config, n_rows, slots, params.embed.dtype))
    out = run(valid=valid, capture_positions=capture_positions, cache=cache, logits=logits,
              **_tokens_or_resid(rows))
    return prefix_out, out
