"""Fixed-size prompt batches placed on the devices (rows split over ``batch`` on a mesh)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from refusal_jax.models.batching import shared_prefix_length
from refusal_jax.models.loading import Model
from refusal_jax.runtime import distributed
from refusal_jax.runtime.placement import Placement
from refusal_jax.text.chat import Batch, bucketed_length, left_pad, pad_token_id


@dataclasses.dataclass(frozen=True)
class PlacedBatch:
    """A batch on the devices: rows split over ``batch`` on a mesh (global arrays)."""

    tokens: jax.Array  # [B, T] int32, left padded
    valid: jax.Array  # [B, T] bool
    eoi_positions: jax.Array  # [B, n_eoi] int32 column indices of the EOI tokens
    prefix: np.ndarray  # [P] int32 tokens every row starts with, before its own (P may be 0)


def placed_batches(model: Model, instructions: Sequence[str], batch_size: int,
                   length_bucket: int, placement: Placement | None = None, *,
                   split_prefix: bool = False) -> Iterator[tuple[np.ndarray, PlacedBatch]]:
    """Yields (row indices into ``instructions``, batch of ``batch_size`` rows on the devices).

    Prompts are grouped by token length; the last batch repeats its final prompt to fill up.
    Each process encodes only the rows its devices hold (``placement.rows``), left padded to
    the longest bucket of the whole batch. With ``split_prefix``, the tokens every prompt of
    ``instructions`` starts with (the chat template's opening) are the batch's ``prefix``, and
    its rows hold the rest (each keeps at least its EOI tokens); otherwise the prefix is empty.

    Raises ValueError when ``batch_size`` does not split evenly over the batch's devices, and
    naming the first prompt (its index in ``instructions`` and length) longer than the model's
    context.
    """
    placement = placement or Placement()
    if batch_size % placement.multiple("batch"):
        raise ValueError(f"a batch of {batch_size} rows cannot be split over the "
                         f"{placement.multiple('batch')} devices of the mesh's batch axes; use a "
                         "batch size that is a multiple of it")
    own = placement.rows(batch_size)
    pad_id = pad_token_id(model.tokenizer)
    token_lists = model.tokenizer(model.chat.prompts(list(instructions)),
                                  add_special_tokens=False)["input_ids"]
    lengths = [len(ids) for ids in token_lists]
    too_long = [row for row, length in enumerate(lengths) if length > model.config.max_context]
    if too_long:
        row = too_long[0]
        raise ValueError(f"{len(too_long)} of {len(lengths)} prompts exceed the model's context "
                         f"of {model.config.max_context} tokens; the first is prompt {row} "
                         f"({lengths[row]} tokens: {instructions[row][:60]!r}); shorten or drop "
                         "it")
    n_prefix = (shared_prefix_length(token_lists, keep_last=model.chat.n_eoi)
                if split_prefix and token_lists else 0)
    prefix = np.asarray(token_lists[0][:n_prefix] if n_prefix else [], np.int32)
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        filled = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])
        local = model.chat.encode([instructions[i] for i in filled[own]],
                                  context_length=model.config.max_context,
                                  length_bucket=length_bucket)
        if n_prefix:
            rests = [ids[mask][n_prefix:] for ids, mask in zip(local.tokens, local.valid)]
            length = min(bucketed_length(max(map(len, rests)), length_bucket),
                         model.config.max_context - n_prefix)
            local = left_pad(rests, length=length, pad_id=pad_id)
        extra = distributed.agree_on_max(local.tokens.shape[1]) - local.tokens.shape[1]
        local = Batch(tokens=np.pad(local.tokens, ((0, 0), (extra, 0)), constant_values=pad_id),
                      valid=np.pad(local.valid, ((0, 0), (extra, 0))))
        arrays = placement.batch((local.tokens, local.valid, model.chat.eoi_positions(local)),
                                 batch_size)
        yield rows, PlacedBatch(*arrays, prefix=prefix)
