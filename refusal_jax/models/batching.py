"""Prompt batches that share the chat template's opening tokens: the shared prefix is split off
once, and each prompt's remaining tokens are left padded to a length bucket."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from refusal_jax.models.loading import Model
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
