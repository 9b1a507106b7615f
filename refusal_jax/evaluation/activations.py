"""Activation capture at the EOI positions of every layer, with baseline refusal scores.

Shapes: activations ``[n, P, L, D]`` (prompt, EOI position p = -P..-1 in order, layer, width),
float32.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.evaluation.refusal import refusal_score
from refusal_jax.models.core import forward
from refusal_jax.models.loading import Model
from refusal_jax.runtime import distributed
from refusal_jax.runtime.batches import placed_batches
from refusal_jax.runtime.placement import Placement
from refusal_jax.runtime.progress import progress
from refusal_jax.text.chat import refusal_token_ids


@functools.partial(jax.jit, static_argnames=("config",))
def _capture(params, tokens, valid, capture_positions, refusal_ids, *, config):
    out = forward(params, tokens, valid, config=config, capture_positions=capture_positions,
                  logits="last")
    return out.captures.astype(jnp.float32), refusal_score(out.logits, refusal_ids)


def capture(model: Model, instructions: Sequence[str], *, batch_size: int, length_bucket: int,
            name: str, placement: Placement | None = None) -> tuple[np.ndarray, np.ndarray]:
    """EOI activations ``[n, P, L, D]`` and baseline refusal scores ``[n]`` of the prompts
    (gathered to every process).

    Raises ValueError when the activations or scores hold NaN or inf (`_check_finite`).
    """
    refusal_ids = jnp.asarray(refusal_token_ids(model.tokenizer), jnp.int32)
    n, cfg = len(instructions), model.config
    activations = np.zeros((n, model.chat.n_eoi, cfg.n_layers, cfg.d_model), np.float32)
    scores = np.zeros((n,), np.float32)
    batches = placed_batches(model, instructions, batch_size, length_bucket, placement)
    total = -(-n // batch_size)
    for rows, batch in progress(batches, total, f"capture {name} ({n} prompts)"):
        acts, batch_scores = distributed.gather(_capture(
            model.params, batch.tokens, batch.valid, batch.eoi_positions, refusal_ids,
            config=cfg))
        activations[rows] = acts[:len(rows)]
        scores[rows] = batch_scores[:len(rows)]
    _check_finite(activations, scores, instructions, name, np.dtype(model.params.embed.dtype))
    return activations, scores


def _check_finite(activations: np.ndarray, scores: np.ndarray, instructions: Sequence[str],
                  name: str, dtype: np.dtype) -> None:
    """ValueError naming the first layer whose input holds NaN / inf (or, with finite
    activations, the refusal scores: the final norm or LM head), and the likely cause."""
    finite = np.isfinite(activations)
    bad_layers = np.flatnonzero(~finite.all(axis=(0, 1, 3)))
    bad_prompts = np.flatnonzero(~finite.all(axis=(1, 2, 3)) | ~np.isfinite(scores))
    if not bad_prompts.size:
        return
    shown = "; ".join(repr(instructions[i][:60]) for i in bad_prompts[:3])
    where = (f"the input of layer {bad_layers[0]} (first of {bad_layers.size} layers)"
             if bad_layers.size else "the refusal scores (the final norm or LM head)")
    cause = ("in float32 this means NaN / inf weights before that point or a true overflow: "
             "check the checkpoint" if dtype == np.float32 else
             f"the model overflows in {dtype.name}: run with model.dtype='float32', or check the "
             "checkpoint")
    raise ValueError(f"{name}: {bad_prompts.size} of {len(instructions)} prompts give NaN or "
                     f"inf at {where} (e.g. {shown}); {cause}")
