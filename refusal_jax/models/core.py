"""The shared decoder forward pass: a pure function of (params, tokens, intervention).

Conventions fixed here once:
- Batches are left padded: `tokens` [B, T] int32 with `valid` [B, T] bool (False at padding).
  Each row's positions are `cumsum(valid) - 1` (continuing from the KV cache when one is given);
  padding has position -1 and is never attended to.
- Layers are stacked and scanned (`lax.scan`), so compile time does not grow with depth. Per-layer
  differences (Gemma2's alternating sliding windows) are arrays scanned with the weights.
- The forward may start at any layer: given `resid` (the block input of layer `start_layer`)
  in place of the tokens, the layers below `start_layer` are skipped. It may also stop before
  layer `stop_layer` and return the stream there (`hidden`, the block input of `stop_layer`), so
  a stream shared by several interventions is computed once up to the first layer any of them
  acts at. A traced `start_layer` or `stop_layer` loops over the layers (`fori_loop`, the layer
  weights indexed dynamically), so one compiled program serves every split; Python ints scan
  the layers between them (differentiable).
- Interventions (see `refusal_jax.interventions`) are pytrees whose leaves have a leading layer
  axis; they are scanned with the weights and called at the sites `resid_pre` (block input),
  `attn_out`, `mlp_out` and `resid_post` of every layer. Their values are traced arrays, so
  changing them never recompiles, and `jax.vmap` over them evaluates many at once.
- With a KV cache, each layer attends to its cached keys and values where they lie plus the new
  tokens' own, and the new keys and values of all layers are written into the cache once, after
  the last layer: a decode step copies no per-layer cache slices. A cache may also be only read
  (`extend_cache=False`): its tokens then precede each row's own in one set of keys, and one
  row of it may serve every row of the batch (a prompt start common to all rows).
- Captures are the block inputs (`resid_pre`, after any intervention at that site) of every
  layer at the requested token indices: [B, P, L, D] (zero below `start_layer`).
- Norms, attention softmax and logits are computed in float32; matmuls run in the params' dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.params import LayerParams, Params
from refusal_jax.models.sites import SiteContext

_MASKED = -1e30  # finite, so fully padded query rows stay NaN-free


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Rotated keys and values of every layer, filled left to right.

    keys, values: [L, B, K, S, head_dim] (heads before slots, so a decode step's attention
    reads each head's keys as one contiguous matrix); positions: [B, S] position of each
    slot's token (-1 for empty slots and padding); next_position: [B] position of the next
    token of each row; length: number of filled slots (the same for every row, since batches
    are left padded).
    """

    keys: jax.Array
    values: jax.Array
    positions: jax.Array
    next_position: jax.Array
    length: jax.Array

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
        return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   positions=jnp.full((batch, max_len), -1, jnp.int32),
                   next_position=jnp.zeros((batch,), jnp.int32),
                   length=jnp.zeros((), jnp.int32))

    def repeat_rows(self, rows: int) -> "KVCache":
        """This one-row cache repeated for ``rows`` rows (broadcast, not copied)."""
        if self.keys.shape[1] != 1:
            raise ValueError(f"repeat_rows needs a one-row cache, not {self.keys.shape[1]} rows")
        def spread(leaf, axis):
            return jnp.broadcast_to(leaf, leaf.shape[:axis] + (rows,) + leaf.shape[axis + 1:])

        return KVCache(keys=spread(self.keys, 1), values=spread(self.values, 1),
                       positions=spread(self.positions, 0),
                       next_position=spread(self.next_position, 0), length=self.length)

    def take_rows(self, rows: jax.Array) -> "KVCache":
        """The cache of the rows ``rows`` [R] (indices, repeats allowed) of this one."""
        return KVCache(keys=jnp.take(self.keys, rows, axis=1),
                       values=jnp.take(self.values, rows, axis=1),
                       positions=jnp.take(self.positions, rows, axis=0),
                       next_position=jnp.take(self.next_position, rows, axis=0),
                       length=self.length)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ForwardOutput:
    logits: jax.Array | None  # [B, T, V] float32, or [B, V] with logits="last"
    captures: jax.Array | None  # [B, P, L, D] resid_pre at capture_positions
    cache: KVCache | None
    hidden: jax.Array | None = None  # [B, T, D] block input of stop_layer, when one is given


