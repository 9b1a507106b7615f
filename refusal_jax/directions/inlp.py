"""Iterative nullspace projection (INLP; Ravfogel et al. 2020) as METHOD.md section 4 specifies.

Conventions (fixed here once):
- Labels: 1 = harmful, 0 = harmless.
- Features are pair-major, ``(*pairs, n, D)``: the leading axes index (EOI position, layer) pairs
  and every output keeps them in front. Activations captured as ``(n, P, L, D)`` become
  ``(P, L, n, D)`` with :func:`pair_major`. The jitted core :func:`fit_inlp_split` takes one flat
  leading pair axis, works through it as a queue (:func:`_fit_pairs`), and is sharded along it.
- ``N = max_directions`` slots per pair. Directions are kept in the order found: row ``i`` of
  ``basis`` (``V`` in METHOD.md) is the ``i``-th accepted classifier normal, Gram-Schmidt
  orthonormalised against the earlier rows and oriented so that harmful examples project higher
  than harmless ones. Rows after the last accepted direction are zero, so shapes are static. The
  nullspace projection is ``x - (x @ basis.T) @ basis``; no ``D x D`` matrix is formed anywhere.

Each classifier is an L2-regularised logistic regression: it minimises ``mean BCE + lam *
||w||^2`` with ``lam = 1 / (2 * C * n_train)`` and an unpenalised intercept, the optimum of
scikit-learn's ``LogisticRegression(C=C)``. Every optimum lies in the row space of the centred
training features, and INLP's projections keep the data in that space, so each pair is first
rewritten in coordinates of it (:func:`_coordinates`): with a few hundred prompts and a residual
width in the thousands, the solver works on ``n x n`` arrays. The change of variables is exact
(the metric of the coordinates is carried along), so the optimum, and the classifier returned
for the raw data, are those of the original problem. Two solvers reach it: Newton's method
(default; about ten steps per classifier) and optax's L-BFGS with zoom line search (``solver=
"lbfgs"``), which needs hundreds of steps on near-separable activations.

Stop rule (default): stop at the first classifier whose dev accuracy is no better than the
majority-class rate of the dev split plus ``accuracy_margin``; that classifier is not added.
``reference=True`` reproduces the published code instead: a non-stratified dev split, the
absolute rule "stop when accuracy < 0.55", and the failing classifier added before stopping.
Both modes balance the classes to the smaller one before splitting, and both stop early when
a classifier normal lies (numerically) inside the span of the earlier directions.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

K_POLICIES = ("none", "fixed", "acc99", "acc95")
_POLICY_THRESHOLDS = {"acc99": 0.99, "acc95": 0.95}

# A row-space axis shorter than this fraction of the longest one is numerically absent (the
# centred data's rank is below min(n, D)) and is dropped.
_RANK_TOLERANCE = 1e-5
# Newton steps try the step sizes 1, 1/2, ..., 1/2^(_NEWTON_HALVINGS - 1).
_NEWTON_HALVINGS = 10
# Newton polishes the solution down to this fraction of the convergence tolerance.
_NEWTON_POLISH = 1e-2
# The line search treats a rise of the objective by at most this many float32 ULPs as none.
_VALUE_ULPS = 8
# A new normal whose component orthogonal to the earlier directions is smaller than this
# fraction of its norm carries no new direction; INLP stops there.
_MIN_ORTHOGONAL_FRACTION = 1e-3
# Pairs worked on at once by INLP (see _fit_pairs).
DEFAULT_PAIRS_IN_FLIGHT = 16


# ----------------------------------------------------------------------------------------------
# Data split.


@dataclasses.dataclass(frozen=True)
class TrainDevSplit:
    """Indices into the example axis; both sorted ascending."""

    train_index: np.ndarray
    dev_index: np.ndarray


def train_dev_split(labels: ArrayLike, *, dev_fraction: float = 0.2, stratified: bool = True,
                    seed: int = 0) -> TrainDevSplit:
    """Deterministic train/dev split of binary labels, balanced to the smaller class.

    Both classes are first subsampled (seeded) to ``m = min(#label 0, #label 1)`` examples.
    Stratified (default): ``max(2, round(dev_fraction * m))`` examples of each class go to dev,
    so the dev majority rate is exactly 0.5. Non-stratified (the reference code's behaviour):
    the ``2m`` examples are shuffled together and the first ``max(4, int(dev_fraction * 2m))``
    form the dev split, whatever their labels.
    """
    labels = _validated_labels(labels)
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must lie in (0, 1); got {dev_fraction}.")
    harmful, harmless = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    per_class = min(harmful.size, harmless.size)
    if per_class < 3:
        raise ValueError(f"INLP needs at least 3 examples of each class for a train/dev split; got "
                         f"{harmful.size} harmful and {harmless.size} harmless.")
    rng = np.random.default_rng(seed)
    harmful = rng.permutation(harmful)[:per_class]
    harmless = rng.permutation(harmless)[:per_class]
    if stratified:
        dev_per_class = min(max(2, round(dev_fraction * per_class)), per_class - 1)
        dev = np.concatenate([harmful[:dev_per_class], harmless[:dev_per_class]])
        train = np.concatenate([harmful[dev_per_class:], harmless[dev_per_class:]])
    else:
        pooled = rng.permutation(np.concatenate([harmful, harmless]))
        n_dev = max(4, int(dev_fraction * pooled.size))
        dev, train = pooled[:n_dev], pooled[n_dev:]
        if np.unique(labels[train]).size < 2:
            raise ValueError("the non-stratified split left one class out of the training set; "
                             "use more examples or another seed.")
    return TrainDevSplit(train_index=np.sort(train), dev_index=np.sort(dev))


def _validated_labels(labels: ArrayLike) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of 0/1 values; got shape {labels.shape}.")
    if labels.size and not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must contain only 0 (harmless) and 1 (harmful); got values "
                         f"{np.unique(labels)[:10]}.")
    return labels.astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Coordinates of the training row space.


class _Coordinates(NamedTuple):
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


def _coordinates(train_features: jax.Array, dev_features: jax.Array) -> _Coordinates:
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
    return _Coordinates(center=center, axes=axes, train=centred @ axes,
                        dev=(dev_features - center) @ axes, metric=axes.T @ axes)


class _Problem(NamedTuple):
    """One logistic regression ``mean BCE(train @ u + b) + lam * u @ metric @ u`` in coordinates.

    ``lam = 1 / (2 C n)``; the intercept ``b`` is not penalised.
    """

    train: jax.Array  # [n, r]
    metric: jax.Array  # [r, r]
    labels: jax.Array  # [n] float32
    lam: jax.Array  # []


def _problem(train: jax.Array, metric: jax.Array, labels: jax.Array,
             inverse_regularization) -> _Problem:
    n = train.shape[0]
    return _Problem(train=train, metric=metric, labels=labels.astype(jnp.float32),
                    lam=1.0 / (2.0 * inverse_regularization * n))


class _Fit(NamedTuple):
    coefficients: jax.Array  # [r]: w = axes @ coefficients
    intercept: jax.Array  # []: for centred features
    gradient_norm: jax.Array
    steps: jax.Array
    converged: jax.Array


class _Solver(NamedTuple):
    """An iterative solver as pure functions of an explicit state.

    ``init(problem)`` starts at ``u = 0, b = 0``; ``step(problem, state)`` is one iteration;
    ``running(state, max_steps, tolerance)`` says whether to take another; ``fit(problem, state,
    tolerance)`` reads the classifier off. INLP interleaves these per pair in one loop
    (:func:`_pair_program`), so that a pair starts its next classifier while others still solve.
    """

    init: Callable[[_Problem], Any]
    step: Callable[[_Problem, Any], Any]
    running: Callable[[Any, Any, Any], jax.Array]
    fit: Callable[[_Problem, Any, Any], _Fit]


def _solve(solver: _Solver, problem: _Problem, max_steps, tolerance) -> _Fit:
    state = jax.lax.while_loop(lambda s: solver.running(s, max_steps, tolerance),
                               lambda s: solver.step(problem, s), solver.init(problem))
    return solver.fit(problem, state, tolerance)


def _unit_curvature(features: jax.Array, penalty_diagonal: jax.Array) -> jax.Array:
    """Per coordinate, ``1 / sqrt`` of the logistic loss's curvature at zero (0 where it is 0)."""
    curvature = jnp.sum(features**2, axis=0) / (4.0 * features.shape[0]) + penalty_diagonal
    present = curvature > 0
    return jnp.where(present, jax.lax.rsqrt(jnp.where(present, curvature, 1.0)), 0.0)


# L-BFGS (optax, zoom line search). The solver's variable is ``v = u / scale`` with ``scale`` =
# 1 / sqrt of the objective's Hessian diagonal at zero (``diag(train.T train) / 4n + 2 lam
# diag(metric)``): an exact change of variables that preconditions; the optimum is unchanged.


class _LBFGSState(NamedTuple):
    params: tuple[jax.Array, jax.Array]  # (v [r], b [])
    optimizer: Any
    steps: jax.Array
    gradient_norm: jax.Array


def _lbfgs_scale(problem: _Problem) -> jax.Array:
    return _unit_curvature(problem.train, 2.0 * problem.lam * jnp.diagonal(problem.metric))


def _lbfgs_objective(problem: _Problem):
    scale = _lbfgs_scale(problem)

    def objective(params):
        v, b = params
        u = v * scale
        logits = problem.train @ u + b
        cross_entropy = jnp.mean(jax.nn.softplus(logits) - problem.labels * logits)
        return cross_entropy + problem.lam * u @ (problem.metric @ u)

    return objective


_LBFGS = optax.lbfgs()


def _lbfgs_init(problem: _Problem) -> _LBFGSState:
    params = (jnp.zeros(problem.train.shape[1], jnp.float32), jnp.zeros((), jnp.float32))
    gradient = jax.grad(_lbfgs_objective(problem))(params)
    return _LBFGSState(params=params, optimizer=_LBFGS.init(params), steps=jnp.int32(0),
                       gradient_norm=optax.tree.norm(gradient))


def _lbfgs_step(problem: _Problem, state: _LBFGSState) -> _LBFGSState:
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


def _lbfgs_fit(problem: _Problem, state: _LBFGSState, tolerance) -> _Fit:
    v, b = state.params
    return _Fit(coefficients=v * _lbfgs_scale(problem), intercept=b,
                gradient_norm=state.gradient_norm, steps=state.steps,
                converged=state.gradient_norm <= tolerance)


# Newton's method. Each step solves the Jacobi-scaled ``(r + 1) x (r + 1)`` Newton system by LU
# (a Cholesky solve gave results 1e-4 apart between one and two processes, tests/
# test_multiprocess.py) and takes the largest of the steps 1, 1/2, ..., 1/2^9 that satisfies the
# Armijo condition, all evaluated at once (no nested loop). Near-separable activations make
# L-BFGS crawl (hundreds of steps per classifier); Newton needs about ten, at ``O(n r^2 + r^3)``
# each, so it is the default while ``r = min(n, D)`` stays in the hundreds. Convergence is
# declared as for L-BFGS (gradient norm in the coordinates where the curvature at zero is one
# <= tolerance), but the steps go on to ``_NEWTON_POLISH`` times the tolerance, or until float32
# stops improving: one or two steps more, which make the result independent of rounding upstream.


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


def _newton_system(problem: _Problem) -> _NewtonSystem:
    n, rank = problem.train.shape
    design = jnp.concatenate([problem.train, jnp.ones((n, 1), problem.train.dtype)], axis=1)
    penalty = jnp.zeros((rank + 1, rank + 1), jnp.float32).at[:rank, :rank].set(
        2.0 * problem.lam * problem.metric)
    to_unit_curvature = _unit_curvature(design, jnp.diagonal(penalty))
    return _NewtonSystem(design, penalty, to_unit_curvature, to_unit_curvature == 0)


def _newton_gradient(problem: _Problem, system: _NewtonSystem, logits: jax.Array,
                     penalty_gradient: jax.Array) -> jax.Array:
    residual = jax.nn.sigmoid(logits) - problem.labels
    return system.design.T @ residual / problem.train.shape[0] + penalty_gradient


def _newton_init(problem: _Problem) -> _NewtonState:
    system = _newton_system(problem)
    params = jnp.zeros(problem.train.shape[1] + 1, jnp.float32)
    logits = jnp.zeros(problem.train.shape[0], jnp.float32)
    gradient = _newton_gradient(problem, system, logits, system.penalty @ params)
    return _NewtonState(params=params, logits=logits, gradient=gradient, steps=jnp.int32(0),
                        gradient_norm=jnp.linalg.norm(gradient * system.to_unit_curvature),
                        progressed=jnp.bool_(True))


def _newton_step(problem: _Problem, state: _NewtonState, *, solve=jnp.linalg.solve
                 ) -> _NewtonState:
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


def _newton_fit(problem: _Problem, state: _NewtonState, tolerance) -> _Fit:
    rank = problem.train.shape[1]
    return _Fit(coefficients=state.params[:rank], intercept=state.params[rank],
                gradient_norm=state.gradient_norm, steps=state.steps,
                converged=state.gradient_norm <= tolerance)


# jaxlib 0.10's CPU LAPACK kernels split a batch of matrices over the intra-op thread pool and
# block until every part is done. When the devices of a CPU mesh each run such a kernel at once,
# every pool thread can end up waiting for parts queued behind the others: a deadlock, at 0% CPU,
# which INLP's batched eigendecompositions and Newton solves hit with pairs sharded over two
# devices of a two-core machine. So on a CPU mesh they go one matrix at a time (``serial``).


def _one_matrix_at_a_time(decomposition: Callable) -> Callable:
    """``decomposition`` whose batching rule maps it over the batch instead of batching it."""

    @jax.custom_batching.custom_vmap
    def unbatched(*operands):
        return decomposition(*operands)

    @unbatched.def_vmap
    def map_over_batch(axis_size, in_batched, *operands):
        operands = tuple(x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
                         for x, batched in zip(operands, in_batched))
        out = jax.lax.map(lambda xs: unbatched(*xs), operands)
        return out, jax.tree.map(lambda _: True, out)

    return unbatched


_SERIAL_SOLVE = _one_matrix_at_a_time(jnp.linalg.solve)


def _solver(name: str, *, serial: bool = False) -> _Solver:
    """The solver called ``name``; ``serial`` solves batched Newton systems one at a time."""
    if name == "lbfgs":
        return _Solver(_lbfgs_init, _lbfgs_step, _lbfgs_running, _lbfgs_fit)
    step = functools.partial(_newton_step, solve=_SERIAL_SOLVE) if serial else _newton_step
    return _Solver(_newton_init, step, _newton_running, _newton_fit)


SOLVERS = ("newton", "lbfgs")


# ----------------------------------------------------------------------------------------------
# Logistic regression.


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
    coordinates = _coordinates(features, features[:0])
    problem = _problem(coordinates.train, coordinates.metric, labels, inverse_regularization)
    fit = _solve(_solver(solver), problem, max_steps, tolerance)
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
    features = _validated_features(features, min_ndim=2)
    if features.ndim != 2:
        raise ValueError(f"features must be (n, D); got shape {features.shape}. Use fit_inlp for "
                         "batched pairs, or jax.vmap.")
    labels = _validated_labels(labels)
    _check_matching(features, labels)
    _check_solver_options(inverse_regularization, max_steps, tolerance, solver)
    return _fit_logistic_regression(features, jnp.asarray(labels), inverse_regularization,
                                    max_steps, tolerance, solver=solver)


# ----------------------------------------------------------------------------------------------
# INLP.


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["basis", "n_directions", "dev_accuracies", "majority_rate",
                                "first_direction", "converged", "solver_steps"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class INLPResult:
    """INLP output; ``...`` are the leading pair axes of the input features.

    Attributes:
      basis: ``[..., N, D]`` float32, ``V`` of METHOD.md: orthonormal rows in the order found,
        zero rows from ``n_directions`` on.
      n_directions: ``[...]`` int32, number of accepted directions.
      dev_accuracies: ``[..., N]`` float32, dev accuracy of each classifier fitted: the accepted
        ones and, at index ``n_directions`` (when ``< N``), the one that stopped the loop. In
        reference mode the stopping classifier is accepted, so it is the last accepted one.
        NaN for classifiers never fitted.
      majority_rate: ``[...]`` float32, the majority-class rate of the dev split.
      first_direction: ``[..., D]`` float32, unit normal of the first classifier (fitted on the
        unprojected data), oriented so that harmful examples score higher; equals ``basis[0]``
        when that classifier was accepted, and is reported even when it was not.
      converged: ``[..., N]`` bool, whether each classifier's solver reached its tolerance
        (False for classifiers never fitted).
      solver_steps: ``[..., N]`` int32, solver iterations each classifier used.
    """

    basis: jax.Array
    n_directions: jax.Array
    dev_accuracies: jax.Array
    majority_rate: jax.Array
    first_direction: jax.Array
    converged: jax.Array
    solver_steps: jax.Array


class _LoopState(NamedTuple):
    """Per-pair INLP state, in row-space coordinates (directions ``u`` with ``w = axes @ u``)."""

    iteration: jax.Array  # classifiers finished so far
    active: jax.Array
    n_directions: jax.Array
    train: jax.Array  # projected onto the nullspace of the accepted directions
    dev: jax.Array
    basis: jax.Array  # [N, r], orthonormal under the metric
    dev_accuracies: jax.Array
    converged: jax.Array
    solver_steps: jax.Array
    first_direction: jax.Array  # [r]
    metric: jax.Array  # [r, r], of the pair's coordinates
    solver: Any  # the state of the classifier being fitted on ``train``


def _orthogonal_complement(vector: jax.Array, basis: jax.Array, metric: jax.Array) -> jax.Array:
    """Component of ``vector`` metric-orthogonal to the rows of ``basis`` (Gram-Schmidt, twice)."""
    for _ in range(2):
        vector = vector - (basis @ (metric @ vector)) @ basis
    return vector


def _project_out(coordinates: jax.Array, unit: jax.Array, metric: jax.Array) -> jax.Array:
    """Rows ``x`` -> ``x (I - w w^T)`` for the unit ``w = axes @ unit``, in coordinates."""
    return coordinates - jnp.outer(coordinates @ unit, metric @ unit)


def _class_mean_gap(projections: jax.Array, is_harmful: jax.Array) -> jax.Array:
    harmful_mean = jnp.sum(jnp.where(is_harmful, projections, 0.0)) / jnp.sum(is_harmful)
    harmless_mean = jnp.sum(jnp.where(is_harmful, 0.0, projections)) / jnp.sum(~is_harmful)
    return harmful_mean - harmless_mean


class _Options(NamedTuple):
    """The traced INLP options (changing them does not recompile)."""

    inverse_regularization: jax.Array
    accuracy_margin: jax.Array
    reference_threshold: jax.Array
    max_solver_steps: jax.Array
    solver_tolerance: jax.Array


class _PairProgram(NamedTuple):
    """One pair's INLP as a state machine: ``start`` it, ``advance`` it one solver step or one
    finished classifier at a time while it is ``running``, and read its ``result``."""

    start: Callable[[_Coordinates], _LoopState]
    advance: Callable[[_LoopState], _LoopState]
    running: Callable[[_LoopState], jax.Array]
    result: Callable[[_LoopState, jax.Array], INLPResult]


def _pair_program(train_labels, dev_labels, options: _Options, *, max_directions, reference,
                  solver, serial) -> _PairProgram:
    solver = _solver(solver, serial=serial)
    harmful_rate = jnp.mean(dev_labels.astype(jnp.float32))
    majority_rate = jnp.maximum(harmful_rate, 1.0 - harmful_rate)
    is_harmful = train_labels == 1

    def problem(state: _LoopState, train=None):
        train = state.train if train is None else train
        return _problem(train, state.metric, train_labels, options.inverse_regularization)

    def start(coordinates: _Coordinates) -> _LoopState:
        rank = coordinates.metric.shape[0]
        state = _LoopState(
            iteration=jnp.int32(0), active=jnp.bool_(True), n_directions=jnp.int32(0),
            train=coordinates.train, dev=coordinates.dev, metric=coordinates.metric,
            basis=jnp.zeros((max_directions, rank), jnp.float32),
            dev_accuracies=jnp.full((max_directions,), jnp.nan, jnp.float32),
            converged=jnp.zeros((max_directions,), bool),
            solver_steps=jnp.zeros((max_directions,), jnp.int32),
            first_direction=jnp.zeros((rank,), jnp.float32), solver=None)
        return state._replace(solver=solver.init(problem(state)))

    def solver_step(state: _LoopState) -> _LoopState:
        return state._replace(solver=solver.step(problem(state), state.solver))

    def finish_classifier(state: _LoopState) -> _LoopState:
        # Accepted directions are contiguous, so state.iteration == state.n_directions here.
        i, metric = state.iteration, state.metric
        fit = solver.fit(problem(state), state.solver, options.solver_tolerance)
        predictions = (state.dev @ fit.coefficients + fit.intercept > 0).astype(dev_labels.dtype)
        accuracy = jnp.mean((predictions == dev_labels).astype(jnp.float32))
        if reference:
            passed = accuracy >= options.reference_threshold
        else:
            passed = accuracy > majority_rate + options.accuracy_margin

        def metric_norm(u):
            return jnp.sqrt(jnp.maximum(u @ (metric @ u), 0.0))

        new_direction = _orthogonal_complement(fit.coefficients, state.basis, metric)
        norm = metric_norm(new_direction)
        spans_new_direction = norm > _MIN_ORTHOGONAL_FRACTION * metric_norm(fit.coefficients)
        unit = jnp.where(spans_new_direction, new_direction / jnp.where(spans_new_direction,
                                                                          norm, 1.0), 0.0)
        gap = _class_mean_gap(state.train @ unit, is_harmful)
        unit = jnp.where(gap < 0, -unit, unit)
        accept = (passed | reference) & spans_new_direction
        accepted_unit = jnp.where(accept, unit, 0.0)  # projecting out zero changes nothing.
        train = _project_out(state.train, accepted_unit, metric)
        return _LoopState(
            iteration=i + 1,
            active=passed & spans_new_direction,
            n_directions=state.n_directions + accept.astype(jnp.int32),
            train=train,
            dev=_project_out(state.dev, accepted_unit, metric),
            metric=metric,
            basis=state.basis.at[i].set(accepted_unit),
            dev_accuracies=state.dev_accuracies.at[i].set(accuracy),
            converged=state.converged.at[i].set(fit.converged),
            solver_steps=state.solver_steps.at[i].set(fit.steps),
            # With an empty basis the first unit is the classifier normal itself.
            first_direction=jnp.where(i == 0, unit, state.first_direction),
            solver=solver.init(problem(state, train)),
        )

    def advance(state: _LoopState) -> _LoopState:
        solving = solver.running(state.solver, options.max_solver_steps, options.solver_tolerance)
        return jax.lax.cond(solving, solver_step, finish_classifier, state)

    def running(state: _LoopState) -> jax.Array:
        return state.active & (state.iteration < max_directions)

    def result(state: _LoopState, axes: jax.Array) -> INLPResult:
        # One product, so that first_direction equals basis[0] bit for bit when it was accepted.
        directions = jnp.concatenate([state.basis, state.first_direction[None]]) @ axes.T
        return INLPResult(basis=directions[:-1], n_directions=state.n_directions,
                          dev_accuracies=state.dev_accuracies, majority_rate=majority_rate,
                          first_direction=directions[-1], converged=state.converged,
                          solver_steps=state.solver_steps)

    return _PairProgram(start, advance, running, result)


class _Queue(NamedTuple):
    pairs: _LoopState  # [pairs, ...]: not started (initial state) or finished (final state)
    in_flight: _LoopState  # [lanes, ...]: the pairs being worked on
    lane_pair: jax.Array  # [lanes] int32: the pair in each lane; ``pairs`` when the lane is idle
    next_pair: jax.Array  # [] int32: the first pair not yet started


def _fit_pairs(train_features, train_labels, dev_features, dev_labels, options: _Options, *,
               max_directions, reference, solver, pairs_in_flight, serial=False) -> INLPResult:
    """INLP for every pair of ``[pairs, n, D]`` features, ``pairs_in_flight`` at a time.

    Pairs need very different amounts of work (0 to 70-odd directions on real activations, 5 to
    15 solver steps per classifier), and a batched loop runs until its slowest member is done.
    So the pairs wait in a queue and a fixed number of lanes is worked on: every iteration
    advances each lane's pair by one solver step or one finished classifier (vmapped), and a
    lane whose pair has stopped stores it and takes the next pair from the queue (the continuous
    batching of LLM servers). It is one compiled loop, and the number of lanes changes only the
    speed (results agree to float32 rounding). ``serial`` runs the LAPACK decompositions one
    matrix at a time (needed on a CPU mesh; see :func:`_one_matrix_at_a_time`).
    """
    n_pairs = train_features.shape[0]
    lanes = min(pairs_in_flight, n_pairs)
    program = _pair_program(train_labels, dev_labels, options, max_directions=max_directions,
                            reference=reference, solver=solver, serial=serial)
    if serial:
        coordinates = jax.lax.map(lambda pair: _coordinates(*pair), (train_features, dev_features))
    else:
        coordinates = jax.vmap(_coordinates)(train_features, dev_features)
    advance, running = jax.vmap(program.advance), jax.vmap(program.running)

    def swap_finished(queue: _Queue, stepped: _LoopState, finished: jax.Array) -> _Queue:
        """Stores the lanes' finished pairs and loads the next ones (idle when none is left)."""
        store = jnp.where(finished, queue.lane_pair, n_pairs)  # out of range: dropped
        pairs = jax.tree.map(lambda all_, new: all_.at[store].set(new, mode="drop"),
                             queue.pairs, stepped)
        fetched = jnp.minimum(queue.next_pair + jnp.cumsum(finished) - 1, n_pairs)
        lane_pair = jnp.where(finished, fetched, queue.lane_pair)
        loaded = jax.tree.map(lambda all_: all_[jnp.minimum(lane_pair, n_pairs - 1)], pairs)
        in_flight = jax.tree.map(
            lambda new, old: jnp.where(finished.reshape((-1,) + (1,) * (old.ndim - 1)), new,
                                       old), loaded, stepped)
        return _Queue(pairs, in_flight, lane_pair,
                      queue.next_pair + jnp.sum(finished, dtype=jnp.int32))

    def step(queue: _Queue) -> _Queue:
        stepped = advance(queue.in_flight)
        finished = (queue.lane_pair < n_pairs) & ~running(stepped)
        return jax.lax.cond(jnp.any(finished), swap_finished,
                            lambda q, s, f: q._replace(in_flight=s), queue, stepped, finished)

    pairs = jax.vmap(program.start)(coordinates)
    initial = _Queue(pairs=pairs, in_flight=jax.tree.map(lambda leaf: leaf[:lanes], pairs),
                     lane_pair=jnp.arange(lanes, dtype=jnp.int32), next_pair=jnp.int32(lanes))
    final = jax.lax.while_loop(lambda q: jnp.any(q.lane_pair < n_pairs), step, initial)
    return jax.vmap(program.result)(final.pairs, coordinates.axes)


@functools.partial(jax.jit, static_argnames=("max_directions", "reference", "solver",
                                             "pairs_in_flight", "mesh", "pair_axes"))
def _fit_inlp_pairs(train_features, train_labels, dev_features, dev_labels, options, *,
                    max_directions, reference, solver, pairs_in_flight, mesh,
                    pair_axes) -> INLPResult:
    fit = functools.partial(_fit_pairs, max_directions=max_directions, reference=reference,
                            solver=solver, pairs_in_flight=pairs_in_flight)
    if mesh is not None:
        # Every device works through its own share of the pairs, with no communication. The
        # loop mixes per-device state with shared constants in ways the varying-axis checker
        # would make us annotate at every branch; it has nothing to check here.
        fit = functools.partial(fit, serial=mesh.devices.flat[0].platform == "cpu")
        pairs, shared = jax.sharding.PartitionSpec(pair_axes), jax.sharding.PartitionSpec()
        fit = jax.shard_map(fit, mesh=mesh, in_specs=(pairs, shared, pairs, shared, shared),
                            out_specs=pairs, check_vma=False)
    return fit(train_features, train_labels, dev_features, dev_labels, options)


def _pair_sharding(features) -> tuple[jax.sharding.Mesh | None, Any]:
    """The mesh and mesh axes that split ``features``' leading pair axis, if any (none when
    traced inside someone else's ``jax.jit``, whose partitioner then places the work)."""
    if isinstance(features, jax.core.Tracer):
        return None, None
    sharding = getattr(features, "sharding", None)
    if (isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.spec)
            and sharding.spec[0] is not None):
        return sharding.mesh, sharding.spec[0]
    return None, None


def fit_inlp_split(train_features: ArrayLike, train_labels: ArrayLike, dev_features: ArrayLike,
                   dev_labels: ArrayLike, *, max_directions: int = 100, reference: bool = False,
                   inverse_regularization: float = 0.1, accuracy_margin: float = 0.05,
                   reference_threshold: float = 0.55, max_solver_steps: int = 1000,
                   solver_tolerance: float = 1e-5, solver: str = "newton",
                   pairs_in_flight: int = DEFAULT_PAIRS_IN_FLIGHT) -> INLPResult:
    """INLP on an existing split, jitted, over one leading pair axis (no input checks).

    Args:
      train_features: ``[pairs, n_train, D]`` float32. When its pair axis is split over a mesh
        (a ``NamedSharding``), every device fits its own pairs.
      train_labels: ``[n_train]`` 0/1, shared by all pairs.
      dev_features: ``[pairs, n_dev, D]`` float32, split like ``train_features``.
      dev_labels: ``[n_dev]`` 0/1.
      max_directions, reference, solver, pairs_in_flight: static (see :func:`fit_inlp`); the
        other options are traced arguments, so changing them does not recompile.

    Returns:
      :class:`INLPResult` with leading axis ``[pairs]``.
    """
    mesh, pair_axes = _pair_sharding(train_features)
    options = _Options(*(jnp.asarray(value, dtype) for value, dtype in (
        (inverse_regularization, jnp.float32), (accuracy_margin, jnp.float32),
        (reference_threshold, jnp.float32), (max_solver_steps, jnp.int32),
        (solver_tolerance, jnp.float32))))
    return _fit_inlp_pairs(train_features, train_labels, dev_features, dev_labels, options,
                           max_directions=int(max_directions), reference=bool(reference),
                           solver=solver, pairs_in_flight=int(pairs_in_flight), mesh=mesh,
                           pair_axes=pair_axes)


def fit_inlp(features: ArrayLike, labels: ArrayLike, *, max_directions: int = 100,
             reference: bool = False, inverse_regularization: float = 0.1,
             accuracy_margin: float = 0.05, reference_threshold: float = 0.55,
             dev_fraction: float = 0.2, seed: int = 0, max_solver_steps: int = 1000,
             solver_tolerance: float = 1e-5, solver: str = "newton",
             pairs_in_flight: int = DEFAULT_PAIRS_IN_FLIGHT) -> INLPResult:
    """Runs INLP for every pair in one compiled loop.

    Args:
      features: ``[*pairs, n, D]`` (any number of leading pair axes, including none).
      labels: ``[n]``, 1 = harmful, 0 = harmless.
      max_directions: N, the most classifiers fitted per pair.
      reference: reproduce the published code (non-stratified split, stop when accuracy <
        ``reference_threshold``, failing classifier kept) instead of the default rule (stratified
        split, stop when accuracy <= majority rate + ``accuracy_margin``, failing one dropped).
      inverse_regularization: C of the logistic regressions.
      dev_fraction, seed: the deterministic split, see :func:`train_dev_split`.
      max_solver_steps, solver_tolerance: the solver's iteration budget and gradient-norm
        tolerance (see :func:`fit_logistic_regression`).
      solver: ``"newton"`` (default) or ``"lbfgs"`` (optax); the same optimum.
      pairs_in_flight: how many pairs (per device) are worked on at once; the others wait in a
        queue. Only speed depends on it.

    Returns:
      :class:`INLPResult` whose leaves lead with ``pairs``.
    """
    features = _validated_features(features, min_ndim=2)
    labels = _validated_labels(labels)
    _check_matching(features, labels)
    _check_solver_options(inverse_regularization, max_solver_steps, solver_tolerance, solver)
    if not isinstance(max_directions, (int, np.integer)) or max_directions < 1:
        raise ValueError(f"max_directions must be a positive integer; got {max_directions!r}.")
    if not isinstance(pairs_in_flight, (int, np.integer)) or pairs_in_flight < 1:
        raise ValueError(f"pairs_in_flight must be a positive integer; got {pairs_in_flight!r}.")
    if accuracy_margin < 0:
        raise ValueError(f"accuracy_margin must be >= 0; got {accuracy_margin}.")
    split = train_dev_split(labels, dev_fraction=dev_fraction, stratified=not reference, seed=seed)
    pair_shape, (n, dim) = features.shape[:-2], features.shape[-2:]
    flat = features.reshape((-1, n, dim))
    result = fit_inlp_split(
        flat[:, split.train_index], jnp.asarray(labels[split.train_index]),
        flat[:, split.dev_index], jnp.asarray(labels[split.dev_index]),
        max_directions=int(max_directions), reference=reference,
        inverse_regularization=inverse_regularization, accuracy_margin=accuracy_margin,
        reference_threshold=reference_threshold, max_solver_steps=max_solver_steps,
        solver_tolerance=solver_tolerance, solver=solver, pairs_in_flight=pairs_in_flight)
    return jax.tree.map(lambda leaf: leaf.reshape(pair_shape + leaf.shape[1:]), result)


def pair_major(activations: ArrayLike) -> jax.Array:
    """``(n, *pairs, D)`` captured activations -> ``(*pairs, n, D)`` features."""
    activations = jnp.asarray(activations)
    if activations.ndim < 2:
        raise ValueError(f"activations must be (n, ..., D); got shape {activations.shape}.")
    return jnp.moveaxis(activations, 0, -2)


# ----------------------------------------------------------------------------------------------
# k policies.


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


# ----------------------------------------------------------------------------------------------
# Input checks shared by the public entry points.


def _validated_features(features: ArrayLike, *, min_ndim: int) -> jax.Array:
    features = jnp.asarray(features)
    if features.ndim < min_ndim:
        raise ValueError(f"features must have at least {min_ndim} axes (..., n, D); got shape "
                         f"{features.shape}.")
    if not jnp.issubdtype(features.dtype, jnp.floating):
        raise ValueError(f"features must be floating point; got {features.dtype}.")
    if not bool(jnp.all(jnp.isfinite(features))):
        raise ValueError("features contain NaN or inf values; check the activation capture.")
    return features.astype(jnp.float32)


def _check_matching(features: jax.Array, labels: np.ndarray) -> None:
    if features.shape[-2] != labels.shape[0]:
        raise ValueError(f"features have {features.shape[-2]} examples (axis -2 of shape "
                         f"{features.shape}) but there are {labels.shape[0]} labels.")
    if np.unique(labels).size < 2:
        raise ValueError("labels must contain both classes (0 = harmless, 1 = harmful).")


def _check_solver_options(inverse_regularization: float, max_steps: int, tolerance: float,
                          solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}.")
    if not inverse_regularization > 0:
        raise ValueError(f"inverse_regularization (C) must be > 0; got {inverse_regularization}.")
    if max_steps < 1:
        raise ValueError(f"the solver needs at least one step; got max_steps={max_steps}.")
    if not tolerance >= 0:
        raise ValueError(f"the solver tolerance must be >= 0; got {tolerance}.")
