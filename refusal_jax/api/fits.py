"""Directions and erasers fitted on captured activations of two prompt sets.

Every fit takes ``harmful`` [n1, *pairs, D] and ``harmless`` [n0, *pairs, D] (e.g. two
``capture`` results, [n, P, L, D]) and fits one result per pair (position, layer): results lead
with ``*pairs``, so ``fit_dim(h, hl)[-1, 21]`` is position -1, layer 21. Index the activations
first (``h[:, -1, 21]``) to fit a single pair.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from refusal_jax.directions import INLPResult, LeaceEraser, mean_difference
from refusal_jax.directions import fit_inlp as _fit_inlp
from refusal_jax.directions import fit_leace as _fit_leace
from refusal_jax.directions.inlp import pair_major


def fit_dim(harmful: ArrayLike, harmless: ArrayLike) -> jax.Array:
    """Difference in means ``r = mean(harmful) - mean(harmless)`` per pair: [*pairs, D],
    unnormalised (its norm is the gap between the class means)."""
    return mean_difference(harmful, harmless)


def fit_inlp(harmful: ArrayLike, harmless: ArrayLike, *, max_directions: int = 4,
             **options) -> INLPResult:
    """INLP per pair, at most ``max_directions`` directions each (the study's default);
    ``basis`` [*pairs, N, D] has orthonormal rows, zero after ``n_directions``. ``options``:
    those of ``refusal_jax.directions.fit_inlp`` (``reference``, ``inverse_regularization``,
    ``seed``, ...)."""
    features, labels = _labelled(harmful, harmless)
    return _fit_inlp(features, labels, max_directions=max_directions, **options)


def fit_leace(harmful: ArrayLike, harmless: ArrayLike, **options) -> LeaceEraser:
    """LEACE eraser per pair (``mean`` [*pairs, D], ``A``, ``B`` [*pairs, 1, D]); ``options``:
    those of ``refusal_jax.directions.fit_leace``."""
    features, labels = _labelled(harmful, harmless)
    return _fit_leace(features, labels, **options)


def _labelled(harmful: ArrayLike, harmless: ArrayLike) -> tuple[jax.Array, np.ndarray]:
    """Pair-major features [*pairs, n1 + n0, D] and labels (1 = harmful, 0 = harmless)."""
    harmful, harmless = jnp.asarray(harmful), jnp.asarray(harmless)
    if harmful.shape[1:] != harmless.shape[1:]:
        raise ValueError(f"harmful {harmful.shape} and harmless {harmless.shape} activations "
                         "must share their trailing shape (capture both at the same positions "
                         "and layers)")
    labels = np.concatenate([np.ones(len(harmful), np.int32), np.zeros(len(harmless), np.int32)])
    return pair_major(jnp.concatenate([harmful, harmless]).astype(jnp.float32)), labels
