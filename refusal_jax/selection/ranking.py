"""Filters and ranking of the (EOI position, layer) candidates (docs/method.md section 4).

Filters: l >= (1 - prune_layer_fraction) L, KL > kl_threshold, steering < min_steering_score,
any score NaN. DiM survivors are ranked by bypass (lower first), INLP ones by first-classifier dev
accuracy, then bypass. ``just_one`` keeps the best; otherwise the top ``top_percentage``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass
class CandidateScores:
    """Scores of every (p, l): bypass [P, L], steering [P, L, M], kl [P, L]; NaN = degenerate
    or not scored. ``filtered`` [P, L]: whether the pair's KL and steering were computed."""

    bypass: np.ndarray
    steering: np.ndarray
    kl: np.ndarray
    filtered: np.ndarray


def _late_layers(shape: tuple[int, int], select_config) -> np.ndarray:
    layer_limit = (1.0 - select_config.prune_layer_fraction) * shape[1]
    return np.broadcast_to(np.arange(shape[1]), shape) >= layer_limit


def _sort_key(bypass: np.ndarray, accuracy: np.ndarray | None):
    if accuracy is None:
        return lambda pair: bypass[pair]
    return lambda pair: (-accuracy[pair], bypass[pair])


def rank_order(bypass: np.ndarray, *, select_config,
               accuracy: np.ndarray | None = None) -> list[tuple[int, int]]:
    """The pairs that can survive the filters (finite bypass, not a late layer), in the order
    :func:`rank` ranks survivors."""
    eligible = np.isfinite(bypass) & ~_late_layers(bypass.shape, select_config)
    pairs = [tuple(int(i) for i in pair) for pair in np.argwhere(eligible)]
    return sorted(pairs, key=_sort_key(bypass, accuracy))


def unfiltered_order(bypass: np.ndarray, *, accuracy: np.ndarray | None = None
                     ) -> list[tuple[int, int]]:
    """Every pair with a finite bypass score (late layers included), in the order :func:`rank`
    ranks survivors: the published code's unfiltered pool."""
    pairs = [tuple(int(i) for i in pair) for pair in np.argwhere(np.isfinite(bypass))]
    return sorted(pairs, key=_sort_key(bypass, accuracy))


def rank(scores: CandidateScores, *, select_config,
         accuracy: np.ndarray | None = None) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """Surviving (p, l) pairs, best first, and how many pairs each filter discarded.

    ``accuracy`` [P, L] (INLP's first-classifier dev accuracy) ranks first when given. Only
    pairs whose filters were scored (``scores.filtered``) can survive; the others are counted
    under "not_scored" (when the filters were scored only until the best one was found).
    """
    steering = np.max(scores.steering, axis=-1)
    with np.errstate(invalid="ignore"):
        filters = {
            "nan": np.isnan(scores.bypass) | (scores.filtered & (np.isnan(steering)
                                                                 | np.isnan(scores.kl))),
            "late_layer": _late_layers(scores.bypass.shape, select_config),
            "kl": scores.kl > select_config.kl_threshold,
            "steering": steering < select_config.min_steering_score,
        }
    discarded = np.zeros(scores.bypass.shape, bool)
    for mask in filters.values():
        discarded |= mask
    not_scored = ~discarded & ~scores.filtered
    if not_scored.any():
        filters["not_scored"] = not_scored
    survivors = [tuple(int(i) for i in pair) for pair in np.argwhere(~discarded & ~not_scored)]
    survivors.sort(key=_sort_key(scores.bypass, accuracy))
    return survivors, {name: int(mask.sum()) for name, mask in filters.items()}


def lowest_bypass_fallback(scores: CandidateScores, discarded: dict[str, int], *,
                           select_config) -> tuple[list[tuple[int, int]], str]:
    """The ranking when no candidate passes the filters: among the candidates that could have
    (finite bypass, not a late layer; every one of them had its filters scored once none
    survived), the one with the lowest bypass score, and a note of why it was taken. Raises
    ValueError when there is none."""
    eligible = rank_order(scores.bypass, select_config=select_config)
    eligible = [pair for pair in eligible if scores.filtered[pair]]
    if not eligible:
        raise ValueError(f"no candidate to fall back on (discarded per filter: {discarded}): "
                         "every bypass score is NaN or at a late layer; check the directions "
                         "for zeros and the model for NaNs, or lower select.prune_layer_fraction")
    return eligible[:1], (
        f"no candidate passed the filters (discarded per filter: {discarded}); the one with "
        "the lowest bypass score outside the late layers is used")


def n_components(pool: int, select_config) -> int:
    """How many components are kept from a ranking of ``pool`` pairs: 1 with ``just_one``,
    else ``ceil(top_percentage * pool)`` (at least 1)."""
    if select_config.just_one:
        return 1
    return max(1, math.ceil(select_config.top_percentage * pool))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """0-based ranks, ties given the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts + 1) / 2.0)[inverse]


def spearman(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman rank correlation over the pairs where both are finite (NaN if < 3 pairs)."""
    keep = np.isfinite(first) & np.isfinite(second)
    if keep.sum() < 3:
        return float("nan")
    a, b = _average_ranks(first[keep]), _average_ranks(second[keep])
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")
