"""INLP over many (EOI position, layer) pairs: the pair queue, its sharding, the entry points.

All pairs run in one compiled loop (:func:`_fit_pairs`) that keeps a fixed number of pairs in
flight; when the pair axis is split over a mesh, every device works through its own share.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from refusal_jax.directions.inlp.coordinates import row_space_coordinates
from refusal_jax.directions.inlp.logistic import check_solver_options
from refusal_jax.directions.inlp.pair import Options, PairState, pair_program
from refusal_jax.directions.inlp.result import INLPResult
from refusal_jax.directions.inlp.split import train_dev_split
from refusal_jax.directions.validation import (
    check_matching,
    validated_features,
    validated_labels,
)

# Pairs worked on at once by INLP (see _fit_pairs).
DEFAULT_PAIRS_IN_FLIGHT = 16


class _Queue(NamedTuple):
    pairs: PairState  # [pairs, ...]: not started (initial state) or finished (final state)
    in_flight: PairState  # [lanes, ...]: the pairs being worked on
    lane_pair: jax.Array  # [lanes] int32: the pair in each lane; ``pairs`` when the lane is idle
    next_pair: jax.Array  # [] int32: the first pair not yet started


def _fit_pairs(train_features, train_labels, dev_features, dev_labels, options: Options, *,
               max_directions, absolute_stop, keep_failing, solver, pairs_in_flight,
               serial=False) -> INLPResult:
    """INLP for every pair of ``[pairs, n, D]`` features, ``pairs_in_flight`` at a time.

    Pairs need very different amounts of work (0 to 70-odd directions on real activations, 5 to
    15 solver steps per classifier), and a batched loop runs until its slowest member is done.
    So the pairs wait in a queue and a fixed number of lanes is worked on: every iteration
    advances each lane's pair by one solver step or one finished classifier (vmapped), and a
    lane whose pair has stopped stores it and takes the next pair from the queue (the continuous
    batching of LLM servers). It is one compiled loop, and the number of lanes changes only the
    speed (results agree to float32 rounding). ``serial`` runs the LAPACK decompositions one
    matrix at a time (needed on a CPU mesh; see :mod:`refusal_jax.directions.inlp.serial`).
    """
    n_pairs = train_features.shape[0]
    lanes = min(pairs_in_flight, n_pairs)
    program = pair_program(train_labels, dev_labels, options, max_directions=max_directions,
                           absolute_stop=absolute_stop, keep_failing=keep_failing,
                           solver=solver, serial=serial)
    if serial:
        coordinates = jax.lax.map(lambda pair: row_space_coordinates(*pair),
                                  (train_features, dev_features))
    else:
        coordinates = jax.vmap(row_space_coordinates)(train_features, dev_features)
    advance, running = jax.vmap(program.advance), jax.vmap(program.running)

    def swap_finished(queue: _Queue, stepped: PairState, finished: jax.Array) -> _Queue:
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


@functools.partial(jax.jit, static_argnames=("max_directions", "absolute_stop", "keep_failing",
                                             "solver", "pairs_in_flight", "mesh", "pair_axes"))
def _fit_inlp_pairs(train_features, train_labels, dev_features, dev_labels, options, *,
                    max_directions, absolute_stop, keep_failing, solver, pairs_in_flight, mesh,
                    pair_axes) -> INLPResult:
    fit = functools.partial(_fit_pairs, max_directions=max_directions,
                            absolute_stop=absolute_stop, keep_failing=keep_failing,
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
                   dev_labels: ArrayLike, *, max_directions: int = 100,
                   absolute_stop: bool = False, keep_failing: bool = False,
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
      max_directions, absolute_stop, keep_failing, solver, pairs_in_flight: static (see
        :func:`fit_inlp`); the other options are traced arguments, so changing them does not
        recompile.

    Returns:
      :class:`INLPResult` with leading axis ``[pairs]``.
    """
    mesh, pair_axes = _pair_sharding(train_features)
    options = Options(*(jnp.asarray(value, dtype) for value, dtype in (
        (inverse_regularization, jnp.float32), (accuracy_margin, jnp.float32),
        (reference_threshold, jnp.float32), (max_solver_steps, jnp.int32),
        (solver_tolerance, jnp.float32))))
    return _fit_inlp_pairs(train_features, train_labels, dev_features, dev_labels, options,
                           max_directions=int(max_directions),
                           absolute_stop=bool(absolute_stop), keep_failing=bool(keep_failing),
                           solver=solver, pairs_in_flight=int(pairs_in_flight), mesh=mesh,
                           pair_axes=pair_axes)


