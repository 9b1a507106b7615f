"""Fluency of a reply: its mean token negative log-likelihood under a model, given the request.

Each row is the request's chat prompt (`ChatFormat.prompts`) followed by the reply's tokens
(tokenized alone, without special tokens), as in `cross_entropy.instruction_corpus`; the NLL is
averaged over the reply's tokens, in nats. Scored under the unsteered model, it is high for text
that model would not write: gibberish, broken words, abrupt switches of language. An empty reply
has no tokens to score and gets NaN. The chat template's opening tokens, shared by every prompt,
are prefilled once per batch (`models.batching.forward_after_prefix`); the rest of each row is
sorted by length and batched as in `cross_entropy` (left padded to `length_bucket`, the last
batch with empty rows).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.models.batching import forward_after_prefix, shared_prefix_length
from refusal_jax.models.config import ModelConfig
from refusal_jax.models.params import Params
from refusal_jax.runtime import distributed
from refusal_jax.runtime.placement import Placement
from refusal_jax.text.chat import ChatFormat, left_pad, pad_token_id


@functools.partial(jax.jit, static_argnames="config")
def _row_nll_sums(params: Params, prefix: jax.Array, tokens: jax.Array, valid: jax.Array,
                  targets: jax.Array, *, config: ModelConfig) -> jax.Array:
    """Per row of ``prefix`` [P] + ``tokens`` [B, T], the sum of -log p(token) over its target
    tokens [B] (float32; targets index into T and exclude its first column)."""
    logits = forward_after_prefix(params, prefix, tokens, valid, config=config,
                                  logits="all").logits[:, :-1]
    target_logit = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    return jnp.sum(jnp.where(targets[:, 1:], nll, 0.0), axis=-1)


def reply_nll(params: Params, chat: ChatFormat, requests: Sequence[str], replies: Sequence[str],
              *, config: ModelConfig, batch_size: int = 16, length_bucket: int = 32,
              placement: Placement | None = None) -> np.ndarray:
    """Mean NLL per reply token [N] (nats; NaN for an empty reply) of each reply given its
    request. Rows longer than the model's context keep their first `config.max_context` tokens."""
    if len(requests) != len(replies):
        raise ValueError(f"{len(requests)} requests but {len(replies)} replies; pass one reply "
                         "per request")
    tokenizer = chat.tokenizer
    prompt_ids = tokenizer(chat.prompts(requests), add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(list(replies), add_special_tokens=False)["input_ids"]
    rows = [(list(p) + list(r))[:config.max_context] for p, r in zip(prompt_ids, reply_ids)]
    n_scored = np.asarray([len(row) - len(p) for row, p in zip(rows, prompt_ids)])
    # Every row keeps its last prompt token, which predicts the reply's first.
    n_prefix = shared_prefix_length(prompt_ids, keep_last=1)
    prefix = np.asarray(rows[0][:n_prefix], np.int32)
    rows = [row[n_prefix:] for row in rows]
    placement = placement or Placement()
    # Every batch has `batch_size` rows (the last padded), whatever the number of replies, so
    # the variants of a study share one compiled program per length bucket.
    batch_size = placement.round_up(batch_size, "batch")
    sums = np.zeros(len(rows), np.float64)
    order = np.argsort([len(row) for row in rows], kind="stable")
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        longest = max(len(rows[i]) for i in chunk)
        length = min(-(-longest // length_bucket) * length_bucket, config.max_context - n_prefix)
        batch = left_pad([rows[i] for i in chunk], length=length, rows=batch_size,
                         pad_id=pad_token_id(tokenizer))
        targets = np.zeros_like(batch.valid)
        for row, i in enumerate(chunk):
            if n_scored[i]:
                targets[row, -n_scored[i]:] = True
        placed, _ = placement.leading((batch.tokens, batch.valid, targets), "batch")
        sums[chunk] = np.asarray(distributed.gather(
            _row_nll_sums(params, prefix, *placed, config=config)))[:len(chunk)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_scored > 0, sums / np.maximum(n_scored, 1), np.nan)
