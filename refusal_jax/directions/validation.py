"""Input checks shared by the direction estimators: float features and 0/1 labels.

Conventions: labels 1 = harmful, 0 = harmless; features ``(..., n, D)`` with the examples on
axis -2. The checks run eagerly, so call them on concrete arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def validated_features(features: ArrayLike, *, min_ndim: int) -> jax.Array:
    """``features`` as float32, after checking their rank, dtype and that every value is finite."""
    features = jnp.asarray(features)
    if features.ndim < min_ndim:
        raise ValueError(f"features must have at least {min_ndim} axes (..., n, D); got shape "
                         f"{features.shape}.")
    if not jnp.issubdtype(features.dtype, jnp.floating):
        raise ValueError(f"features must be floating point; got {features.dtype}.")
    if not bool(jnp.all(jnp.isfinite(features))):
        raise ValueError("features contain NaN or inf values; check the activation capture.")
    return features.astype(jnp.float32)


def validated_labels(labels: ArrayLike) -> np.ndarray:
    """``labels`` as a 1-D int32 numpy array, after checking that they are all 0 or 1."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of 0/1 values; got shape {labels.shape}.")
    if labels.size and not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must contain only 0 (harmless) and 1 (harmful); got values "
                         f"{np.unique(labels)[:10]}.")
    return labels.astype(np.int32)


def check_matching(features: jax.Array, labels: np.ndarray) -> None:
    """Raises unless there is one label per example (axis -2) and both classes occur."""
    if features.shape[-2] != labels.shape[0]:
        raise ValueError(f"features have {features.shape[-2]} examples (axis -2 of shape "
                         f"{features.shape}) but there are {labels.shape[0]} labels.")
    if np.unique(labels).size < 2:
        raise ValueError("labels must contain both classes (0 = harmless, 1 = harmful).")
