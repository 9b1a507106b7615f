"""What INLP returns for each (EOI position, layer) pair."""

from __future__ import annotations

import dataclasses
import functools

import jax


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["basis", "n_directions", "dev_accuracies", "majority_rate",
                                "first_direction", "converged", "solver_steps"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class INLPResult:
    """INLP output; ``...`` are the leading pair axes of the input features.

    Attributes:
      basis: ``[..., N, D]`` float32, ``V`` of docs/method.md: orthonormal rows in the order found,
        zero rows from ``n_directions`` on.
      n_directions: ``[...]`` int32, number of accepted directions.
      dev_accuracies: ``[..., N]`` float32, dev accuracy of each classifier fitted: the accepted
        ones and, at index ``n_directions`` (when ``< N``), the one that stopped the loop. With
        ``keep_failing`` the stopping classifier is accepted, so it is the last accepted one.
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
