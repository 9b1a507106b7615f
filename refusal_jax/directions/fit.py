"""Every direction estimator at every (EOI position, layer) of captured activations.

Shapes: activations ``[n, P, L, D]`` (prompt, EOI position p = -P..-1 in order, layer, width).
Directions come out per (p, l): DiM ``[P, L, D]``, INLP basis ``[P, L, N, D]``, LEACE
``[P, L, 1, D]``, as the named arrays of a study's ``directions.npz``. INLP and LEACE see one
flat (position, layer) pair axis, split over ``pairs`` on a mesh (a
``runtime.placement.Placement``); every process passes the same activations and gets every
result.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging

from refusal_jax.directions.dim import mean_difference
from refusal_jax.directions.inlp import fit_inlp
from refusal_jax.directions.leace import fit_leace
from refusal_jax.runtime import distributed
from refusal_jax.runtime.placement import Placement


# Activation RMS outside which INLP's regularised logistic regression is likely to see nothing:
# tiny activations leave the penalty dominant, huge ones overflow its float32 logits.
INLP_RMS_RANGE = (1e-3, 1e4)


def warn_if_scale_hides_directions(examples: np.ndarray, n_directions: np.ndarray,
                                   inverse_regularization: float) -> str | None:
    """Logs (and returns) a warning when INLP found no direction at some (position, layer)
    whose activations ``[n, P, L, D]`` have an RMS outside ``INLP_RMS_RANGE``: its fit is not
    scale invariant, so such data may hide directions that a rescaled copy shows."""
    rms = np.sqrt(np.mean(np.square(examples, dtype=np.float64), axis=(0, 3)))  # [P, L]
    low, high = INLP_RMS_RANGE
    suspect = (np.asarray(n_directions).reshape(rms.shape) == 0) & ((rms < low) | (rms > high))
    if not suspect.any():
        return None
    position, layer = np.argwhere(suspect)[0]
    message = (f"INLP found no direction at {int(suspect.sum())} (position, layer) pairs whose "
               f"activations have an RMS outside [{low:g}, {high:g}] (e.g. position "
               f"{position - rms.shape[0]}, layer {layer}: RMS {rms[position, layer]:.3g}); its "
               f"logistic regression (inverse_regularization={inverse_regularization}) depends "
               "on the scale: rescale the activations or the regularisation")
    logging.warning(message)
    return message


def fit_directions(harmful: np.ndarray, harmless: np.ndarray, directions_config, *,
                   seed: int, reference_split: bool = False, absolute_stop: bool = False,
                   keep_failing: bool = False, placement: Placement | None = None
                   ) -> dict[str, np.ndarray]:
    """DiM, class means, INLP and LEACE for every (position, layer) from ``[n, P, L, D]``.

    ``directions_config`` holds ``inlp_max_directions`` and ``inlp_inverse_regularization`` (a
    study config's ``directions`` section); ``seed`` seeds INLP's train/dev split;
    ``reference_split`` (the published, non-stratified split), ``absolute_stop`` and
    ``keep_failing`` choose INLP's rules (:func:`refusal_jax.directions.inlp.fit_inlp`).
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
        stratified=not reference_split, absolute_stop=absolute_stop, keep_failing=keep_failing,
        inverse_regularization=directions_config.inlp_inverse_regularization, seed=seed))
    logging.info("INLP: done in %.1fs; directions per pair: median %d, max %d",
                 time.perf_counter() - start, int(np.median(inlp.n_directions)),
                 int(np.max(inlp.n_directions)))
    warn_if_scale_hides_directions(examples, np.asarray(inlp.n_directions),
                                   directions_config.inlp_inverse_regularization)
    logging.info("LEACE: fitting %d (position, layer) pairs", n_pairs)
    start = time.perf_counter()
    leace = per_pair(fit_leace(features, labels))
    logging.info("LEACE: done in %.1fs", time.perf_counter() - start)
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
