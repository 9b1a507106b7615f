"""The k policy: how many of a pair's INLP directions, in the order found, are used."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from refusal_jax.directions.inlp.result import INLPResult

K_POLICIES = ("none", "fixed", "acc99", "acc95")
_POLICY_THRESHOLDS = {"acc99": 0.99, "acc95": 0.95}


def select_k(result: INLPResult, policy: str = "none", k: int | None = None) -> jax.Array:
    """Number of leading directions each pair keeps, ``[...]`` int32.

    ``none``: all accepted directions. ``fixed``: ``min(k, n_directions)``. ``acc99`` /
    ``acc95``: the number of accepted classifiers whose dev accuracy is at least 0.99 / 0.95
    (a count, not a prefix length, as in the paper); the kept directions are always the first
    ones in the order found.
    """
    if policy not in K_POLICIES:
        raise ValueError(f"unknown k policy {policy!r}; choose one of {K_POLICIES}.")
    if (policy == "fixed") != (k is not None):
        raise ValueError("pass k exactly when policy='fixed' (got policy="
                         f"{policy!r}, k={k!r}).")
    if policy == "none":
        return result.n_directions
    if policy == "fixed":
        if int(k) < 0:
            raise ValueError(f"k must be >= 0; got {k}.")
        return jnp.minimum(result.n_directions, k).astype(jnp.int32)
    slots = jnp.arange(result.dev_accuracies.shape[-1])
    accepted = slots < result.n_directions[..., None]
    good = accepted & (result.dev_accuracies >= _POLICY_THRESHOLDS[policy])
    return jnp.sum(good, axis=-1).astype(jnp.int32)


def leading_basis(result: INLPResult, policy: str = "none", k: int | None = None) -> jax.Array:
    """``result.basis`` with every row from the policy's k on set to zero, ``[..., N, D]``.

    Zero rows do nothing in ``x - (x @ V.T) @ V``, so the masked basis can be used directly.
    """
    keep = select_k(result, policy, k)
    slots = jnp.arange(result.basis.shape[-2])
    return jnp.where((slots < keep[..., None])[..., None], result.basis, 0.0)
