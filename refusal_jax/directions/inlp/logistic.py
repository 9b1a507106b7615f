"""L2-regularised logistic regression, ``LogisticRegression(C=C)`` of scikit-learn, in JAX.

Every optimum lies in the row space of the centred training features, so the fit works in
coordinates of it (:mod:`refusal_jax.directions.inlp.coordinates`): with a few hundred prompts
and a residual width in the thousands, the solver works on ``n x n`` arrays. The change of
variables is exact, so the classifier returned for the raw data is the original problem's
optimum. Two solvers reach it: Newton's method (default; :mod:`~refusal_jax.directions.inlp.
newton`) and optax's L-BFGS (``solver="lbfgs"``; :mod:`~refusal_jax.directions.inlp.lbfgs`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from refusal_jax.directions.inlp.coordinates import row_space_coordinates
from refusal_jax.directions.inlp.lbfgs import LBFGS_SOLVER
from refusal_jax.directions.inlp.newton import newton_solver
from refusal_jax.directions.inlp.problem import Solver, logistic_problem, solve
from refusal_jax.directions.inlp.serial import SERIAL_SOLVE
from refusal_jax.directions.validation import (
    check_matching,
    validated_features,
    validated_labels,
)

SOLVERS = ("newton", "lbfgs")


def solver_named(name: str, *, serial: bool = False) -> Solver:
    """The solver called ``name``; ``serial`` solves batched Newton systems one at a time
    (:mod:`refusal_jax.directions.inlp.serial`)."""
    if name == "lbfgs":
        return LBFGS_SOLVER
    return newton_solver(SERIAL_SOLVE if serial else jnp.linalg.solve)


def check_solver_options(inverse_regularization: float, max_steps: int, tolerance: float,
                         solver: str) -> None:
    """Raises on an unknown solver, ``C <= 0``, no step, or a negative tolerance."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}.")
    if not inverse_regularization > 0:
        raise ValueError(f"inverse_regularization (C) must be > 0; got {inverse_regularization}.")
    if max_steps < 1:
        raise ValueError(f"the solver needs at least one step; got max_steps={max_steps}.")
    if not tolerance >= 0:
        raise ValueError(f"the solver tolerance must be >= 0; got {tolerance}.")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["weight", "bias", "gradient_norm", "steps", "converged"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class LogisticRegressionFit:
    """A fitted classifier ``label = 1 if x @ weight + bias > 0 else 0`` for the raw features.

    ``gradient_norm`` is the norm of the objective's gradient in the solver's preconditioned
    coordinates at the returned point; ``converged`` says it fell to the tolerance within the
    step budget.
    """

    weight: jax.Array  # [D]
    bias: jax.Array  # []
    gradient_norm: jax.Array  # []
    steps: jax.Array  # [] int32
    converged: jax.Array  # [] bool


@functools.partial(jax.jit, static_argnames=("solver",))
def _fit_logistic_regression(features, labels, inverse_regularization, max_steps, tolerance, *,
                             solver):
    coordinates = row_space_coordinates(features, features[:0])
    problem = logistic_problem(coordinates.train, coordinates.metric, labels,
                               inverse_regularization)
    fit = solve(solver_named(solver), problem, max_steps, tolerance)
    weight = coordinates.axes @ fit.coefficients
    return LogisticRegressionFit(weight=weight, bias=fit.intercept - coordinates.center @ weight,
                                 gradient_norm=fit.gradient_norm, steps=fit.steps,
                                 converged=fit.converged)


def fit_logistic_regression(features: ArrayLike, labels: ArrayLike, *,
                            inverse_regularization: float = 0.1, max_steps: int = 1000,
                            tolerance: float = 1e-5, solver: str = "newton"
                            ) -> LogisticRegressionFit:
    """Fits ``LogisticRegression(C=inverse_regularization)`` (L2, free intercept) to ``(n, D)``.

    ``tolerance`` bounds the gradient norm in coordinates where the loss's curvature at zero is
    one; ``max_steps`` bounds the solver's iterations. ``solver``: ``"newton"`` (default) or
    ``"lbfgs"`` (optax L-BFGS with zoom line search); both reach the same optimum.
    """
    features = validated_features(features, min_ndim=2)
    if features.ndim != 2:
        raise ValueError(f"features must be (n, D); got shape {features.shape}. Use fit_inlp for "
                         "batched pairs, or jax.vmap.")
    labels = validated_labels(labels)
    check_matching(features, labels)
    check_solver_options(inverse_regularization, max_steps, tolerance, solver)
    return _fit_logistic_regression(features, jnp.asarray(labels), inverse_regularization,
                                    max_steps, tolerance, solver=solver)
