"""One L2-regularised logistic regression in row-space coordinates, and what a solver of it is.

The objective is scikit-learn's ``LogisticRegression(C=C)``: ``mean BCE + lam * ||w||^2`` with
``lam = 1 / (2 * C * n_train)`` and an unpenalised intercept, written in the coordinates of
:mod:`refusal_jax.directions.inlp.coordinates` (``w = axes @ u``, ``||w||^2 = u @ metric @ u``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Problem(NamedTuple):
    """One logistic regression ``mean BCE(train @ u + b) + lam * u @ metric @ u`` in coordinates.

    ``lam = 1 / (2 C n)``; the intercept ``b`` is not penalised.
    """

    train: jax.Array  # [n, r]
    metric: jax.Array  # [r, r]
    labels: jax.Array  # [n] float32
    lam: jax.Array  # []


def logistic_problem(train: jax.Array, metric: jax.Array, labels: jax.Array,
                     inverse_regularization) -> Problem:
    """The problem of ``train`` [n, r] coordinates with 0/1 ``labels`` and ``C`` =
    ``inverse_regularization``."""
    n = train.shape[0]
    return Problem(train=train, metric=metric, labels=labels.astype(jnp.float32),
                   lam=1.0 / (2.0 * inverse_regularization * n))


class Fit(NamedTuple):
    """A solver's classifier in coordinates, and how the solve went."""

    coefficients: jax.Array  # [r]: w = axes @ coefficients
    intercept: jax.Array  # []: for centred features
    gradient_norm: jax.Array
    steps: jax.Array
    converged: jax.Array


class Solver(NamedTuple):
    """An iterative solver as pure functions of an explicit state.

    ``init(problem)`` starts at ``u = 0, b = 0``; ``step(problem, state)`` is one iteration;
    ``running(state, max_steps, tolerance)`` says whether to take another; ``fit(problem, state,
    tolerance)`` reads the classifier off. INLP interleaves these per pair in one loop
    (:mod:`refusal_jax.directions.inlp.pair`), so that a pair starts its next classifier while
    others still solve.
    """

    init: Callable[[Problem], Any]
    step: Callable[[Problem, Any], Any]
    running: Callable[[Any, Any, Any], jax.Array]
    fit: Callable[[Problem, Any, Any], Fit]


def solve(solver: Solver, problem: Problem, max_steps, tolerance) -> Fit:
    """Runs ``solver`` on ``problem`` to its stopping rule."""
    state = jax.lax.while_loop(lambda s: solver.running(s, max_steps, tolerance),
                               lambda s: solver.step(problem, s), solver.init(problem))
    return solver.fit(problem, state, tolerance)


def unit_curvature(features: jax.Array, penalty_diagonal: jax.Array) -> jax.Array:
    """Per coordinate, ``1 / sqrt`` of the logistic loss's curvature at zero (0 where it is 0)."""
    curvature = jnp.sum(features**2, axis=0) / (4.0 * features.shape[0]) + penalty_diagonal
    present = curvature > 0
    return jnp.where(present, jax.lax.rsqrt(jnp.where(present, curvature, 1.0)), 0.0)