def fit_inlp(features: ArrayLike, labels: ArrayLike, *, max_directions: int = 100,
             stratified: bool = True, absolute_stop: bool = False, keep_failing: bool = False,
             inverse_regularization: float = 0.1,
             accuracy_margin: float = 0.05, reference_threshold: float = 0.55,
             dev_fraction: float = 0.2, seed: int = 0, max_solver_steps: int = 1000,
             solver_tolerance: float = 1e-5, solver: str = "newton",
             pairs_in_flight: int = DEFAULT_PAIRS_IN_FLIGHT) -> INLPResult:
    """Runs INLP for every pair in one compiled loop.

    Args:
      features: ``[*pairs, n, D]`` (any number of leading pair axes, including none).
      labels: ``[n]``, 1 = harmful, 0 = harmless.
      max_directions: N, the most classifiers fitted per pair.
      stratified: the default split, or the published code's (False; see
        :func:`train_dev_split`).
      absolute_stop: stop when accuracy < ``reference_threshold`` (the published code) instead
        of when accuracy <= the dev majority rate + ``accuracy_margin`` (default).
      keep_failing: add the classifier that fails the stop rule before stopping (the published
        code); by default it is dropped.
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
    features = validated_features(features, min_ndim=2)
    labels = validated_labels(labels)
    check_matching(features, labels)
    check_solver_options(inverse_regularization, max_solver_steps, solver_tolerance, solver)
    if not isinstance(max_directions, (int, np.integer)) or max_directions < 1:
        raise ValueError(f"max_directions must be a positive integer; got {max_directions!r}.")
    if not isinstance(pairs_in_flight, (int, np.integer)) or pairs_in_flight < 1:
        raise ValueError(f"pairs_in_flight must be a positive integer; got {pairs_in_flight!r}.")
    if accuracy_margin < 0:
        raise ValueError(f"accuracy_margin must be >= 0; got {accuracy_margin}.")
    split = train_dev_split(labels, dev_fraction=dev_fraction, stratified=stratified, seed=seed)
    pair_shape, (n, dim) = features.shape[:-2], features.shape[-2:]
    flat = features.reshape((-1, n, dim))
    result = fit_inlp_split(
        flat[:, split.train_index], jnp.asarray(labels[split.train_index]),
        flat[:, split.dev_index], jnp.asarray(labels[split.dev_index]),
        max_directions=int(max_directions), absolute_stop=absolute_stop,
        keep_failing=keep_failing, inverse_regularization=inverse_regularization,
        accuracy_margin=accuracy_margin,
        reference_threshold=reference_threshold, max_solver_steps=max_solver_steps,
        solver_tolerance=solver_tolerance, solver=solver, pairs_in_flight=pairs_in_flight)
    return jax.tree.map(lambda leaf: leaf.reshape(pair_shape + leaf.shape[1:]), result)


def pair_major(activations: ArrayLike) -> jax.Array:
    """``(n, *pairs, D)`` captured activations -> ``(*pairs, n, D)`` features."""
    activations = jnp.asarray(activations)
    if activations.ndim < 2:
        raise ValueError(f"activations must be (n, ..., D); got shape {activations.shape}.")
    return jnp.moveaxis(activations, 0, -2)
