"""One pair's INLP as a state machine, in the row-space coordinates of its training features.

A pair fits a classifier, scores it on dev, and either keeps its normal (Gram-Schmidt
orthonormalised against the earlier directions, oriented so that harmful examples project
higher, and projected out of the data) or stops. The program advances one solver step or one
finished classifier at a time, so that a queue of pairs can run in one loop
(:mod:`refusal_jax.directions.inlp.loop`).

Stop rule (default): stop at the first classifier whose dev accuracy is no better than the
majority-class rate of the dev split plus ``accuracy_margin``; that classifier is not added.
The published code's rules, one switch each: ``absolute_stop`` stops when accuracy <
``reference_threshold`` (0.55), and ``keep_failing`` adds the failing classifier before stopping.
Every rule stops early when a classifier normal lies (numerically) inside the span of the
earlier directions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from refusal_jax.directions.inlp.coordinates import Coordinates
from refusal_jax.directions.inlp.logistic import solver_named
from refusal_jax.directions.inlp.problem import logistic_problem
from refusal_jax.directions.inlp.result import INLPResult

# A new normal whose component orthogonal to the earlier directions is smaller than this
# fraction of its norm carries no new direction; INLP stops there.
_MIN_ORTHOGONAL_FRACTION = 1e-3


class PairState(NamedTuple):
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


class Options(NamedTuple):
    """The traced INLP options (changing them does not recompile)."""

    inverse_regularization: jax.Array
    accuracy_margin: jax.Array
    reference_threshold: jax.Array
    max_solver_steps: jax.Array
    solver_tolerance: jax.Array


class PairProgram(NamedTuple):
    """One pair's INLP as a state machine: ``start`` it, ``advance`` it one solver step or one
    finished classifier at a time while it is ``running``, and read its ``result``."""

    start: Callable[[Coordinates], PairState]
    advance: Callable[[PairState], PairState]
    running: Callable[[PairState], jax.Array]
    result: Callable[[PairState, jax.Array], INLPResult]


def pair_program(train_labels, dev_labels, options: Options, *, max_directions, absolute_stop,
                 keep_failing, solver, serial) -> PairProgram:
    """The program of one pair with these dev/train labels, options and static settings
    (``absolute_stop``, ``keep_failing``: the stop rule above; ``solver`` by name; ``serial``:
    see :func:`refusal_jax.directions.inlp.logistic.solver_named`)."""
    solver = solver_named(solver, serial=serial)
    harmful_rate = jnp.mean(dev_labels.astype(jnp.float32))
    majority_rate = jnp.maximum(harmful_rate, 1.0 - harmful_rate)
    is_harmful = train_labels == 1

    def problem(state: PairState, train=None):
        train = state.train if train is None else train
        return logistic_problem(train, state.metric, train_labels,
                                options.inverse_regularization)

    def start(coordinates: Coordinates) -> PairState:
        rank = coordinates.metric.shape[0]
        state = PairState(
            iteration=jnp.int32(0), active=jnp.bool_(True), n_directions=jnp.int32(0),
            train=coordinates.train, dev=coordinates.dev, metric=coordinates.metric,
            basis=jnp.zeros((max_directions, rank), jnp.float32),
            dev_accuracies=jnp.full((max_directions,), jnp.nan, jnp.float32),
            converged=jnp.zeros((max_directions,), bool),
            solver_steps=jnp.zeros((max_directions,), jnp.int32),
            first_direction=jnp.zeros((rank,), jnp.float32), solver=None)
        return state._replace(solver=solver.init(problem(state)))

    def solver_step(state: PairState) -> PairState:
        return state._replace(solver=solver.step(problem(state), state.solver))

    def finish_classifier(state: PairState) -> PairState:
        # Accepted directions are contiguous, so state.iteration == state.n_directions here.
        i, metric = state.iteration, state.metric
        fit = solver.fit(problem(state), state.solver, options.solver_tolerance)
        predictions = (state.dev @ fit.coefficients + fit.intercept > 0).astype(dev_labels.dtype)
        accuracy = jnp.mean((predictions == dev_labels).astype(jnp.float32))
        if absolute_stop:
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
        accept = (passed | keep_failing) & spans_new_direction
        accepted_unit = jnp.where(accept, unit, 0.0)  # projecting out zero changes nothing.
        train = _project_out(state.train, accepted_unit, metric)
        return PairState(
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

    def advance(state: PairState) -> PairState:
        solving = solver.running(state.solver, options.max_solver_steps, options.solver_tolerance)
        return jax.lax.cond(solving, solver_step, finish_classifier, state)

    def running(state: PairState) -> jax.Array:
        return state.active & (state.iteration < max_directions)

    def result(state: PairState, axes: jax.Array) -> INLPResult:
        # One product, so that first_direction equals basis[0] bit for bit when it was accepted.
        directions = jnp.concatenate([state.basis, state.first_direction[None]]) @ axes.T
        return INLPResult(basis=directions[:-1], n_directions=state.n_directions,
                          dev_accuracies=state.dev_accuracies, majority_rate=majority_rate,
                          first_direction=directions[-1], converged=state.converged,
                          solver_steps=state.solver_steps)

    return PairProgram(start, advance, running, result)
