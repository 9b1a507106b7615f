"""Coordinates of the training row space, in which every logistic-regression optimum lies."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# A row-space axis shorter than this fraction of the longest one is numerically absent (the
# centred data's rank is below min(n, D)) and is dropped.
_RANK_TOLERANCE = 1e-5


class Coordinates(NamedTuple):
    """One pair's features in coordinates ``u`` of the span that holds every optimal weight.

    A weight vector is ``w = axes @ u``. ``axes`` [D, r] are unit columns spanning the row space
    of the centred training features (``r = min(n_train, D)``; columns of rank-deficient
    directions are zero). ``train`` = ``(X - center) @ axes``, ``dev`` = ``(X_dev - center) @
    axes`` and ``metric`` = ``axes.T @ axes``, so that ``X_c w = train @ u`` and ``||w||^2 =
    u @ metric @ u`` hold exactly even where float32 eigenvectors are not quite orthogonal.
    """

    center: jax.Array  # [D]
    axes: jax.Array  # [D, r]
    train: jax.Array  # [n_train, r]
    dev: jax.Array  # [n_dev, r]
    metric: jax.Array  # [r, r]


def row_space_coordinates(train_features: jax.Array, dev_features: jax.Array) -> Coordinates:
    """Row-space coordinates from the eigenvectors of the smaller Gram matrix of the centred data.

    Why this loses nothing: with a free intercept, the gradient condition of the penalised loss
    gives ``w = -X_c.T r / (2 lam)`` (``r`` the residuals), so every optimum lies in the row
    space of ``X_c``; projecting out directions of that space keeps the projected rows in it.
    With ``n < D`` (activations: a few hundred prompts, width in the thousands) the solver then
    works on ``n x n`` instead of ``n x D`` arrays, and the eigenbasis makes the loss's curvature
    at ``u = 0`` diagonal, which is what both solvers precondition with.
    """
    center = jnp.mean(train_features, axis=0)
    centred = train_features - center
    n, dim = centred.shape
    if n < dim:
        _, vectors = jnp.linalg.eigh(centred @ centred.T)
        axes = centred.T @ vectors  # [D, n]: X_c.T u_i, in the row space by construction.
    else:
        _, axes = jnp.linalg.eigh(centred.T @ centred)  # [D, D]
    norms = jnp.linalg.norm(axes, axis=0)
    keep = norms > _RANK_TOLERANCE * jnp.max(norms)
    axes = jnp.where(keep, axes / jnp.where(keep, norms, 1.0), 0.0)
    return Coordinates(center=center, axes=axes, train=centred @ axes,
                       dev=(dev_features - center) @ axes, metric=axes.T @ axes)
