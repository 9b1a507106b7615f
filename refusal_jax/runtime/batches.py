"""Fixed-size prompt batches placed on the devices (rows split over ``batch`` on a mesh)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from refusal_jax.models.loading import Model
from refusal_jax.runtime import distributed
from refusal_jax.runtime.placement import Placement
from refusal_jax.text.chat import Batch, pad_token_id


@dataclasses.dataclass(frozen=True)
class PlacedBatch:
    """A batch on the devices: rows split over ``batch`` on a mesh (global arrays)."""

    tokens: jax.Array  # [B, T] int32, left padded
    valid: jax.Array  # [B, T] bool
    eoi_positions: jax.Array  # [B, n_eoi] int32 column indices of the EOI tokens


def placed_batches(model: Model, instructions: Sequence[str], batch_size: int,
                   length_bucket: int, placement: Placement | None = None
                   ) -> Iterator[tuple[np.ndarray, PlacedBatch]]:
    """Yields (row indices into ``instructions``, batch of ``batch_size`` rows on the devices).

    Prompts are grouped by token length; the last batch repeats its final prompt to fill up.
    Each process encodes only the rows its devices hold (``placement.rows``), left padded to
    the longest bucket of the whole batch.

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
    lengths = [len(ids) for ids in model.tokenizer(
        model.chat.prompts(list(instructions)), add_special_tokens=False)["input_ids"]]
    too_long = [row for row, length in enumerate(lengths) if length > model.config.max_context]
    if too_long:
        row = too_long[0]
        raise ValueError(f"{len(too_long)} of {len(lengths)} prompts exceed the model's context "
                         f"of {model.config.max_context} tokens; the first is prompt {row} "
                         f"({lengths[row]} tokens: {instructions[row][:60]!r}); shorten or drop "
                         "it")
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        filled = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])
        local = model.chat.encode([instructions[i] for i in filled[own]],
                                  context_length=model.config.max_context,
                                  length_bucket=length_bucket)
        extra = distributed.agree_on_max(local.tokens.shape[1]) - local.tokens.shape[1]
        local = Batch(tokens=np.pad(local.tokens, ((0, 0), (extra, 0)), constant_values=pad_id),
                      valid=np.pad(local.valid, ((0, 0), (extra, 0))))
        arrays = placement.batch((local.tokens, local.valid, model.chat.eoi_positions(local)),
                                 batch_size)
        yield rows, PlacedBatch(*arrays)
