"""LEACE: least-squares concept erasure (Belrose et al. 2023) for the binary harmful/harmless label.

Conventions: labels 1 = harmful, 0 = harmless; features are pair-major ``(*pairs, n, D)`` as in
:mod:`refusal_jax.directions.inlp` (use ``pair_major`` on ``(n, P, L, D)`` captures), and every
output keeps the leading pair axes.

The eraser. With ``mean`` the feature mean, ``Sigma`` the feature covariance and
``sigma = Cov(x, z)`` the cross-covariance with the 0/1 label ``z`` (a ``D``-vector: the concept
has ``k = 1`` dimension), LEACE is the oblique projection

    erase(x) = x - ((x - mean) @ A.T) @ B,    A = (Sigma^+ sigma)^T / sqrt(q),
                                              B = sigma^T / sqrt(q),    q = sigma^T Sigma^+ sigma,

with ``A`` and ``B`` of shape ``(k, D) = (1, D)`` and ``mean`` of shape ``(D,)``. This is the
closed form ``x - W^+ P W (x - mean)`` of the paper (``W`` the whitening map, ``P`` the orthogonal
projection onto ``W sigma``) written without any ``D x D`` matrix, so it applies directly as a
residual-stream intervention from these three arrays. ``A @ B.T = 1``, so erasing twice is the
same as erasing once, and ``Cov(erase(x), z) = sigma - B.T (A sigma) = 0``: the erased class
means coincide, hence no linear classifier separates the classes better than a constant.

Covariance estimates from ``n < D`` examples are singular; ``Sigma^+`` is the pseudo-inverse from
the thin SVD of the centred data, with singular values at or below ``rcond * s_max`` (an
eigenvalue floor of ``(rcond * s_max)^2 / n`` on ``Sigma``) treated as zero. ``B`` uses ``sigma``
itself (it lies in the span of the centred data), so the guarantees above hold exactly for the
data the eraser was fitted on whatever the floor. A label with equal class means leaves nothing
to erase: ``A = B = 0``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from refusal_jax.directions.validation import (
    check_matching,
    validated_features,
    validated_labels,
)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["mean", "A", "B"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class LeaceEraser:
    """``erase(x) = x - ((x - mean) @ A.T) @ B``; shapes ``mean [..., D]``, ``A, B [..., 1, D]``."""

    mean: jax.Array
    A: jax.Array
    B: jax.Array


def _fit_leace_one_pair(features: jax.Array, labels: jax.Array, rcond) -> LeaceEraser:
    n = features.shape[0]
    mean = jnp.mean(features, axis=0)
    centered = features - mean
    centered_labels = labels.astype(jnp.float32) - jnp.mean(labels.astype(jnp.float32))
    left, singular_values, right_t = jnp.linalg.svd(centered, full_matrices=False)
    keep = singular_values > rcond * singular_values[0]
    label_coordinates = jnp.where(keep, left.T @ centered_labels, 0.0)
    inverse_singular_values = jnp.where(keep, 1.0 / jnp.where(keep, singular_values, 1.0), 0.0)
    # sigma = X_c^T z_c / n = V S U^T z_c / n, so Sigma^+ sigma = V S^-1 U^T z_c and
    # q = sigma^T Sigma^+ sigma = |U^T z_c|^2 / n (over the kept components).
    cross_covariance = centered.T @ centered_labels / n
    whitened_direction = right_t.T @ (inverse_singular_values * label_coordinates)
    q = jnp.sum(label_coordinates**2) / n
    erasable = q > jnp.finfo(jnp.float32).eps * jnp.mean(centered_labels**2)
    norm = jnp.sqrt(jnp.where(erasable, q, 1.0))
    a = jnp.where(erasable, whitened_direction / norm, 0.0)
    b = jnp.where(erasable, cross_covariance / norm, 0.0)
    return LeaceEraser(mean=mean, A=a[None, :], B=b[None, :])


@jax.jit
def _fit_leace_pairs(features: jax.Array, labels: jax.Array, rcond) -> LeaceEraser:
    return jax.vmap(_fit_leace_one_pair, in_axes=(0, None, None))(features, labels, rcond)


def fit_leace(features: ArrayLike, labels: ArrayLike, *, rcond: float | None = None
              ) -> LeaceEraser:
    """Fits one LEACE eraser per pair.

    Args:
      features: ``[*pairs, n, D]``.
      labels: ``[n]``, 1 = harmful, 0 = harmless; both classes must occur.
      rcond: relative singular-value cutoff of the pseudo-inverse; default
        ``max(n, D) * float32 eps`` (numpy's ``pinv`` convention).

    Returns:
      :class:`LeaceEraser` with leaves ``mean [*pairs, D]``, ``A, B [*pairs, 1, D]``.
    """
    features = validated_features(features, min_ndim=2)
    labels = validated_labels(labels)
    check_matching(features, labels)
    pair_shape, (n, dim) = features.shape[:-2], features.shape[-2:]
    if rcond is None:
        rcond = max(n, dim) * float(jnp.finfo(jnp.float32).eps)
    if not 0.0 <= rcond < 1.0:
        raise ValueError(f"rcond must lie in [0, 1); got {rcond}.")
    eraser = _fit_leace_pairs(features.reshape((-1, n, dim)), jnp.asarray(labels), rcond)
    return jax.tree.map(lambda leaf: leaf.reshape(pair_shape + leaf.shape[1:]), eraser)


def erase(eraser: LeaceEraser, x: ArrayLike) -> jax.Array:
    """Applies one pair's eraser (``mean [D]``, ``A, B [1, D]``) to ``x [..., D]``.

    Computes in float32 and returns ``x``'s dtype. For a batch of erasers, ``jax.vmap`` this.
    """
    x = jnp.asarray(x)
    if eraser.mean.ndim != 1:
        raise ValueError(f"erase takes a single pair's eraser (mean of shape (D,)); got mean of "
                         f"shape {eraser.mean.shape}. Index the pair, or jax.vmap over pairs.")
    if x.shape[-1] != eraser.mean.shape[0]:
        raise ValueError(f"x has width {x.shape[-1]} but the eraser was fitted on width "
                         f"{eraser.mean.shape[0]}.")
    x32 = x.astype(jnp.float32)
    erased = x32 - ((x32 - eraser.mean) @ eraser.A.T) @ eraser.B
    return erased.astype(x.dtype)
