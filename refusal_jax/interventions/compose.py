"""Whole interventions: composition, slicing to one layer, stacking candidates, fit checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TypeVar

import jax
import jax.numpy as jnp

from refusal_jax.models.sites import Intervention, SiteContext

T = TypeVar("T")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Compose:
    """Several interventions applied in order at every site: ``interventions[0]`` first.

    ``Compose((a, b)).apply(site, x, ctx) == b.apply(site, a.apply(site, x, ctx), ctx)``.
    """

    interventions: tuple[Intervention, ...]

    def apply(self, site: str, x: jax.Array, ctx: SiteContext) -> jax.Array:
        for intervention in self.interventions:
            x = intervention.apply(site, x, ctx)
        return x

    def first_active_layer(self) -> jax.Array:
        """The lowest layer any part acts at (0 when a part cannot tell: it has no
        ``first_active_layer``; the int32 maximum when there is no part)."""
        firsts = [part.first_active_layer() if hasattr(part, "first_active_layer")
                  else jnp.zeros((), jnp.int32) for part in self.interventions]
        return jnp.min(jnp.asarray([*firsts, jnp.iinfo(jnp.int32).max], jnp.int32))

    def check_fits(self, n_layers: int, d_model: int, *,
                   allow_candidate_axis: bool = False) -> None:
        """Every part's :func:`check_compatible`."""
        for part in self.interventions:
            check_compatible(part, n_layers=n_layers, d_model=d_model,
                             allow_candidate_axis=allow_candidate_axis)


def at_layer(intervention: T, layer: int) -> T:
    """The intervention sliced to one layer, as the forward's scan sees it."""
    return jax.tree_util.tree_map(lambda leaf: leaf[layer], intervention)


def check_same_form(interventions: Sequence[object]) -> None:
    """Raise ValueError unless the interventions share one kind (tree structure) and shapes."""
    if not interventions:
        raise ValueError("stack needs at least one intervention")
    first_def = jax.tree_util.tree_structure(interventions[0])
    first_shapes = [jnp.shape(leaf) for leaf in jax.tree_util.tree_leaves(interventions[0])]
    for index, intervention in enumerate(interventions[1:], start=1):
        shapes = [jnp.shape(leaf) for leaf in jax.tree_util.tree_leaves(intervention)]
        if jax.tree_util.tree_structure(intervention) != first_def or shapes != first_shapes:
            raise ValueError(
                f"stack: intervention {index} differs in kind or shape from intervention 0 "
                f"({jax.tree_util.tree_structure(intervention)} {shapes} vs {first_def} "
                f"{first_shapes}); pad bases with zero rows to a common k"
            )


def stack(interventions: Sequence[T]) -> T:
    """Stack interventions of one kind and shape on a new leading candidate axis (for vmap)."""
    check_same_form(interventions)
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *interventions)


def check_compatible(
    intervention: object, *, n_layers: int, d_model: int, allow_candidate_axis: bool = True
) -> None:
    """Raise ValueError unless the intervention fits a model with ``n_layers`` and ``d_model``.

    Works on a single intervention ([L, ...] leaves) and, when ``allow_candidate_axis``, on a
    stacked one ([C, L, ...]). The forward pass itself takes a single one (vmap over the rest).
    An intervention without ``check_fits`` (a user-defined one) answers for its own shapes.
    """
    if not hasattr(intervention, "apply"):
        raise ValueError(f"not an intervention (no apply method): {type(intervention).__name__}")
    check_fits = getattr(intervention, "check_fits", None)
    if check_fits is not None:
        check_fits(n_layers, d_model, allow_candidate_axis=allow_candidate_axis)
