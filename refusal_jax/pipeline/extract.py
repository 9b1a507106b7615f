"""Activation capture at the EOI positions of every layer, baseline refusal scores, and the
candidate directions (DiM, INLP, LEACE) of every (EOI position, layer).

Shapes: activations ``[n, P, L, D]`` (prompt, EOI position p = -P..-1 in order, layer, width),
float32. Directions are per (p, l): DiM ``[P, L, D]``, INLP basis ``[P, L, N, D]``, LEACE
``[P, L, 1, D]``.

Batches have a fixed number of rows (the last one is padded by repeating a prompt, whose
outputs are dropped) and prompts are sorted by length before batching, so little padding is
computed; the padded length is rounded up to a multiple of ``length_bucket``, so the jitted
forward compiles once per distinct bucket.

On a mesh (a ``distributed.Placement``), batch rows are split over ``batch``: every process
counts the tokens of every prompt (to agree on the batches), then encodes and transfers only the
rows its devices hold (:func:`placed_batches`); results are gathered to every process. INLP and
LEACE fit their flat (position, layer) pair axis split over ``pairs``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from refusal_jax import distributed
from refusal_jax.chat import Batch, pad_token_id, refusal_token_ids
from refusal_jax.directions import fit_inlp, fit_leace, mean_difference
from refusal_jax.distributed import Placement
from refusal_jax.evaluation.refusal import refusal_score
from refusal_jax.models.core import forward
from refusal_jax.models.loading import Model
from refusal_jax.pipeline.progress import progress


@dataclasses.dataclass(frozen=True)
class PlacedBatch:
    """A batch on the devices: rows split over ``batch`` on a mesh (global arrays)."""

    tokens: jax.Array  # [B, T] int32, left padded
    valid: jax.Array  # [B, T] bool
    eoi_positions: jax.Array  # [B, n_eoi] int32 column indices of the EOI tokens


def placed_batches(model: Model, instructions: Sequence[str], batch_size: int,
                   length_bucket: int, placement: Placement | None = None
                   ) -> Iterator[tuple[np.ndarray, PlacedBatch]]:
    """Yields (row indices into ``instructions``, batch of ``batch_size`` rows on the devices).

    Prompts are grouped by token length; the last batch repeats its final prompt to fill up.
    Each process encodes only the rows its devices hold (``placement.rows``), left padded to
    the longest bucket of the whole batch.

    Raises ValueError when ``batch_size`` does not split evenly over the batch's devices.
    """
    placement = placement or Placement()
    if batch_size % placement.multiple("batch"):
        raise ValueError(f"a batch of {batch_size} rows cannot be split over the "
                         f"{placement.multiple('batch')} devices of the mesh's batch axes; use a "
                         "batch size that is a multiple of it")
    own = placement.rows(batch_size)
    pad_id = pad_token_id(model.tokenizer)
    lengths = [len(ids) for ids in model.tokenizer(
        model.chat.prompts(list(instructions)), add_special_tokens=False)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        filled = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])
        local = model.chat.encode([instructions[i] for i in filled[own]],
                                  context_length=model.config.max_context,
                                  length_bucket=length_bucket)
        extra = distributed.agree_on_max(local.tokens.shape[1]) - local.tokens.shape[1]
        local = Batch(tokens=np.pad(local.tokens, ((0, 0), (extra, 0)), constant_values=pad_id),
                      valid=np.pad(local.valid, ((0, 0), (extra, 0))))
        arrays = placement.batch((local.tokens, local.valid, model.chat.eoi_positions(local)),
                                 batch_size)
        yield rows, PlacedBatch(*arrays)


@functools.partial(jax.jit, static_argnames=("config",))
def _capture(params, tokens, valid, capture_positions, refusal_ids, *, config):
    out = forward(params, tokens, valid, config=config, capture_positions=capture_positions,
                  logits="last")
    return out.captures.astype(jnp.float32), refusal_score(out.logits, refusal_ids)


def capture(model: Model, instructions: Sequence[str], *, batch_size: int, length_bucket: int,
            name: str, placement: Placement | None = None) -> tuple[np.ndarray, np.ndarray]:
    """EOI activations ``[n, P, L, D]`` and baseline refusal scores ``[n]`` of the prompts
    (gathered to every process).

    Raises ValueError when the activations hold NaN or inf.
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
    bad = ~np.isfinite(activations).all(axis=(1, 2, 3))
    if bad.any():
        shown = "; ".join(repr(instructions[i][:60]) for i in np.flatnonzero(bad)[:3])
        raise ValueError(
            f"activations of {int(bad.sum())} of {n} {name} prompts contain NaN or inf (e.g. "
            f"{shown}); the model overflows in {np.dtype(model.params.embed.dtype).name}: run "
            "with model.dtype='float32', or check the checkpoint")
    return activations, scores


def fit_directions(harmful: np.ndarray, harmless: np.ndarray, directions_config, *,
                   seed: int, placement: Placement | None = None) -> dict[str, np.ndarray]:
    """DiM, class means, INLP and LEACE for every (position, layer) from ``[n, P, L, D]``.

    INLP and LEACE see one flat pair axis, split over ``pairs`` on a mesh; every process passes
    the same activations and gets every result.
    """
    placement = placement or Placement()
    dim = np.asarray(mean_difference(harmful, harmless))
    n_positions, n_layers, width = harmful.shape[1:]
    examples = np.concatenate([harmful, harmless])
    features = np.moveaxis(examples, 0, -2).reshape(n_positions * n_layers, len(examples), width)
    labels = np.concatenate([np.ones(len(harmful), np.int32), np.zeros(len(harmless), np.int32)])
    features, n_pairs = placement.leading(features, "pairs")

    def per_pair(result):  # [padded pairs, ...] on the devices -> [P, L, ...] on every process
        return jax.tree.map(lambda leaf: leaf[:n_pairs].reshape(
            (n_positions, n_layers) + leaf.shape[1:]), distributed.gather(result))

    # One call for every pair: fit_inlp works through them all in one compiled loop.
    logging.info("INLP: fitting %d (position, layer) pairs (%d per device group), up to %d "
                 "directions each", n_pairs, features.shape[0] // placement.multiple("pairs"),
                 directions_config.inlp_max_directions)
    start = time.perf_counter()
    inlp = per_pair(fit_inlp(
        features, labels, max_directions=directions_config.inlp_max_directions,
        reference=directions_config.inlp_reference,
        inverse_regularization=directions_config.inlp_inverse_regularization, seed=seed))
    logging.info("INLP: done in %.1fs; directions per pair: median %d, max %d",
                 time.perf_counter() - start, int(np.median(inlp.n_directions)),
                 int(np.max(inlp.n_directions)))
    leace = per_pair(fit_leace(features, labels))
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
