"""Fluency of a reply: its mean token negative log-likelihood under a model, given the request.

Each row is the request's chat prompt (`ChatFormat.prompts`) followed by the reply's tokens
(tokenized alone, without special tokens), as in `cross_entropy.instruction_corpus`; the NLL is
averaged over the reply's tokens, in nats. Scored under the unsteered model, it is high for text
that model would not write: gibberish, broken words, abrupt switches of language. An empty reply
has no tokens to score and gets NaN.

Several sets of replies to the same requests (one per variant of a study) are scored together
(:func:`reply_nll_each`): each prompt runs once, its last logits predict every set's first reply
token, and each set's replies continue from the prompt's keys and values. The chat template's
opening, shared by every prompt, is prefilled once per batch
(`models.batching.forward_after_prefix`); prompts are sorted by length and batched as in
`cross_entropy` (left padded to `length_bucket`, the last batch with empty rows). The replies
to a batch's prompts, of every set, are then scored shortest first, `batch_size` at a time,
each row reading its own prompt's cache; they are right padded to `reply_bucket` (finer than
the prompts' bucket: sorted, a batch's replies are of nearly one length), and empty replies
(refusals, in a study) take no row.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.models.batching import forward_after_prefix, shared_prefix_length
from refusal_jax.models.config import ModelConfig
from refusal_jax.models.core import KVCache, forward
from refusal_jax.models.params import Params
from refusal_jax.runtime import distributed
from refusal_jax.runtime.placement import Placement
from refusal_jax.text.chat import (ChatFormat, bucketed_length, left_pad, pad_token_id,
                                   right_pad)


@functools.partial(jax.jit, static_argnames="config")
def _prompt_pass(params: Params, prefix: jax.Array, tokens: jax.Array, valid: jax.Array, *,
                 config: ModelConfig) -> tuple[jax.Array, KVCache]:
    """The last logits [B, V] and the KV cache of ``prefix`` [P] (P may be 0) + each row's
    ``tokens``."""
    _, out = forward_after_prefix(params, prefix, tokens, valid, config=config, logits="last",
                                  cache_length=prefix.shape[0] + tokens.shape[1])
    return out.logits, out.cache


@functools.partial(jax.jit, static_argnames="config")
def _reply_nll_sums(params: Params, cache: KVCache, prompt_logits: jax.Array, owners: jax.Array,
                    tokens: jax.Array, valid: jax.Array, *, config: ModelConfig) -> jax.Array:
    """Per row, the sum of -log p(token) over its right-padded reply ``tokens`` [R, T]
    (``valid`` marks them), read after the prompt ``owners`` [R] indexes in ``cache``, whose last
    logits ``prompt_logits`` [B, V] predict the first reply token (float32 [R])."""
    logits = forward(params, tokens, valid, config=config, cache=cache.take_rows(owners),
                     extend_cache=False, logits="all").logits
    first = jnp.take(prompt_logits, owners, axis=0)
    predictors = jnp.concatenate([first[:, None], logits[:, :-1]], axis=1)
    target_logit = jnp.take_along_axis(predictors, tokens[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(predictors, axis=-1) - target_logit
    return jnp.sum(jnp.where(valid, nll, 0.0), axis=-1)


def reply_nll_each(params: Params, chat: ChatFormat, requests: Sequence[str],
                   replies_each: Sequence[Sequence[str]], *, config: ModelConfig,
                   batch_size: int = 16, length_bucket: int = 32, reply_bucket: int = 16,
                   placement: Placement | None = None) -> list[np.ndarray]:
    """:func:`reply_nll` of each set of ``replies_each`` (one reply per request in each; an
    empty reply is not scored), with each request's prompt run once for all sets."""
    if not len(requests):
        return [np.zeros(0) for _ in replies_each]
    for replies in replies_each:
        if len(requests) != len(replies):
            raise ValueError(f"{len(requests)} requests but {len(replies)} replies; pass one "
                             "reply per request")
    tokenizer = chat.tokenizer
    pad_id = pad_token_id(tokenizer)
    prompt_ids = tokenizer(chat.prompts(list(requests)), add_special_tokens=False)["input_ids"]
    # Rows longer than the context keep their first `config.max_context` tokens.
    reply_ids = [[ids[:max(config.max_context - len(prompt), 0)] for prompt, ids in zip(
        prompt_ids, tokenizer(list(replies), add_special_tokens=False)["input_ids"])]
        for replies in replies_each]
    # Every row keeps its last prompt token, which predicts the reply's first.
    n_prefix = shared_prefix_length(prompt_ids, keep_last=1)
    prefix = jnp.asarray(prompt_ids[0][:n_prefix], jnp.int32)
    rests = [ids[n_prefix:] for ids in prompt_ids]
    placement = placement or Placement()
    # Every batch has `batch_size` rows (the last padded), whatever the number of replies, so
    # the sets of a study share one compiled program per length bucket.
    batch_size = placement.round_up(batch_size, "batch")
    sums = np.zeros((len(replies_each), len(requests)), np.float64)
    order = np.argsort([len(rest) for rest in rests], kind="stable")
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        # (length, set, row of the chunk) of every reply to score, shortest first.
        rows = sorted((len(replies[i]), index, slot) for index, replies in enumerate(reply_ids)
                      for slot, i in enumerate(chunk) if replies[i])
        if not rows:
            continue  # nothing to score (e.g. every reply a refusal)
        longest = max(len(rests[i]) for i in chunk)
        length = min(bucketed_length(longest, length_bucket), config.max_context - n_prefix)
        batch = left_pad([rests[i] for i in chunk], length=length, rows=batch_size,
                         pad_id=pad_id)
        placed, _ = placement.leading((batch.tokens, batch.valid), "batch")
        prompt_logits, cache = _prompt_pass(params, prefix, *placed, config=config)
        for offset in range(0, len(rows), batch_size):
            scored = rows[offset:offset + batch_size]
            batch = right_pad([reply_ids[index][chunk[slot]] for _, index, slot in scored],
                              length=bucketed_length(scored[-1][0], reply_bucket),
                              rows=batch_size, pad_id=pad_id)
            owners = np.zeros(batch_size, np.int32)  # padding rows read the first prompt
            owners[:len(scored)] = [slot for _, _, slot in scored]
            placed, _ = placement.leading((owners, batch.tokens, batch.valid), "batch")
            nll = np.asarray(distributed.gather(_reply_nll_sums(
                params, cache, prompt_logits, *placed, config=config)))
            for (_, index, slot), value in zip(scored, nll):
                sums[index, chunk[slot]] = value
    results = []
    for index, replies in enumerate(reply_ids):
        n_scored = np.asarray([len(ids) for ids in replies])
        with np.errstate(invalid="ignore", divide="ignore"):
            results.append(np.where(n_scored > 0, sums[index] / np.maximum(n_scored, 1), np.nan))
    return results


def reply_nll(params: Params, chat: ChatFormat, requests: Sequence[str], replies: Sequence[str],
              *, config: ModelConfig, batch_size: int = 16, length_bucket: int = 32,
              placement: Placement | None = None) -> np.ndarray:
    """Mean NLL per reply token [N] (nats; NaN for an empty reply) of each reply given its
    request. A reply is cut to fit the model's context after its prompt."""
    return reply_nll_each(params, chat, requests, [replies], config=config,
                          batch_size=batch_size, length_bucket=length_bucket,
                          placement=placement)[0]
