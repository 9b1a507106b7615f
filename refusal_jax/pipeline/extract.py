"""Activation capture at the EOI positions of every layer, baseline refusal scores, and the
candidate directions (DiM, INLP, LEACE) of every (EOI position, layer).

Shapes: activations ``[n, P, L, D]`` (prompt, EOI position p = -P..-1 in order, layer, width),
float32. Directions are per (p, l): DiM ``[P, L, D]``, INLP basis ``[P, L, N, D]``, LEACE
``[P, L, 1, D]``.

Batches have a fixed number of rows (the last one is padded by repeating a prompt, whose
outputs are dropped) and prompts are sorted by length before batching, so little padding is
computed; the padded length is rounded up to a multiple of ``length_bucket``, so the jitted
forward compiles once per distinct bucket.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from refusal_jax.chat import refusal_token_ids
from refusal_jax.directions import fit_inlp, fit_leace, mean_difference, pair_major
from refusal_jax.evaluation.refusal import refusal_score
from refusal_jax.models.core import forward
from refusal_jax.models.loading import Model
from refusal_jax.pipeline.progress import progress


def prompt_batches(model: Model, instructions: Sequence[str], batch_size: int,
                   length_bucket: int) -> Iterator[tuple[np.ndarray, object]]:
    """Yields (row indices into ``instructions``, padded Batch of ``batch_size`` rows).

    Prompts are grouped by token length; the last batch repeats its final prompt to fill up.
    """
    lengths = [len(ids) for ids in model.tokenizer(
        model.chat.prompts(list(instructions)), add_special_tokens=False)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        filled = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])
        batch = model.chat.encode([instructions[i] for i in filled],
                                  context_length=model.config.max_context,
                                  length_bucket=length_bucket)
        yield rows, batch


@functools.partial(jax.jit, static_argnames=("config",))
def _capture(params, tokens, valid, capture_positions, refusal_ids, *, config):
    out = forward(params, tokens, valid, config=config, capture_positions=capture_positions,
                  logits="last")
    return out.captures.astype(jnp.float32), refusal_score(out.logits, refusal_ids)


def capture(model: Model, instructions: Sequence[str], *, batch_size: int, length_bucket: int,
            name: str) -> tuple[np.ndarray, np.ndarray]:
    """EOI activations ``[n, P, L, D]`` and baseline refusal scores ``[n]`` of the prompts.

    Raises ValueError when the activations hold NaN or inf.
    """
    refusal_ids = jnp.asarray(refusal_token_ids(model.tokenizer), jnp.int32)
    n, cfg = len(instructions), model.config
    activations = np.zeros((n, model.chat.n_eoi, cfg.n_layers, cfg.d_model), np.float32)
    scores = np.zeros((n,), np.float32)
    batches = prompt_batches(model, instructions, batch_size, length_bucket)
    total = -(-n // batch_size)
    for rows, batch in progress(batches, total, f"capture {name} ({n} prompts)"):
        acts, batch_scores = _capture(model.params, jnp.asarray(batch.tokens),
                                      jnp.asarray(batch.valid),
                                      jnp.asarray(model.chat.eoi_positions(batch)), refusal_ids,
                                      config=cfg)
        activations[rows] = np.asarray(acts)[:len(rows)]
        scores[rows] = np.asarray(batch_scores)[:len(rows)]
    bad = ~np.isfinite(activations).all(axis=(1, 2, 3))
    if bad.any():
        shown = "; ".join(repr(instructions[i][:60]) for i in np.flatnonzero(bad)[:3])
        raise ValueError(
            f"activations of {int(bad.sum())} of {n} {name} prompts contain NaN or inf (e.g. "
            f"{shown}); the model overflows in {np.dtype(model.params.embed.dtype).name}: run "
            "with model.dtype='float32', or check the checkpoint")
    return activations, scores


def fit_directions(harmful: np.ndarray, harmless: np.ndarray, directions_config, *,
                   seed: int) -> dict[str, np.ndarray]:
    """DiM, class means, INLP and LEACE for every (position, layer) from ``[n, P, L, D]``."""
    dim = np.asarray(mean_difference(harmful, harmless))
    features = pair_major(np.concatenate([harmful, harmless]))  # [P, L, n, D]
    labels = np.concatenate([np.ones(len(harmful), np.int32), np.zeros(len(harmless), np.int32)])
    # One call for every pair: fit_inlp runs its solver loops for all pairs at once.
    n_pairs = features.shape[0] * features.shape[1]
    logging.info("INLP: fitting %d (position, layer) pairs, up to %d directions each", n_pairs,
                 directions_config.inlp_max_directions)
    start = time.perf_counter()
    inlp = jax.block_until_ready(fit_inlp(
        features, labels, max_directions=directions_config.inlp_max_directions,
        reference=directions_config.inlp_reference,
        inverse_regularization=directions_config.inlp_inverse_regularization, seed=seed))
    logging.info("INLP: done in %.1fs; directions per pair: median %d, max %d",
                 time.perf_counter() - start, int(np.median(inlp.n_directions)),
                 int(np.max(inlp.n_directions)))
    leace = fit_leace(features, labels)
    return {
        "dim": dim,
        "harmful_mean": harmful.mean(axis=0),
        "harmless_mean": harmless.mean(axis=0),
        "inlp_basis": np.asarray(inlp.basis),
        "inlp_n_directions": np.asarray(inlp.n_directions),
        "inlp_dev_accuracies": np.asarray(inlp.dev_accuracies),
        "inlp_majority_rate": np.asarray(inlp.majority_rate),
        "inlp_first_direction": np.asarray(inlp.first_direction),
        "inlp_converged": np.asarray(inlp.converged),
        "inlp_solver_steps": np.asarray(inlp.solver_steps),
        "leace_mean": np.asarray(leace.mean),
        "leace_read": np.asarray(leace.A),
        "leace_write": np.asarray(leace.B),
    }
