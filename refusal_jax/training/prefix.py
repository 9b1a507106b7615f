"""Training only the upper layers: the frozen lower layers' output is computed once and injected.

When an adapter starts at layer k (`LoraAdapter.first_layer`), layers 0..k-1 are frozen, so their
output (the block input `resid_pre[k]`) does not change during training. `prefix_hidden` computes
it once per example; the train step then runs only layers k.. (`upper_layers`) with
`InjectResidual` replacing the first scanned block's input by the cached states. This is exact:
the upper forward pass sees the same positions and padding mask as the full one.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.core import forward
from refusal_jax.models.params import Params
from refusal_jax.models.sites import SiteContext


def slice_layers(params: Params, config: ModelConfig, start: int,
                 stop: int | None = None) -> tuple[Params, ModelConfig]:
    """The model made of layers[start:stop] (embedding and head unchanged) and its config."""
    layers = jax.tree_util.tree_map(lambda w: w[start:stop], params.layers)
    indices = range(config.n_layers)[start:stop]
    windows = tuple(config.sliding_windows[i] for i in indices) if config.sliding_windows else ()
    return (dataclasses.replace(params, layers=layers),
            dataclasses.replace(config, n_layers=len(indices), sliding_windows=windows))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class InjectResidual:
    """Replaces the input of the first scanned block by given hidden states.

    first: [L] float, 1 at the block whose input is replaced; hidden: [L, B, T, D] (the same
    states broadcast over layers, as the scan slices every leaf per layer).
    """

    first: jax.Array
    hidden: jax.Array

    @classmethod
    def at_first_layer(cls, hidden: jax.Array, n_layers: int) -> "InjectResidual":
        first = jnp.zeros((n_layers,), hidden.dtype).at[0].set(1)
        return cls(first=first, hidden=jnp.broadcast_to(hidden, (n_layers,) + hidden.shape))

    def apply(self, site: str, x: jax.Array, ctx: SiteContext) -> jax.Array:
        if site != "resid_pre":
            return x
        return jnp.where(self.first > 0, self.hidden.astype(x.dtype), x)


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
