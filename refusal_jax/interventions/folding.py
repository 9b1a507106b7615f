"""Bake interventions into the weights, so an edited model runs (and exports) without hooks.

The residual stream is a sum of what its writers write: the token embedding (block 0's input),
and in every block the attention output (``... @ o_proj``) and the MLP output
(``... @ down_proj``). With row vectors, a writer ``W`` [n, D] writes ``h @ W``, so projecting
what it writes is ``h @ (W P)`` with ``W P = W - (W V^T) V`` (the rows of ``W`` projected).
No supported family has an o_proj or down_proj bias (Qwen2's biases are on q/k/v, which read
the stream), so these matrices are the whole of what writes.

When folding is exact (``fold_projection``, the rule of ``DirectionalAblation`` and
``NullspaceProjection``). A projection hooked at a write site (``attn_out[l]``, ``mlp_out[l]``)
is exactly the projected writer. A projection hooked at a
stream site (``resid_pre[l]``, ``resid_post[l]``) acts on the sum of everything written so far;
a weight edit cannot express it, because the earlier blocks read that sum unprojected. It is
exact only when it is redundant: when the embedding and every write before the site are already
projected out of the same subspace, so the stream there holds nothing to remove. Hence the rule
checked here: every active stream site needs the embedding (``resid_pre[0]``) and every
``attn_out``/``mlp_out`` before it active with the same basis. Arditi et al.'s global ablation
(all layers; ``resid_pre``, ``attn_out``, ``mlp_out``) satisfies it; so does an ablation of
write sites alone at any layers. A local ablation (stream sites of one layer ``l > 0``) does not,
and is refused. For Gemma2 projections are refused altogether: its ``attn_out``/``mlp_out``
pass through an RMSNorm after o_proj/down_proj whose per-channel scale puts the direction back.

Tied embeddings: the embedding is also the LM head, which reads ``final_norm(x)`` -- a vector
the hooked model does not project. So folding the embedding unties them: the returned params
keep the original embedding as ``lm_head`` and the returned config has ``tie_embeddings=False``
(``export.export_hf_checkpoint`` writes a separate ``lm_head.weight`` and
``tie_word_embeddings: false``).

Activation addition (``fold_activation_addition``, the rule of ``ActivationAddition``) adds a
constant vector at every position, which needs a bias on a residual writer; none of the
supported families has one. The one exact
route without a bias: ActAdd at ``resid_pre`` of layer 0 only (every position) is an edit of the
embedding rows, ``e + coeff * direction / s`` (``s = sqrt(D)`` where the family scales
embeddings). ActAdd at ``resid_pre[l]`` for ``l > 0`` would equal a ``down_proj`` bias of layer
``l - 1`` (HF Llama's ``mlp_bias``), which ``Params`` does not carry.

A kind declares its rule as a ``fold`` method (``registry``); :func:`fold` applies it. Folding
reads the intervention's values (it is a one-off edit, not meant to run under jit). Matrices
are edited in float32 (HIGHEST precision) one layer at a time and cast back to their dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.interventions.per_layer import UNBOUNDED_POSITION
from refusal_jax.interventions.vector_ops import project_out
from refusal_jax.models.config import ModelConfig
from refusal_jax.models.params import Params
from refusal_jax.models.sites import SITE_INDEX

_RESID_PRE, _ATTN_OUT, _MLP_OUT, _RESID_POST = (
    SITE_INDEX[site] for site in ("resid_pre", "attn_out", "mlp_out", "resid_post")
)


def fold(params: Params, intervention: Any, *, config: ModelConfig) -> tuple[Params, ModelConfig]:
    """Weights whose unhooked forward equals the hooked forward with ``intervention``.

    Returns ``(params, config)``; the config changes only when tied embeddings are untied.
    Raises TypeError for a kind without a folding rule, and ValueError when this instance
    cannot be expressed exactly in the weights (see the module docstring).
    """
    rule = getattr(intervention, "fold", None)
    if rule is None:
        raise TypeError(
            f"{type(intervention).__name__} has no folding rule: no weight edit of the supported "
            "families equals it. Keep it as a hooked intervention."
        )
    return rule(params, config=config)


def fold_projection(params: Params, basis: jax.Array, site_mask: jax.Array, *,
                    config: ModelConfig) -> tuple[Params, ModelConfig]:
    """Fold the projection out of span(``basis`` [L, k, D]) at the sites of ``site_mask``."""
    _check_family(config)
    basis = np.asarray(basis)
    if basis.shape[-1] != config.d_model:
        raise ValueError(f"intervention width {basis.shape[-1]} != d_model {config.d_model}")
    mask = _binary_mask(site_mask, params, config)
    _check_stream_sites_redundant(mask, basis)

    layers = params.layers
    new_layers = dataclasses.replace(
        layers,
        o_proj=_project_writer_rows(layers.o_proj, basis, mask[:, _ATTN_OUT]),
        down_proj=_project_writer_rows(layers.down_proj, basis, mask[:, _MLP_OUT]),
    )
    if not mask[0, _RESID_PRE]:
        return dataclasses.replace(params, layers=new_layers), config
    embed = _cast_like(project_out(params.embed.astype(jnp.float32), jnp.asarray(basis[0])),
                       params.embed)
    return _with_new_embedding(params, config, embed, new_layers)


def fold_activation_addition(params: Params, direction: jax.Array, coeff: jax.Array,
                             site_mask: jax.Array, position_start: jax.Array,
                             position_stop: jax.Array, *, config: ModelConfig
                             ) -> tuple[Params, ModelConfig]:
    """Fold ``x + coeff * direction`` ([L] and [L, D]) at ``resid_pre`` of layer 0 into the
    embedding rows (the one exact route).

    Any other layer or site raises ValueError (no supported family has a residual-writing bias;
    see the module docstring). The position window must cover every position; the folded edit
    also reaches padding tokens, which no valid token attends to.
    """
    mask = _binary_mask(site_mask, params, config)
    active = [(layer, site) for layer, site in zip(*np.nonzero(mask))]
    if active != [(0, _RESID_PRE)]:
        raise ValueError(
            "ActAdd can be folded exactly only at resid_pre of layer 0 (into the embedding rows): "
            "adding a constant at a later layer or a write site needs a bias on o_proj/down_proj, "
            "which no supported family has. Keep it as a hooked intervention."
        )
    start = np.asarray(position_start[0])
    stop = np.asarray(position_stop[0])
    if np.any(start > 0) or np.any(stop < UNBOUNDED_POSITION):
        raise ValueError(
            "a position-windowed ActAdd cannot be folded: weights act at every position"
        )
    added = coeff[0] * direction[0]
    if config.scale_embeddings:  # the forward multiplies by sqrt(D) rounded to the embed dtype
        added = added / jnp.asarray(config.d_model**0.5, params.embed.dtype).astype(jnp.float32)
    embed = _cast_like(params.embed.astype(jnp.float32) + added, params.embed)
    return _with_new_embedding(params, config, embed, params.layers)


def _check_family(config: ModelConfig) -> None:
    if config.post_norms:
        raise ValueError(
            f"fold_projection: {config.family} normalises attention and MLP outputs after "
            "o_proj/down_proj (post_attn_norm/post_mlp_norm); their per-channel scale reintroduces "
            "the direction, so no weight edit equals the hooked intervention. Keep it hooked."
        )


def _binary_mask(site_mask: jax.Array, params: Params, config: ModelConfig) -> np.ndarray:
    if isinstance(site_mask, jax.core.Tracer):
        raise ValueError("folding reads the intervention's values; call it outside jit")
    mask = np.asarray(site_mask)
    if mask.shape != (config.n_layers, len(SITE_INDEX)):
        raise ValueError(
            f"intervention has site_mask {mask.shape}; the model needs ({config.n_layers}, "
            f"{len(SITE_INDEX)}): build it with n_layers={config.n_layers}"
        )
    if params.layers.o_proj.shape[0] != config.n_layers:
        raise ValueError(
            f"params have {params.layers.o_proj.shape[0]} layers, the config {config.n_layers}"
        )
    if not np.all((mask == 0) | (mask == 1)):
        raise ValueError("site_mask values other than 0 and 1 (partial edits) cannot be folded")
    return mask.astype(bool)


def _check_stream_sites_redundant(mask: np.ndarray, basis: np.ndarray) -> None:
    """Every active stream site must see a stream already free of its subspace."""
    # `clean`: everything written so far (embedding included) is projected with basis[0].
    clean = bool(mask[0, _RESID_PRE])
    for layer in range(mask.shape[0]):
        same_basis = np.array_equal(basis[layer], basis[0])
        if mask[layer, _RESID_PRE] and not (clean and same_basis):
            raise _not_redundant("resid_pre", layer)
        clean = clean and same_basis and bool(mask[layer, _ATTN_OUT] and mask[layer, _MLP_OUT])
        if mask[layer, _RESID_POST] and not clean:
            raise _not_redundant("resid_post", layer)


def _not_redundant(site: str, layer: int) -> ValueError:
    return ValueError(
        f"the projection at {site} of layer {layer} cannot be folded: weights can only project "
        "what is written, and the stream there still holds earlier, unprojected writes. Folding "
        "needs the embedding (resid_pre of layer 0) and every attn_out and mlp_out before that "
        "site active with the same basis (e.g. layers=None with sites resid_pre, attn_out, "
        "mlp_out), or write sites only."
    )


def _project_writer_rows(weights: jax.Array, basis: np.ndarray, active: np.ndarray) -> jax.Array:
    """``W - (W V^T) V`` for each active layer of stacked writer weights [L, n, D]."""

    def one_layer(args):
        weight, layer_basis, is_active = args
        projected = project_out(weight.astype(jnp.float32), layer_basis)
        return jnp.where(is_active, _cast_like(projected, weight), weight)

    return jax.lax.map(one_layer, (weights, jnp.asarray(basis), jnp.asarray(active)))


def _with_new_embedding(
    params: Params, config: ModelConfig, embed: jax.Array, layers
) -> tuple[Params, ModelConfig]:
    """Replace the embedding, untying it from the LM head first when they were tied."""
    if params.lm_head is not None:
        return dataclasses.replace(params, embed=embed, layers=layers), config
    untied = dataclasses.replace(params, embed=embed, layers=layers, lm_head=params.embed.T)
    return untied, dataclasses.replace(config, tie_embeddings=False)


def _cast_like(value: jax.Array, like: jax.Array) -> jax.Array:
    return value.astype(like.dtype)
