"""KL divergence between the baseline and an intervened model's next-token distributions.

The KL score of docs/method.md (sections 5 and 6) is the mean over prompts of
    KL(p || q) = sum_v p_v (log p_v - log q_v),
with p the baseline's and q the intervened model's next-token distribution at the last prompt
position. It is computed from logits in float32 log space (log_softmax of each side), so no
probability is divided or logged after underflowing; tokens with p_v = 0 contribute exactly 0,
even where q_v = 0 too (logits of -inf), and a token with p_v > 0 but q_v = 0 gives +inf.

The published code adds ``eps`` inside both logarithms, sum_v p_v (log(p_v + eps) - log(q_v +
eps)); :func:`kl_from_log_probs` computes either form from log-probabilities.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.core import forward
from refusal_jax.models.params import Params


def _check_logits(name: str, logits: jax.Array) -> jax.Array:
    logits = jnp.asarray(logits)
    if logits.ndim < 1 or not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"{name} must be float logits of shape [..., V], got {logits.dtype} "
                         f"{logits.shape}")
    return logits


@jax.jit
def _kl(baseline_logits: jax.Array, intervened_logits: jax.Array) -> jax.Array:
    log_p = jax.nn.log_softmax(baseline_logits.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(intervened_logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(log_p)
    terms = jnp.where(p > 0, p * (log_p - log_q), 0.0)
    return jnp.sum(terms, axis=-1)


def kl_from_log_probs(log_p: jax.Array, log_q: jax.Array, *, eps: float = 0.0) -> jax.Array:
    """KL(p || q) over the last axis from log-probabilities [..., V] (float32): the exact
    sum_v p_v (log p_v - log q_v) when ``eps`` is 0, else the published code's
    sum_v p_v (log(p_v + eps) - log(q_v + eps))."""
    p = jnp.exp(log_p)
    if eps == 0.0:
        return jnp.sum(p * (log_p - log_q), axis=-1)
    return jnp.sum(p * (jnp.log(p + eps) - jnp.log(jnp.exp(log_q) + eps)), axis=-1)


def kl_divergence(baseline_logits: jax.Array, intervened_logits: jax.Array) -> jax.Array:
    """KL(softmax(baseline) || softmax(intervened)) per row: [..., V] x [..., V] -> [...] float32.

    The two shapes broadcast against each other, so one baseline [B, V] can be compared with a
    stack of candidates [C, B, V].
    """
    baseline_logits = _check_logits("baseline_logits", baseline_logits)
    intervened_logits = _check_logits("intervened_logits", intervened_logits)
    if baseline_logits.shape[-1] != intervened_logits.shape[-1]:
        raise ValueError(f"vocabulary sizes differ: baseline {baseline_logits.shape[-1]}, "
                         f"intervened {intervened_logits.shape[-1]}")
    try:
        jnp.broadcast_shapes(baseline_logits.shape, intervened_logits.shape)
    except ValueError:
        raise ValueError(f"baseline logits {baseline_logits.shape} and intervened logits "
                         f"{intervened_logits.shape} do not broadcast") from None
    return _kl(baseline_logits, intervened_logits)


def mean_kl(baseline_logits: jax.Array, intervened_logits: jax.Array) -> jax.Array:
    """Mean KL over the prompt axis: baseline [B, V], intervened [..., B, V] -> [...] float32."""
    baseline_logits = _check_logits("baseline_logits", baseline_logits)
    if baseline_logits.ndim != 2:
        raise ValueError(f"baseline_logits must be [B, V] (one row per prompt), got "
                         f"{baseline_logits.shape}")
    return jnp.mean(kl_divergence(baseline_logits, intervened_logits), axis=-1)


@functools.partial(jax.jit, static_argnames="config")
def _last_logits(params: Params, tokens: jax.Array, valid: jax.Array, intervention: Any, *,
                 config: ModelConfig) -> jax.Array:
    return forward(params, tokens, valid, config=config, intervention=intervention,
                   logits="last").logits


def last_position_logits(params: Params, tokens: jax.Array, valid: jax.Array, *,
                         config: ModelConfig, intervention: Any = None) -> jax.Array:
    """Next-token logits [B, V] float32 at the last position of a left-padded batch (jitted;
    the intervention is an array argument, so changing its values does not recompile)."""
    return _last_logits(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(valid, bool),
                        intervention, config=config)


def last_position_kl(params: Params, tokens: jax.Array, valid: jax.Array, *,
                     config: ModelConfig, intervention: Any,
                     baseline_logits: jax.Array | None = None) -> float:
    """Mean KL(baseline || intervened) of the last-position distribution over a batch.

    `baseline_logits` [B, V] may be passed to reuse one baseline forward for many interventions.
    """
    if baseline_logits is None:
        baseline_logits = last_position_logits(params, tokens, valid, config=config)
    intervened = last_position_logits(params, tokens, valid, config=config,
                                      intervention=intervention)
    if baseline_logits.shape != intervened.shape:
        raise ValueError(f"baseline_logits {baseline_logits.shape} do not match the batch's "
                         f"logits {intervened.shape}")
    return float(mean_kl(baseline_logits, intervened))
