"""Activations of a list of prompts at their post-instruction tokens.

Conventions: "layer l" is the input of block l (``resid_pre[l]``: the embedding for l = 0, the
stream after l blocks otherwise; ``resid_post[l]`` is layer l + 1). "Position p" counts the
post-instruction (EOI) tokens from the end: -1 is the last token before the reply, -n_eoi the
first template token after the user's text (``model.chat.eoi_token_ids``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.models.core import forward
from refusal_jax.models.loading import Model
from refusal_jax.runtime.batches import placed_batches
from refusal_jax.runtime.progress import progress


@functools.partial(jax.jit, static_argnames=("config",))
def _captures(params, tokens, valid, columns, layers, intervention, *, config):
    out = forward(params, tokens, valid, config=config, intervention=intervention,
                  capture_positions=columns, logits="none")
    return jnp.take(out.captures, layers, axis=2).astype(jnp.float32)


def capture(model: Model, prompts: Sequence[str], *, positions: Sequence[int] | None = None,
            layers: Sequence[int] | None = None, intervention: Any = None,
            batch_size: int = 16, length_bucket: int = 32) -> np.ndarray:
    """Block inputs of ``prompts`` (instructions, chat-formatted here): [n, P, L, D] float32.

    positions: negative EOI offsets (see the module docstring), in the order wanted; default
      every EOI token, -n_eoi .. -1, so ``[:, -1]`` is position -1.
    layers: the blocks whose input is captured, in the order wanted; default all, so
      ``[:, :, l]`` is layer l.
    intervention: optional, active during the forward (captures then show its effect).
    batch_size, length_bucket: prompts run in batches of ``batch_size`` grouped by length,
      padded to multiples of ``length_bucket`` tokens; each shape compiles once.
    """
    n_eoi, n_layers = model.chat.n_eoi, model.config.n_layers
    positions = list(range(-n_eoi, 0)) if positions is None else [int(p) for p in positions]
    layers = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
    if not positions or any(not -n_eoi <= p < 0 for p in positions):
        raise ValueError(f"positions must be EOI offsets in [-{n_eoi}, -1] (this chat template "
                         f"has {n_eoi} post-instruction tokens), got {positions}")
    if not layers or any(not 0 <= layer < n_layers for layer in layers):
        raise ValueError(f"layers must lie in [0, {n_layers}), got {layers}")
    offsets = np.asarray(positions) + n_eoi
    layer_index = jnp.asarray(layers, jnp.int32)
    cfg = model.config
    out = np.zeros((len(prompts), len(positions), len(layers), cfg.d_model), np.float32)
    batches = placed_batches(model, prompts, batch_size, length_bucket)
    total = -(-len(prompts) // batch_size)
    for rows, batch in progress(batches, total, f"capture ({len(prompts)} prompts)"):
        columns = jnp.asarray(np.asarray(batch.eoi_positions)[:, offsets], jnp.int32)
        captured = _captures(model.params, batch.tokens, batch.valid, columns, layer_index,
                             intervention, config=cfg)
        out[rows] = np.asarray(captured)[:len(rows)]
    return out
