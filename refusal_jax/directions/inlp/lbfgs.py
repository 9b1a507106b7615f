"""The L-BFGS solver of a :class:`~refusal_jax.directions.inlp.problem.Problem` (optax, zoom
line search).

The solver's variable is ``v = u / scale`` with ``scale`` = 1 / sqrt of the objective's Hessian
diagonal at zero (``diag(train.T train) / 4n + 2 lam diag(metric)``): an exact change of
variables that preconditions; the optimum is unchanged. On near-separable activations it needs
hundreds of steps per classifier, where Newton's method needs about ten.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from refusal_jax.directions.inlp.problem import Fit, Problem, Solver, unit_curvature


class _LBFGSState(NamedTuple):
    params: tuple[jax.Array, jax.Array]  # (v [r], b [])
    optimizer: Any
    steps: jax.Array
    gradient_norm: jax.Array


def _lbfgs_scale(problem: Problem) -> jax.Array:
    return unit_curvature(problem.train, 2.0 * problem.lam * jnp.diagonal(problem.metric))


def _lbfgs_objective(problem: Problem):
    scale = _lbfgs_scale(problem)

    def objective(params):
        v, b = params
        u = v * scale
        logits = problem.train @ u + b
        cross_entropy = jnp.mean(jax.nn.softplus(logits) - problem.labels * logits)
        return cross_entropy + problem.lam * u @ (problem.metric @ u)

    return objective


_LBFGS = optax.lbfgs()


def _lbfgs_init(problem: Problem) -> _LBFGSState:
    params = (jnp.zeros(problem.train.shape[1], jnp.float32), jnp.zeros((), jnp.float32))
    gradient = jax.grad(_lbfgs_objective(problem))(params)
    return _LBFGSState(params=params, optimizer=_LBFGS.init(params), steps=jnp.int32(0),
                       gradient_norm=optax.tree.norm(gradient))


def _lbfgs_step(problem: Problem, state: _LBFGSState) -> _LBFGSState:
    objective = _lbfgs_objective(problem)
    value, grad = optax.value_and_grad_from_state(objective)(state.params,
                                                            state=state.optimizer)
    updates, optimizer = _LBFGS.update(grad, state.optimizer, state.params, value=value,
                                       grad=grad, value_fn=objective)
    return _LBFGSState(params=optax.apply_updates(state.params, updates), optimizer=optimizer,
                       steps=state.steps + 1,
                       gradient_norm=optax.tree.norm(optax.tree.get(optimizer, "grad")))


def _lbfgs_running(state: _LBFGSState, max_steps, tolerance) -> jax.Array:
    return (state.steps < max_steps) & (state.gradient_norm > tolerance)


def _lbfgs_fit(problem: Problem, state: _LBFGSState, tolerance) -> Fit:
    v, b = state.params
    return Fit(coefficients=v * _lbfgs_scale(problem), intercept=b,
               gradient_norm=state.gradient_norm, steps=state.steps,
               converged=state.gradient_norm <= tolerance)


LBFGS_SOLVER = Solver(_lbfgs_init, _lbfgs_step, _lbfgs_running, _lbfgs_fit)
