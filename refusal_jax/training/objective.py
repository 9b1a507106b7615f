"""The fine-tuning objective and one jitted optimisation step of a LoRA adapter.

The loss is the next-token cross-entropy averaged over the reply tokens of a `TokenBatch`,
weighted by its `loss_mask` (see `refusal_jax.training.examples`), of the model whose weights are
the frozen base params with the adapter merged in.
Only the adapter is trained; the base params are an argument of the jitted step (not a baked-in
constant), so one compiled step serves every batch of the same shape. The layers below the
adapter's `first_layer` are frozen, so the step runs only the layers from there on, starting from
their cached input `hidden` (see `refusal_jax.training.prefix`).

Optionally (`OpeningTerm`) the loss adds a binary cross-entropy on the refusal decision at the
first reply position: with p_R the model's probability mass on the refusal-token set R (the first
tokens of refusal openings, `refusal_jax.text.chat.refusal_token_ids`) where the reply's first token
is predicted, a row to be refused adds weight * -log p_R and a row to be answered
weight * -log(1 - p_R) (unlikelihood of opening a refusal), averaged over the batch rows. The
substring refusal metric counts replies that open with those tokens, so the term aims at it
directly; per-row weights of 0 switch it off for a row (e.g. a benign answer that itself opens
with "I").

The targets may be soft (a teacher's probability that the request should be refused). On rows
marked `teacher` the term alone trains the decision: the cross-entropy of the reply's first token,
-log p(token) = -log p(decision) - log p(token | decision), keeps only its second part, so the
reply's own opening does not pull the decision towards a hard label.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.core import forward
from refusal_jax.models.io.adapter import LoraAdapter, merge_adapter
from refusal_jax.models.params import Params


def token_nll(params: Params, tokens: jax.Array, valid: jax.Array, loss_mask: jax.Array, *,
              config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Weighted sum of the negative log-likelihoods of the masked tokens of each row, and the sum
    of their weights (their count when the weights are 0/1): [B], [B].

    Token t is scored by the logits at t - 1 (loss_mask[:, 0] is ignored).
    """
    return _masked_nll(forward(params, tokens, valid, config=config).logits, tokens, loss_mask)


def _masked_nll(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array):
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    targets = tokens[:, 1:]
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    mask = loss_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * mask, axis=1), jnp.sum(mask, axis=1)


def _logits_from(params: Params, hidden: jax.Array, valid: jax.Array, *, first_layer: int,
                 config: ModelConfig) -> jax.Array:
    return forward(params, None, valid, config=config, resid=hidden.astype(params.embed.dtype),
                   start_layer=first_layer).logits


def token_nll_from(params: Params, hidden: jax.Array, tokens: jax.Array, valid: jax.Array,
                   loss_mask: jax.Array, *, first_layer: int, config: ModelConfig
                   ) -> tuple[jax.Array, jax.Array]:
    """`token_nll` given `hidden` [B, T, D], the input of layer `first_layer`."""
    logits = _logits_from(params, hidden, valid, first_layer=first_layer, config=config)
    return _masked_nll(logits, tokens, loss_mask)


class OpeningTerm(NamedTuple):
    """Per-row inputs of the refusal-opening loss term (arrays, so one compiled step serves any
    weights): refuse [B] (the target probability of opening a refusal: 1 or 0, or a teacher's),
    weight [B] (0 leaves the row out), refusal_ids [K] int32 (the refusal-token set R), and
    optionally teacher [B] (1 where this term alone trains the decision; see the module
    docstring)."""

    refuse: jax.Array
    weight: jax.Array
    refusal_ids: jax.Array
    teacher: jax.Array | None = None


def reply_start(loss_mask: jax.Array) -> jax.Array:
    """Position [B] of each row's first reply token: the first position with a loss weight."""
    return jnp.argmax(loss_mask > 0, axis=1)


