"""Training only the upper layers: the frozen lower layers' output is computed once.

When an adapter starts at layer k (`LoraAdapter.first_layer`), layers 0..k-1 are frozen, so their
output (the block input `resid_pre[k]`) does not change during training. `prefix_hidden` computes
it once per example; the train step then runs only layers k.. (`forward` with `resid` the cached
states and `start_layer=k`). This is exact: the upper layers see the same positions and padding
mask as in the full forward pass.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.core import forward
from refusal_jax.models.params import Params


def slice_layers(params: Params, config: ModelConfig, start: int,
                 stop: int | None = None) -> tuple[Params, ModelConfig]:
    """The model made of layers[start:stop] (embedding and head unchanged) and its config."""
    layers = jax.tree_util.tree_map(lambda w: w[start:stop], params.layers)
    indices = range(config.n_layers)[start:stop]
    windows = tuple(config.sliding_windows[i] for i in indices) if config.sliding_windows else ()
    return (dataclasses.replace(params, layers=layers),
            dataclasses.replace(config, n_layers=len(indices), sliding_windows=windows))


@functools.partial(jax.jit, static_argnames=("config", "n_layers"))
def prefix_hidden(params: Params, tokens: jax.Array, valid: jax.Array, *, config: ModelConfig,
                  n_layers: int) -> jax.Array:
    """The block input of layer `n_layers` (= output of layer n_layers - 1): [B, T, D]."""
    B, T = tokens.shape
    lower, lower_config = slice_layers(params, config, 0, n_layers + 1)
    everywhere = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    out = forward(lower, tokens, valid, config=lower_config, capture_positions=everywhere,
                  logits="none")
    return out.captures[:, :, n_layers]
