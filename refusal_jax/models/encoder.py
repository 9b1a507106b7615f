"""A BERT sentence encoder (all-MiniLM-L6-v2 and its kin) as pure functions over a params pytree.

Sentence embeddings as sentence-transformers computes them for mean-pooling models: the encoder's
last hidden states, averaged over the valid tokens of each text, then L2-normalised. Batches are
right padded (BERT's absolute positions start at the first token): `tokens` [B, T] int32 and
`valid` [B, T] bool. Matrices multiply from the left (`x @ W`), i.e. transposed with respect to
PyTorch's `nn.Linear.weight`; layer weights are stacked on a leading layer axis and scanned.
Everything runs in float32. Loading: `refusal_jax.models.io.sentence_encoder`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Padded lengths are rounded up to a multiple of this, so that batches of similar length share
# one compiled program.
LENGTH_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Shapes of a BERT encoder (the fields of its HF config.json that the forward reads)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_positions: int
    layer_norm_eps: float

    @classmethod
    def from_hf_config(cls, hf: dict) -> "EncoderConfig":
        if hf.get("model_type") != "bert" or hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"expected a BERT config with hidden_act 'gelu', got model_type "
                             f"{hf.get('model_type')!r}, hidden_act {hf.get('hidden_act')!r}")
        return cls(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                   n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                   d_ff=hf["intermediate_size"], max_positions=hf["max_position_embeddings"],
                   layer_norm_eps=hf["layer_norm_eps"])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class EncoderLayerParams:
    """Weights of all encoder blocks, stacked on a leading layer axis (post-norm BERT blocks)."""

    q_proj: Any
    q_bias: Any
    k_proj: Any
    k_bias: Any
    v_proj: Any
    v_bias: Any
    o_proj: Any
    o_bias: Any
    attn_norm_scale: Any
    attn_norm_bias: Any
    up_proj: Any
    up_bias: Any
    down_proj: Any
    down_bias: Any
    mlp_norm_scale: Any
    mlp_norm_bias: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class EncoderParams:
    """All weights of a BERT encoder (the pooler is not used by sentence embeddings)."""

    word_embed: Any
    position_embed: Any
    token_type_embed: Any
    embed_norm_scale: Any
    embed_norm_bias: Any
    layers: EncoderLayerParams


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def _encoder_block(x: jax.Array, w: EncoderLayerParams, key_valid: jax.Array,
                   config: EncoderConfig) -> jax.Array:
    B, T, D = x.shape
    H = config.n_heads

    def heads(y):
        return y.reshape(B, T, H, D // H)

    q, k, v = (heads(x @ w_ + b_) for w_, b_ in
               ((w.q_proj, w.q_bias), (w.k_proj, w.k_bias), (w.v_proj, w.v_bias)))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // H)
    scores = jnp.where(key_valid[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    x = _layer_norm(x + attended.reshape(B, T, D) @ w.o_proj + w.o_bias,
                    w.attn_norm_scale, w.attn_norm_bias, config.layer_norm_eps)
    hidden = jax.nn.gelu(x @ w.up_proj + w.up_bias, approximate=False)
    return _layer_norm(x + hidden @ w.down_proj + w.down_bias,
                       w.mlp_norm_scale, w.mlp_norm_bias, config.layer_norm_eps)


def hidden_states(params: EncoderParams, tokens: jax.Array, valid: jax.Array, *,
                  config: EncoderConfig) -> jax.Array:
    """The last layer's hidden states [B, T, D] of right-padded `tokens` (token type 0)."""
    T = tokens.shape[1]
    if T > config.max_positions:
        raise ValueError(f"sequence length {T} exceeds the encoder's {config.max_positions} "
                         "positions; truncate the texts")
    x = (params.word_embed[tokens] + params.position_embed[:T][None]
         + params.token_type_embed[0])
    x = _layer_norm(x, params.embed_norm_scale, params.embed_norm_bias, config.layer_norm_eps)

    def step(x, w):
        return _encoder_block(x, w, valid, config), None

    x, _ = jax.lax.scan(step, x, params.layers)
    return x


@functools.partial(jax.jit, static_argnames="config")
def sentence_embeddings(params: EncoderParams, tokens: jax.Array, valid: jax.Array, *,
                        config: EncoderConfig) -> jax.Array:
    """Unit-norm sentence embeddings [B, D]: hidden states averaged over the valid tokens."""
    states = hidden_states(params, tokens, valid, config=config)
    weights = valid.astype(states.dtype)[..., None]
    pooled = (states * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


@dataclasses.dataclass(frozen=True)
class SentenceEncoder:
    """A loaded sentence encoder: config, params and a `tokenizers.Tokenizer` that truncates to
    `max_length` tokens and does not pad (`embed_texts` pads)."""

    config: EncoderConfig
    params: EncoderParams
    tokenizer: Any
    max_length: int


def pad_right(ids: Sequence[Sequence[int]], *, rows: int | None = None,
              bucket: int = LENGTH_BUCKET) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists as a right-padded (pad id 0) batch `tokens` [B, T], `valid` [B, T]: T is the
    longest list rounded up to a multiple of `bucket`, B is `rows` (default: one per list; extra
    rows are all padding)."""
    length = -(-max(len(row) for row in ids) // bucket) * bucket
    rows = len(ids) if rows is None else rows
    if rows < len(ids):
        raise ValueError(f"{len(ids)} token lists do not fit in {rows} rows")
    tokens = np.zeros((rows, length), np.int32)
    valid = np.zeros((rows, length), bool)
    for row, row_ids in enumerate(ids):
        tokens[row, :len(row_ids)] = row_ids
        valid[row, :len(row_ids)] = True
    return tokens, valid


def embed_texts(encoder: SentenceEncoder, texts: Sequence[str], *, batch_size: int = 64
                ) -> np.ndarray:
    """Unit-norm embeddings [N, D] (float32) of `texts`, in their order. They are encoded
    shortest first, `batch_size` at a time (the last batch padded to `batch_size` rows, so that
    every batch has one of few shapes), which keeps the padding within each batch small."""
    ids = [encoding.ids for encoding in encoder.tokenizer.encode_batch(list(texts))]
    order = np.argsort([len(row) for row in ids], kind="stable")
    embeddings = np.zeros((len(texts), encoder.config.d_model), np.float32)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        tokens, valid = pad_right([ids[i] for i in chunk], rows=batch_size)
        batch = sentence_embeddings(encoder.params, tokens, valid, config=encoder.config)
        embeddings[chunk] = np.asarray(batch[:len(chunk)])
    return embeddings