def rms_norm(x: jax.Array, weight: jax.Array, config: ModelConfig) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + config.norm_eps)
    if config.norm_weight_offset:  # Gemma: scale by (1 + w) in float32, then cast
        return (normed * (config.norm_weight_offset + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * normed.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding, HF's rotate-half layout. x: [B, T, N, head_dim]; positions: [B, T]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, head_dim / 2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _one_query_kernels(n_queries: int) -> bool:
    """Whether attention with ``n_queries`` per row takes the decode step's CPU kernels: on the
    CPU, XLA runs a product of each key head's G-query matrix with its keys (a batch of tiny
    matrix products) several times slower than G matrix-vector products, and the weighted sum
    of the values as elementwise products summed over the slots. Elsewhere the grouped products
    read each key and value once."""
    return n_queries == 1 and jax.default_backend() == "cpu"


def _dot_scores(q, k, k_layout: str) -> jax.Array:
    """q . k [B, K, G, T, S] in float32 (q, k and `k_layout` as in `_masked_scores`)."""
    if _one_query_kernels(q.shape[1]):
        heads = [jnp.einsum(f"bkd,{k_layout}->bks", q[:, 0, :, g], k,
                            preferred_element_type=jnp.float32) for g in range(q.shape[3])]
        return jnp.stack(heads, axis=2)[:, :, :, None]
    return jnp.einsum(f"btkgd,{k_layout}->bkgts", q, k, preferred_element_type=jnp.float32)


def _masked_scores(q, k, q_positions, k_positions, window, config: ModelConfig,
                   k_layout: str = "bskd") -> jax.Array:
    """[B, K, G, T, S] float32 attention logits, `_MASKED` where a key may not be attended.

    q: [B, T, K, G, Dh]; k: [B, S, K, Dh] (`k_layout` "bksd": [B, K, S, Dh]); a key is attended
    when it is filled (position >= 0), not after the query and, with a window (0 = global),
    less than `window` positions back.
    """
    scores = _dot_scores(q, k, k_layout) * config.attention_scale
    if config.attn_softcap is not None:
        scores = jnp.tanh(scores / config.attn_softcap) * config.attn_softcap
    qp, kp = q_positions[:, :, None], k_positions[:, None, :]  # [B, T, 1], [B, 1, S]
    allowed = (kp >= 0) & (kp <= qp) & ((window == 0) | (qp - kp < window))
    return jnp.where(allowed[:, None, None], scores, _MASKED)


def attention(q, k, v, q_positions, k_positions, window, config: ModelConfig, *,
              past: tuple[jax.Array, jax.Array, jax.Array] | None = None) -> jax.Array:
    """Grouped-query attention over keys selected by position (causal, valid, in window).

    q: [B, T, H, Dh]; k, v: [B, S, K, Dh]; q_positions [B, T], k_positions [B, S] (-1 = empty);
    window: scalar int, 0 for global attention. `past`, when given, is (keys, values
    [B, K, S', Dh], their positions [B, S']) of earlier tokens, attended as well, in one softmax
    with `k`: they are read where they lie (a KV cache is not rewritten to add the new keys).
    Returns [B, T, H * Dh].
    """
    B, T, H, Dh = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, H // K, Dh)
    scores = _masked_scores(q, k, q_positions, k_positions, window, config)
    if past is not None:
        past_k, past_v, past_positions = past
        past_scores = _masked_scores(q, past_k, q_positions, past_positions, window, config,
                                     k_layout="bksd")
        scores = jnp.concatenate([past_scores, scores], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if past is None:
        out = _weighted_values(probs, v, "bskd")
    else:
        n_past = past_k.shape[2]
        out = (_weighted_values(probs[..., :n_past], past_v, "bksd")
               + _weighted_values(probs[..., n_past:], v, "bskd"))
    return out.reshape(B, T, H * Dh)


def _weighted_values(probs: jax.Array, v: jax.Array, v_layout: str) -> jax.Array:
    """probs [B, K, G, T, S] times v (`v_layout` "bskd": [B, S, K, Dh]; "bksd": [B, K, S, Dh]):
    [B, T, K, G, Dh]."""
    if _one_query_kernels(probs.shape[3]):
        v = v if v_layout == "bksd" else jnp.swapaxes(v, 1, 2)
        return jnp.sum(probs[:, :, :, 0, :, None] * v[:, :, None], axis=3)[:, None]
    return jnp.einsum(f"bkgts,{v_layout}->btkgd", probs, v)


def _activation(x: jax.Array, config: ModelConfig) -> jax.Array:
    if config.activation == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.silu(x)


def _project(x, weight, bias=None):
    y = x @ weight
    return y if bias is None else y + bias


def _apply(intervention, site: str, x: jax.Array, ctx: SiteContext) -> jax.Array:
    return x if intervention is None else intervention.apply(site, x, ctx)


def _block(x: jax.Array, w: LayerParams, intervention: Any, ctx: SiteContext, attend,
           config: ModelConfig):
    """A pre-norm decoder block whose attention is `attend(q, k, v) -> (out [B, T, H * Dh],
    *extras)` (q, k, v rotated). Returns (resid_post, resid_pre, *extras)."""
    x = _apply(intervention, "resid_pre", x, ctx)
    resid_pre = x
    B, T, _ = x.shape
    inv_freq = jnp.asarray(config.rope_inverse_frequencies())
    h = rms_norm(x, w.attn_norm, config)
    q = _project(h, w.q_proj, w.q_bias).reshape(B, T, config.n_heads, config.head_dim)
    k = _project(h, w.k_proj, w.k_bias).reshape(B, T, config.n_kv_heads, config.head_dim)
    v = _project(h, w.v_proj, w.v_bias).reshape(B, T, config.n_kv_heads, config.head_dim)
    q = apply_rope(q, ctx.positions, inv_freq)
    k = apply_rope(k, ctx.positions, inv_freq)
    attn, *extras = attend(q, k, v)
    attn = attn @ w.o_proj
    if config.post_norms:
        attn = rms_norm(attn, w.post_attn_norm, config)
    attn = _apply(intervention, "attn_out", attn, ctx)
    x = x + attn
    h = rms_norm(x, w.mlp_norm, config)
    mlp = (_activation(h @ w.gate_proj, config) * (h @ w.up_proj)) @ w.down_proj
    if config.post_norms:
        mlp = rms_norm(mlp, w.post_mlp_norm, config)
    mlp = _apply(intervention, "mlp_out", mlp, ctx)
    x = _apply(intervention, "resid_post", x + mlp, ctx)
    return (x, resid_pre, *extras)


def embed_tokens(params: Params, tokens: jax.Array, config: ModelConfig) -> jax.Array:
    x = params.embed[tokens]
    if config.scale_embeddings:  # Gemma; HF rounds the scale to the activation dtype
        x = x * jnp.asarray(config.d_model**0.5, dtype=x.dtype)
    return x


def unembed(params: Params, x: jax.Array, config: ModelConfig) -> jax.Array:
    """Final norm and LM head; float32 logits."""
    x = rms_norm(x, params.final_norm, config)
    head = params.embed.T if params.lm_head is None else params.lm_head
    logits = jnp.matmul(x, head, preferred_element_type=jnp.float32)
    if config.final_softcap is not None:
        logits = jnp.tanh(logits / config.final_softcap) * config.final_softcap
    return logits


def _run_layers(layer, x: jax.Array, xs, start_layer: int | jax.Array,
                stop_layer: int | jax.Array, n_layers: int):
    """Runs ``layer(x, xs_l) -> (x, ys_l)`` on layers ``start_layer..stop_layer - 1`` (``xs``:
    leaves with a leading layer axis). Returns (x, ys stacked on a leading axis of
    ``n_layers``, zero outside the layers run).

    Python int bounds scan the layers' slices (reverse-differentiable); a traced one loops
    over them, indexing every layer's leaves (one program for every start and stop layer).
    """
    if isinstance(start_layer, int) and isinstance(stop_layer, int):
        if (start_layer, stop_layer) == (0, n_layers):
            return jax.lax.scan(layer, x, xs)
        x, ys = jax.lax.scan(layer, x,
                             jax.tree.map(lambda leaf: leaf[start_layer:stop_layer], xs))
        outside = [(start_layer, n_layers - stop_layer)]
        return x, jax.tree.map(lambda y: jnp.pad(y, outside + [(0, 0)] * (y.ndim - 1)), ys)

    def at(index):
        return jax.tree.map(
            lambda leaf: jax.lax.dynamic_index_in_dim(leaf, index, keepdims=False), xs)

    ys_shape = jax.eval_shape(lambda: layer(x, at(0))[1])
    ys = jax.tree.map(lambda y: jnp.zeros((n_layers,) + y.shape, y.dtype), ys_shape)

    def step(index, carry):
        x, ys = carry
        x, y = layer(x, at(index))
        return x, jax.tree.map(
            lambda stack, value: jax.lax.dynamic_update_index_in_dim(stack, value, index, 0),
            ys, y)

    return jax.lax.fori_loop(start_layer, stop_layer, step, (x, ys))


def forward(params: Params, tokens: jax.Array | None, valid: jax.Array, *, config: ModelConfig,
            intervention: Any = None, capture_positions: jax.Array | None = None,
            cache: KVCache | None = None,
            extend_cache: bool = True, logits: Literal["all", "last", "none"] = "all",
            resid: jax.Array | None = None, start_layer: int | jax.Array = 0,
            stop_layer: int | jax.Array | None = None) -> ForwardOutput:
    """Runs the decoder on a left-padded batch.

    Args:
      tokens, valid: [B, T] token ids and non-padding mask (see module docstring); `tokens` is
        None when `resid` is given.
      intervention: None, or an intervention pytree with a leading layer axis on every leaf.
      capture_positions: optional [B, P] token indices whose block inputs are returned.
      cache: optional KV cache; the new tokens are written after its `length` filled slots
        (the caller keeps `length + T` within the cache: jit cannot check traced lengths).
      extend_cache: False reads the cache without adding the new tokens (none is returned);
        the cache may then have one row, shared by every row of the batch.
      logits: "all" positions, only the "last" one (what generation needs), or "none".
      resid: optional [B, T, D] block input of layer `start_layer`, in place of the tokens'
        embedding (interventions at the layers below it do not apply).
      start_layer: the first layer run (int, or a traced scalar); the default 0 runs them all.
        A cache extended from a start layer holds zero keys and values below it: read it only
        from that layer up.
      stop_layer: None runs the layers up to the last; a layer index (int, or a traced scalar)
        stops before it and returns its block input as `hidden` (no logits: pass
        logits="none"). A cache extended then holds zero keys and values from it up, so the
        caches of a run to `stop_layer` and of one from it add up to the whole forward's.
    """
    if (tokens is None) == (resid is None):
        raise ValueError("forward needs exactly one of tokens and resid")
    if stop_layer is not None and logits != "none":
        raise ValueError(f'a forward that stops at a layer has no logits; pass logits="none", '
                         f'not {logits!r}')
    B, T = valid.shape
    extend = cache is not None and extend_cache
    if cache is None and T > config.max_context:
        raise ValueError(f"sequence of {T} tokens exceeds the model's context of "
                         f"{config.max_context}; shorten the prompts or raise max_context")
    if intervention is not None:
        check_fits = getattr(intervention, "check_fits", None)
        if check_fits is not None:  # the built-in kinds say what does not fit this model
            check_fits(config.n_layers, config.d_model)
    if extend and T > cache.keys.shape[3]:
        raise ValueError(f"{T} new tokens do not fit a KV cache of {cache.keys.shape[3]} slots; "
                         "allocate KVCache.empty with max_len >= prompt + generated tokens")
    if extend and cache.keys.shape[1] != B:
        raise ValueError(f"a KV cache of {cache.keys.shape[1]} rows cannot be extended by {B} "
                         "rows; share a one-row cache with extend_cache=False")
    valid = valid.astype(bool)
    start = jnp.zeros((B,), jnp.int32) if cache is None else cache.next_position
    positions = jnp.where(valid, start[:, None] + jnp.cumsum(valid, axis=1) - 1, -1)
    ctx = SiteContext(positions=positions.astype(jnp.int32), valid=valid)
    windows = jnp.asarray(config.layer_windows())

    def layer(x, xs):
        w, window, iv, *past_kv = xs

        def attend(q, k, v):
            if cache is None:
                return (attention(q, k, v, ctx.positions, ctx.positions, window, config),)
            k, v = k.astype(cache.keys.dtype), v.astype(cache.values.dtype)
            if not extend:  # the cached tokens precede each row's own: one set of keys
                def before(past, new):  # [1 or B, S, ...] and [B, T, ...]: [B, S + T, ...]
                    past = jnp.broadcast_to(past, (B,) + past.shape[1:])
                    return jnp.concatenate([past, new], axis=1)

                past_k, past_v = (jnp.swapaxes(kv, 1, 2) for kv in past_kv)  # [., S, K, Dh]
                return (attention(q, before(past_k, k), before(past_v, v), ctx.positions,
                                  before(cache.positions, ctx.positions), window, config),)
            past = (*past_kv, cache.positions)
            out = attention(q, k, v, ctx.positions, ctx.positions, window, config, past=past)
            return out, k, v

        x, resid_pre, *new_kv = _block(x, w, iv, ctx, attend, config)
        captured = None
        if capture_positions is not None:
            captured = jnp.take_along_axis(resid_pre, capture_positions[:, :, None], axis=1)
        return x, (captured, *new_kv)

    # A layer's cached keys and values are read in place; the new tokens' ([L, B, T, K, Dh],
    # then [L, B, K, T, Dh]) are written into the cache once, after the last layer.
    past_kv = () if cache is None else (cache.keys, cache.values)
    x = embed_tokens(params, tokens, config) if resid is None else resid
    x, (captures, *new_kv) = _run_layers(
        layer, x, (params.layers, windows, intervention, *past_kv), start_layer,
        config.n_layers if stop_layer is None else stop_layer, config.n_layers)
    if captures is not None:
        captures = jnp.moveaxis(captures, 0, 2)  # [L, B, P, D] -> [B, P, L, D]
    new_cache = None
    if extend:
        at = (0, 0, 0, cache.length, 0)
        new_cache = KVCache(
            keys=jax.lax.dynamic_update_slice(cache.keys, jnp.swapaxes(new_kv[0], 2, 3), at),
            values=jax.lax.dynamic_update_slice(cache.values, jnp.swapaxes(new_kv[1], 2, 3), at),
            positions=jax.lax.dynamic_update_slice(cache.positions, ctx.positions,
                                                   (0, cache.length)),
            next_position=start + jnp.sum(valid, axis=1, dtype=jnp.int32),
            length=cache.length + T)
    out_logits = None
    if logits == "all":
        out_logits = unembed(params, x, config)
    elif logits == "last":
        out_logits = unembed(params, x[:, -1], config)
    return ForwardOutput(logits=out_logits, captures=captures, cache=new_cache,
                         hidden=None if stop_layer is None else x)
