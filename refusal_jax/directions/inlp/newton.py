"""Newton's method for a :class:`~refusal_jax.directions.inlp.problem.Problem`, the default
solver.

Each step solves the Jacobi-scaled ``(r + 1) x (r + 1)`` Newton system by LU (a Cholesky solve
gave results 1e-4 apart between one and two processes, tests/test_multiprocess.py) and takes the
largest of the steps 1, 1/2, ..., 1/2^9 that satisfies the Armijo condition, all evaluated at
once (no nested loop). Near-separable activations make L-BFGS crawl (hundreds of steps per
classifier); Newton needs about ten, at ``O(n r^2 + r^3)`` each, so it is the default while
``r = min(n, D)`` stays in the hundreds. Convergence is declared as for L-BFGS (gradient norm in
the coordinates where the curvature at zero is one <= tolerance), but the steps go on to
``_NEWTON_POLISH`` times the tolerance, or until float32 stops improving: one or two steps more,
which make the result independent of rounding upstream.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from refusal_jax.directions.inlp.problem import Fit, Problem, Solver, unit_curvature

# Newton steps try the step sizes 1, 1/2, ..., 1/2^(_NEWTON_HALVINGS - 1).
_NEWTON_HALVINGS = 10
# Newton polishes the solution down to this fraction of the convergence tolerance.
_NEWTON_POLISH = 1e-2
# The line search treats a rise of the objective by at most this many float32 ULPs as none.
_VALUE_ULPS = 8


class _NewtonState(NamedTuple):
    params: jax.Array  # [r + 1]: coefficients, then the intercept
    logits: jax.Array  # [n]: design @ params
    gradient: jax.Array  # [r + 1]: of the objective at params
    steps: jax.Array
    gradient_norm: jax.Array  # of gradient * to_unit_curvature
    progressed: jax.Array


class _NewtonSystem(NamedTuple):
    design: jax.Array  # [n, r + 1]: the coordinates and a column of ones
    penalty: jax.Array  # [r + 1, r + 1]: Hessian of the penalty (none on the intercept)
    to_unit_curvature: jax.Array  # [r + 1]
    absent: jax.Array  # [r + 1]: dropped axes (no data, no penalty); their coefficient stays 0


def _newton_system(problem: Problem) -> _NewtonSystem:
    n, rank = problem.train.shape
    design = jnp.concatenate([problem.train, jnp.ones((n, 1), problem.train.dtype)], axis=1)
    penalty = jnp.zeros((rank + 1, rank + 1), jnp.float32).at[:rank, :rank].set(
        2.0 * problem.lam * problem.metric)
    to_unit_curvature = unit_curvature(design, jnp.diagonal(penalty))
    return _NewtonSystem(design, penalty, to_unit_curvature, to_unit_curvature == 0)


def _newton_gradient(problem: Problem, system: _NewtonSystem, logits: jax.Array,
                     penalty_gradient: jax.Array) -> jax.Array:
    residual = jax.nn.sigmoid(logits) - problem.labels
    return system.design.T @ residual / problem.train.shape[0] + penalty_gradient


def _newton_init(problem: Problem) -> _NewtonState:
    system = _newton_system(problem)
    params = jnp.zeros(problem.train.shape[1] + 1, jnp.float32)
    logits = jnp.zeros(problem.train.shape[0], jnp.float32)
    gradient = _newton_gradient(problem, system, logits, system.penalty @ params)
    return _NewtonState(params=params, logits=logits, gradient=gradient, steps=jnp.int32(0),
                        gradient_norm=jnp.linalg.norm(gradient * system.to_unit_curvature),
                        progressed=jnp.bool_(True))


def _newton_step(problem: Problem, state: _NewtonState, *, solve) -> _NewtonState:
    """One damped Newton step. Along the step the logits and the penalty's gradient are affine
    in the step size, so the line search and the next gradient cost three matrix-vector
    products, not one per trial step. ``solve(matrix, rhs)`` solves the Newton system."""
    system = _newton_system(problem)
    params, logits, gradient, n = state.params, state.logits, state.gradient, problem.train.shape[0]
    probabilities = jax.nn.sigmoid(logits)
    weights = probabilities * (1.0 - probabilities) / n
    hessian = (system.design.T * weights) @ system.design + system.penalty
    scale = jax.lax.rsqrt(jnp.maximum(jnp.diagonal(hessian), jnp.finfo(jnp.float32).tiny))
    scaled = (hessian * scale[:, None] * scale[None, :]
              + jnp.diag(system.absent.astype(jnp.float32)))
    direction = -scale * solve(scaled, scale * gradient)
    direction = jnp.where(jnp.isfinite(direction), direction, -gradient)  # never a NaN step

    step_sizes = 0.5 ** jnp.arange(_NEWTON_HALVINGS, dtype=jnp.float32)
    logits_change = system.design @ direction
    penalty_at_params, penalty_change = system.penalty @ params, system.penalty @ direction

    def objective(logits, penalty):  # logits [..., n], penalty [...] -> [...]
        return jnp.mean(jax.nn.softplus(logits) - problem.labels * logits, axis=-1) + penalty

    penalty = 0.5 * params @ penalty_at_params
    value = objective(logits, penalty)
    values = objective(logits + step_sizes[:, None] * logits_change,
                       penalty + step_sizes * (direction @ penalty_at_params)
                       + 0.5 * step_sizes**2 * (direction @ penalty_change))
    # Near the optimum the decrease is below float32's resolution of the value, and rounding
    # alone would then reject the full Newton step: values within a few ULPs count as no rise
    # (the approximate Armijo condition of Hager and Zhang).
    slack = _VALUE_ULPS * jnp.finfo(jnp.float32).eps * jnp.abs(value)
    accepted = values <= value + 1e-4 * step_sizes * (gradient @ direction) + slack
    best = jnp.where(jnp.any(accepted), jnp.argmax(accepted), jnp.argmin(values))
    moved = jnp.any(accepted) | (values[best] <= value)
    step = jnp.where(moved, step_sizes[best], 0.0)
    logits = logits + step * logits_change
    gradient = _newton_gradient(problem, system, logits, penalty_at_params + step * penalty_change)
    gradient_norm = jnp.linalg.norm(gradient * system.to_unit_curvature)
    # Keep stepping while the gradient still shrinks (float32 values cannot resolve the last
    # decreases), so that the result does not depend on where the tolerance was crossed.
    return _NewtonState(params=params + step * direction, logits=logits, gradient=gradient,
                        steps=state.steps + 1, gradient_norm=gradient_norm,
                        progressed=moved & (gradient_norm < state.gradient_norm))


def _newton_running(state: _NewtonState, max_steps, tolerance) -> jax.Array:
    return ((state.steps < max_steps) & (state.gradient_norm > _NEWTON_POLISH * tolerance)
            & state.progressed)


def _newton_fit(problem: Problem, state: _NewtonState, tolerance) -> Fit:
    rank = problem.train.shape[1]
    return Fit(coefficients=state.params[:rank], intercept=state.params[rank],
               gradient_norm=state.gradient_norm, steps=state.steps,
               converged=state.gradient_norm <= tolerance)


def newton_solver(solve=jnp.linalg.solve) -> Solver:
    """Newton's method whose steps solve their linear system with ``solve(matrix, rhs)``."""
    return Solver(_newton_init, functools.partial(_newton_step, solve=solve), _newton_running,
                  _newton_fit)
