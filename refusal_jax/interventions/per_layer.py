"""Constructor arguments as per-layer leaves: a value shared by all layers, or one per layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# A position bound with no limit (the default ActAdd position_stop).
UNBOUNDED_POSITION = int(np.iinfo(np.int32).max)
# Tolerance of the orthonormality check of a basis (float32 Gram-Schmidt reaches ~1e-6).
_ORTHONORMAL_ATOL = 1e-3


def per_layer(value: object, n_layers: int, vector_ndim: int, name: str) -> jax.Array:
    """``value`` of ndim ``vector_ndim`` (shared) or ``vector_ndim + 1`` (per layer) -> [L, ...]."""
    array = jnp.asarray(value, dtype=jnp.float32)
    if array.ndim == vector_ndim:
        return jnp.broadcast_to(array, (n_layers, *array.shape))
    if array.ndim == vector_ndim + 1 and array.shape[0] == n_layers:
        return array
    raise ValueError(
        f"{name} must have {vector_ndim} dims (shared by all layers) or {vector_ndim + 1} with a "
        f"leading axis of n_layers={n_layers}; got shape {array.shape}"
    )


def per_layer_basis(basis: object, n_layers: int) -> jax.Array:
    """An orthonormal basis [k, D] or [L, k, D] -> [L, k, D] (checked before broadcasting)."""
    array = jnp.asarray(basis, dtype=jnp.float32)
    check_orthonormal(array, "basis")
    return per_layer(array, n_layers, 2, "basis")


def position_bound(value: object, n_layers: int, name: str) -> jax.Array:
    """A scalar or per-prompt [B] int bound -> [L] or [L, B] int32."""
    array = jnp.asarray(value, dtype=jnp.int32)
    if array.ndim > 1:
        raise ValueError(
            f"{name} must be a scalar or one value per prompt ([B]); got shape {array.shape}"
        )
    return jnp.broadcast_to(array, (n_layers, *array.shape))


def unit_rows(direction: jax.Array, name: str) -> jax.Array:
    """``direction`` [..., D] with every row normalised; a zero row is an error."""
    norms = jnp.linalg.norm(direction, axis=-1, keepdims=True)
    if _is_concrete(norms) and not np.all(np.asarray(norms) > 0):
        raise ValueError(f"{name} has a zero (or NaN) row; it cannot be normalised")
    return direction / norms


def check_orthonormal(basis: jax.Array, name: str) -> None:
    """Rows must be orthonormal or zero (zero rows are unused directions)."""
    if not _is_concrete(basis):
        return
    rows = np.asarray(basis, np.float64)
    gram = np.einsum("...kd,...jd->...kj", rows, rows)
    diagonal = np.diagonal(gram, axis1=-2, axis2=-1)
    used = (diagonal > 0.5).astype(np.float64)
    expected = used[..., :, None] * np.eye(gram.shape[-1])
    if not np.allclose(gram, expected, atol=_ORTHONORMAL_ATOL):
        error = np.abs(gram - expected).max()
        raise ValueError(
            f"{name} rows must be orthonormal (or zero for unused directions); V V^T is off by "
            f"{error:.3g}. Orthonormalise it first (e.g. Gram-Schmidt / QR of V^T)."
        )


def _is_concrete(array: jax.Array) -> bool:
    return not isinstance(array, jax.core.Tracer)