def refusal_log_mass(logits: jax.Array, refusal_ids: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    """(log p_R, log(1 - p_R)) [...]: p_R is the probability mass of next-token `logits`
    [..., V] on the tokens `refusal_ids`."""
    in_set = jnp.zeros(logits.shape[-1], bool).at[refusal_ids].set(True)
    total = jax.nn.logsumexp(logits, axis=-1)
    log_refuse = jax.nn.logsumexp(jnp.where(in_set, logits, -jnp.inf), axis=-1) - total
    log_answer = jax.nn.logsumexp(jnp.where(in_set, -jnp.inf, logits), axis=-1) - total
    return log_refuse, log_answer


def refusal_opening_log_probs(logits: jax.Array, loss_mask: jax.Array, refusal_ids: jax.Array
                              ) -> tuple[jax.Array, jax.Array]:
    """`refusal_log_mass` [B] where each row's first reply token is predicted (the logits one
    position before it)."""
    position = reply_start(loss_mask) - 1
    first = jnp.take_along_axis(logits, position[:, None, None], axis=1)[:, 0]  # [B, V]
    return refusal_log_mass(first, refusal_ids)


def opening_loss(logits: jax.Array, loss_mask: jax.Array, term: OpeningTerm) -> jax.Array:
    """Mean over rows of weight * binary cross-entropy of "opens a refusal" (see the module
    docstring)."""
    log_refuse, log_answer = refusal_opening_log_probs(logits, loss_mask, term.refusal_ids)
    bce = -(term.refuse * log_refuse + (1.0 - term.refuse) * log_answer)
    return jnp.mean(term.weight * bce)


def first_token_decision_nll(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array,
                             refusal_ids: jax.Array) -> jax.Array:
    """The decision's share [B] of each row's weighted first-reply-token cross-entropy:
    -log p_R where that token is in R, else -log(1 - p_R), times its loss weight."""
    start = reply_start(loss_mask)
    log_refuse, log_answer = refusal_opening_log_probs(logits, loss_mask, refusal_ids)
    first = jnp.take_along_axis(tokens, start[:, None], axis=1)[:, 0]
    weight = jnp.take_along_axis(loss_mask, start[:, None], axis=1)[:, 0]
    return -weight * jnp.where(jnp.isin(first, refusal_ids), log_refuse, log_answer)


def reply_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array,
               opening: OpeningTerm | None = None) -> jax.Array:
    """Weighted mean cross-entropy per reply token (weights: `loss_mask`) of `logits`, plus
    `opening_loss` when `opening` is given (on its `teacher` rows, the first reply token's
    cross-entropy without the decision's share; see the module docstring)."""
    nll, count = _masked_nll(logits, tokens, loss_mask)
    if opening is not None and opening.teacher is not None:
        nll = nll - opening.teacher * first_token_decision_nll(logits, tokens, loss_mask,
                                                               opening.refusal_ids)
    loss = jnp.sum(nll) / jnp.maximum(jnp.sum(count), 1.0)
    if opening is not None:
        loss = loss + opening_loss(logits, loss_mask, opening)
    return loss


def adapter_loss(adapter: LoraAdapter, params: Params, hidden: jax.Array, tokens: jax.Array,
                 valid: jax.Array, loss_mask: jax.Array, *, config: ModelConfig,
                 opening: OpeningTerm | None = None) -> jax.Array:
    """`reply_loss` of the base params with `adapter` merged in; `hidden` is the (frozen) input
    of the adapter's first layer."""
    logits = _logits_from(merge_adapter(params, adapter), hidden, valid,
                          first_layer=adapter.first_layer, config=config)
    return reply_loss(logits, tokens, loss_mask, opening)


@functools.cache  # the same settings give the same object, so the jitted step is reused
def make_optimizer(*, learning_rate: float, steps: int, warmup_steps: int,
                   weight_decay: float = 0.0, clip_norm: float = 1.0
                   ) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay to 10% of the peak, after global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
        decay_steps=max(steps, warmup_steps + 1), end_value=0.1 * learning_rate)
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(schedule, weight_decay=weight_decay))


@functools.partial(jax.jit, static_argnames=("optimizer", "config"), donate_argnums=(0, 1))
def train_step(adapter: LoraAdapter, opt_state: optax.OptState, params: Params,
               hidden: jax.Array, tokens: jax.Array, valid: jax.Array, loss_mask: jax.Array,
               opening: OpeningTerm | None = None, *,
               optimizer: optax.GradientTransformation, config: ModelConfig
               ) -> tuple[LoraAdapter, optax.OptState, jax.Array]:
    """One optimiser step on the adapter; returns (adapter, opt_state, loss before the step)."""
    loss, grads = jax.value_and_grad(adapter_loss)(adapter, params, hidden, tokens, valid,
                                                   loss_mask, config=config, opening=opening)
    updates, opt_state = optimizer.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, loss
