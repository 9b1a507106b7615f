"""Parameter pytrees, declared once with their shapes and logical axes.

Every weight is declared in `param_specs(config)` as a `ParamSpec(shape, logical_axes)`. Random
initialisation, checkpoint loading targets, `jax.eval_shape` and sharding rules are all derived
from that one abstract tree. Matrices are stored so that activations multiply from the left
(`x @ W`), i.e. transposed with respect to PyTorch's `nn.Linear.weight`. Layer weights are stacked
on a leading `layers` axis so that the forward pass can `lax.scan` over them.

Logical axis names: vocab, embed (d_model), q_heads (H * head_dim), kv_heads (K * head_dim),
mlp (d_ff), layers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from refusal_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape and logical axis names of one weight."""

    shape: tuple[int, ...]
    logical_axes: tuple[str, ...]
    is_norm: bool = False  # RMSNorm scale: initialised at its identity value


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerParams:
    """Weights of all decoder blocks, stacked on a leading `layers` axis."""

    attn_norm: Any
    q_proj: Any
    k_proj: Any
    v_proj: Any
    o_proj: Any
    mlp_norm: Any
    gate_proj: Any
    up_proj: Any
    down_proj: Any
    q_bias: Any = None
    k_bias: Any = None
    v_bias: Any = None
    post_attn_norm: Any = None
    post_mlp_norm: Any = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Params:
    """All weights of a decoder-only language model."""

    embed: Any
    layers: LayerParams
    final_norm: Any
    lm_head: Any = None  # None when tied to `embed`


def param_specs(config: ModelConfig) -> Params:
    """The abstract parameter tree of `config`: a `ParamSpec` at every leaf."""
    L, D, F, V = config.n_layers, config.d_model, config.d_ff, config.vocab_size
    q_width = config.n_heads * config.head_dim
    kv_width = config.n_kv_heads * config.head_dim

    def stacked(*shape_and_axes, is_norm=False):
        shape = tuple(s for s, _ in shape_and_axes)
        axes = tuple(a for _, a in shape_and_axes)
        return ParamSpec((L,) + shape, ("layers",) + axes, is_norm)

    norm = stacked((D, "embed"), is_norm=True)

    def optional(present, spec):
        return spec if present else None

    layers = LayerParams(
        attn_norm=norm,
        q_proj=stacked((D, "embed"), (q_width, "q_heads")),
        k_proj=stacked((D, "embed"), (kv_width, "kv_heads")),
        v_proj=stacked((D, "embed"), (kv_width, "kv_heads")),
        o_proj=stacked((q_width, "q_heads"), (D, "embed")),
        mlp_norm=norm,
        gate_proj=stacked((D, "embed"), (F, "mlp")),
        up_proj=stacked((D, "embed"), (F, "mlp")),
        down_proj=stacked((F, "mlp"), (D, "embed")),
        q_bias=optional(config.qkv_bias, stacked((q_width, "q_heads"))),
        k_bias=optional(config.qkv_bias, stacked((kv_width, "kv_heads"))),
        v_bias=optional(config.qkv_bias, stacked((kv_width, "kv_heads"))),
        post_attn_norm=optional(config.post_norms, norm),
        post_mlp_norm=optional(config.post_norms, norm),
    )
    return Params(
        embed=ParamSpec((V, D), ("vocab", "embed")),
        layers=layers,
        final_norm=ParamSpec((D,), ("embed",), is_norm=True),
        lm_head=None if config.tie_embeddings else ParamSpec((D, V), ("embed", "vocab")),
    )


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def map_specs(fn: Callable[[ParamSpec], Any], specs: Params) -> Params:
    """Maps `fn` over the `ParamSpec` leaves of an abstract tree."""
    return jax.tree_util.tree_map(fn, specs, is_leaf=is_spec)


def abstract_params(config: ModelConfig, dtype=jnp.float32) -> Params:
    """`jax.ShapeDtypeStruct` tree of the parameters (no memory allocated)."""
    return map_specs(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_specs(config))


@functools.partial(jax.jit, static_argnames=("config", "dtype", "scale"))
def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32,
                scale: float = 0.02) -> Params:
    """Random parameters (normal weights, norm weights near their identity value), one compile."""
    specs = param_specs(config)
    leaves, treedef = jax.tree_util.tree_flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))

    def init(spec: ParamSpec, k: jax.Array) -> jax.Array:
        noise = jax.random.normal(k, spec.shape, jnp.float32)
        if spec.is_norm:  # identity scaling (1, or 0 with Gemma's (1 + w)) plus noise
            return (1.0 - config.norm_weight_offset + 0.1 * noise).astype(dtype)
        return (scale * noise).astype(dtype)

    return jax.tree_util.tree_unflatten(treedef, [init(s, k) for s, k in zip(leaves, keys)])
