"""The candidate directions of every (EOI position, layer) and the record of a chosen one."""

from __future__ import annotations

import numpy as np

from refusal_jax.directions import select_k
from refusal_jax.directions.inlp import INLPResult
from refusal_jax.selection.ranking import CandidateScores

# A DiM direction shorter than this (relative to the largest one) is treated as zero.
_DEGENERATE_NORM = 1e-6


def inlp_basis(directions: dict[str, np.ndarray], directions_config
               ) -> tuple[np.ndarray, np.ndarray]:
    """INLP bases after the k policy, trimmed to the largest k kept ([P, L, k_max, D]), and the
    k kept per pair ([P, L])."""
    result = INLPResult(
        basis=directions["inlp_basis"], n_directions=directions["inlp_n_directions"],
        dev_accuracies=directions["inlp_dev_accuracies"],
        majority_rate=directions["inlp_majority_rate"],
        first_direction=directions["inlp_first_direction"],
        converged=directions["inlp_converged"], solver_steps=directions["inlp_solver_steps"])
    policy = directions_config.k_policy
    keep = np.asarray(select_k(result, policy, directions_config.k if policy == "fixed" else None))
    k_max = max(1, int(keep.max()))
    slots = np.arange(k_max)
    basis = directions["inlp_basis"][..., :k_max, :]
    return np.where((slots < keep[..., None])[..., None], basis, 0.0).astype(np.float32), keep


def dim_candidates(dim: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unit directions, norms, degenerate mask) of a DiM grid [P, L, D]: a direction shorter
    than 1e-6 of the longest counts as zero (degenerate) and keeps a zero unit vector."""
    norms = np.linalg.norm(dim, axis=-1)
    degenerate = norms <= _DEGENERATE_NORM * max(float(norms.max()), 1e-30)
    return dim / np.where(degenerate, 1.0, norms)[..., None], norms, degenerate


def describe_component(p: int, l: int, n_positions: int, scores: CandidateScores,
                       keep: np.ndarray | None, accuracy: np.ndarray | None) -> dict:
    """The selection record of the candidate (p, l): its EOI position (negative) and index,
    layer and scores (None where not scored), and for INLP (`keep`, `accuracy` given) its k and
    first dev accuracy."""
    def score(value) -> float | None:
        return float(value) if np.isfinite(value) else None

    entry = {"position": p - n_positions, "position_index": p, "layer": l,
             "bypass": score(scores.bypass[p, l]),
             "steering": score(np.max(scores.steering[p, l])),
             "kl": score(scores.kl[p, l])}
    if keep is not None:
        entry["k"] = int(keep[p, l])
        entry["first_dev_accuracy"] = float(accuracy[p, l])
    return entry
