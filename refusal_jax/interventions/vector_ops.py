"""Pure edits of activations ``x`` [..., D] (no layers, no sites).

``direction`` is a [D] vector, ``r_hat`` a unit one; ``basis`` ``V`` is [k, D] with orthonormal
rows, where a row of zeros is unused and contributes nothing. Contractions run at
``Precision.HIGHEST``, so a removed component really is zero on accelerators too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST
Array = jax.Array
# How far from 1 the norm of a unit vector may be (float32 normalisation reaches ~1e-7).
_UNIT_ATOL = 1e-4


def coordinates(x: Array, basis: Array) -> Array:
    """Coordinates ``x @ basis.T`` ([..., k]) of ``x`` along the rows of ``basis``."""
    return jnp.einsum("...d,kd->...k", x, basis, precision=HIGHEST)


def combine(coords: Array, basis: Array) -> Array:
    """The vector ``coords @ basis`` ([..., D])."""
    return jnp.einsum("...k,kd->...d", coords, basis, precision=HIGHEST)


def add_direction(x: Array, direction: Array, coeff: Array | float) -> Array:
    """Activation addition: ``x + coeff * direction``."""
    return x + coeff * direction


def ablate(x: Array, r_hat: Array) -> Array:
    """Directional ablation: ``x - (x . r_hat) r_hat`` for a unit ``r_hat`` [D].

    Raises ValueError when a concrete ``r_hat`` is not of unit norm (the formula would then
    leave part of the direction in ``x``); ``directional_ablation`` normalises for you.
    """
    check_unit(r_hat, "r_hat")
    return project_out(x, r_hat[None, :])


def check_unit(vector: Array, name: str) -> None:
    """Raises ValueError unless ``vector`` [D] has unit norm; traced values are not checked."""
    if isinstance(vector, jax.core.Tracer):
        return
    norm = float(np.linalg.norm(np.asarray(vector, np.float64)))
    if not abs(norm - 1.0) <= _UNIT_ATOL:
        raise ValueError(f"{name} must be a unit vector, got norm {norm:.6g}; pass "
                         f"{name} / norm({name}), or use directional_ablation, which normalises")


def project_out(x: Array, basis: Array) -> Array:
    """Nullspace projection ``P x`` with ``P = I - V^T V``: ``x - (x V^T) V``."""
    return reflect(x, basis, 1.0)


def reflect(x: Array, basis: Array, alpha: Array | float) -> Array:
    """Counterfactual map ``P_a x = a P x + (1 - a) x = x - a (x V^T) V``.

    ``alpha = 1`` is nullspace projection; ``alpha = 2`` negates the component inside the
    subspace (a reflection, an involution).
    """
    return x - alpha * combine(coordinates(x, basis), basis)


def clamp_subspace(x: Array, basis: Array, target: Array) -> Array:
    """Set the coordinates of ``x`` in span(V) to those of the point ``target`` [D].

    ``x - ((x - target) V^T) V``: the part of ``x`` outside the subspace is kept. Idempotent.
    """
    return oblique_erase(x, basis, basis, target)


def oblique_erase(x: Array, read: Array, write: Array, mean: Array) -> Array:
    """Low-rank affine eraser (LEACE form): ``x - ((x - mean) @ read.T) @ write``.

    ``read`` and ``write`` are [k, D] (LEACE's ``A`` and ``B``), ``mean`` [D].
    """
    return x - combine(coordinates(x - mean, read), write)
