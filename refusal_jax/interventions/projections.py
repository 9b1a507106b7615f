"""Linear maps that act inside a subspace: directional ablation, nullspace projection and the
counterfactual reflection ``x - alpha (x V^T) V``."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from refusal_jax.interventions import folding
from refusal_jax.interventions.masks import ABLATION_SITES, LayerSelection, make_site_mask
from refusal_jax.interventions.per_layer import per_layer, per_layer_basis, unit_rows
from refusal_jax.interventions.registry import LayerKind, intervention_kind
from refusal_jax.interventions.vector_ops import reflect
from refusal_jax.models.config import ModelConfig
from refusal_jax.models.params import Params
from refusal_jax.models.sites import SITES, SiteContext

Array = jax.Array


@intervention_kind("ablation")
class DirectionalAblation(LayerKind):
    """``x - (x . r_hat) r_hat`` at the masked sites. direction: [L, D] unit; site_mask: [L, 4]."""

    WIDTH_FIELDS = ("direction",)

    direction: Array
    site_mask: Array

    @classmethod
    def zeros(cls, n_layers: int, width: int, k: int) -> DirectionalAblation:
        return cls(direction=np.zeros((n_layers, width), np.float32),
                   site_mask=np.zeros((n_layers, len(SITES)), np.float32))

    def apply(self, site: str, x: Array, ctx: SiteContext) -> Array:
        weight = self.weight_at(site, x)
        return reflect(x, self.direction[None, :], weight).astype(x.dtype)

    def fold(self, params: Params, *, config: ModelConfig) -> tuple[Params, ModelConfig]:
        """Into the writers' weights (see ``folding.fold_projection`` for when it is exact)."""
        return folding.fold_projection(params, self.direction[:, None, :], self.site_mask,
                                       config=config)


@intervention_kind("nullspace")
class NullspaceProjection(LayerKind):
    """``x - (x V^T) V`` at the masked sites.

    basis: [L, k, D] orthonormal (or zero) rows; site_mask: [L, 4].
    """

    WIDTH_FIELDS = ("basis",)

    basis: Array
    site_mask: Array

    @classmethod
    def zeros(cls, n_layers: int, width: int, k: int) -> NullspaceProjection:
        return cls(basis=np.zeros((n_layers, k, width), np.float32),
                   site_mask=np.zeros((n_layers, len(SITES)), np.float32))

    def apply(self, site: str, x: Array, ctx: SiteContext) -> Array:
        weight = self.weight_at(site, x)
        return reflect(x, self.basis, weight).astype(x.dtype)

    def fold(self, params: Params, *, config: ModelConfig) -> tuple[Params, ModelConfig]:
        """Into the writers' weights (see ``folding.fold_projection`` for when it is exact)."""
        return folding.fold_projection(params, self.basis, self.site_mask, config=config)


@intervention_kind("reflection")
class CounterfactualReflection(LayerKind):
    """The reference's counterfactual map ``x - alpha (x V^T) V`` at the masked sites.

    basis: [L, k, D] orthonormal rows; alpha: [L]; site_mask: [L, 4].

    As in the reference, it acts on the block input and on the attention and MLP outputs of
    every selected layer. With ``alpha = 2`` the map ``R = 2P - I`` is an involution and it is
    linear, so the stream leaving a selected layer is ``R(x) + R(a) + R(m) = R(x + a + m)``:
    the whole stream is flipped. At the next selected layer its input ``R(s) + w`` (``w`` being
    what the layers in between wrote) becomes ``R(R(s) + w) = s + R(w)``: the first flip is
    undone, and with an even number of selected layers the flips cancel pairwise. Use
    ``SubspaceClamp`` for an edit that holds at any number of layers.
    """

    WIDTH_FIELDS = ("basis",)

    basis: Array
    alpha: Array
    site_mask: Array

    @classmethod
    def zeros(cls, n_layers: int, width: int, k: int) -> CounterfactualReflection:
        return cls(basis=np.zeros((n_layers, k, width), np.float32),
                   alpha=np.zeros(n_layers, np.float32),
                   site_mask=np.zeros((n_layers, len(SITES)), np.float32))

    def apply(self, site: str, x: Array, ctx: SiteContext) -> Array:
        weight = self.weight_at(site, x)
        return reflect(x, self.basis, weight * self.alpha).astype(x.dtype)


def directional_ablation(
    direction: Array,
    *,
    n_layers: int,
    layers: LayerSelection = None,
    sites: Sequence[str] = ABLATION_SITES,
) -> DirectionalAblation:
    """Ablate ``direction`` ([D] or [L, D]; normalised here, so ``r`` or ``r_hat`` both work).

    ``layers=None`` with the default sites is Arditi et al.'s global ablation (foldable into the
    weights with ``refusal_jax.interventions.fold``).
    """
    mask = make_site_mask(n_layers, layers, sites)
    unit = unit_rows(per_layer(direction, n_layers, 1, "direction"), "direction")
    return DirectionalAblation(direction=unit, site_mask=mask)


def nullspace_projection(
    basis: Array,
    *,
    n_layers: int,
    layers: LayerSelection = None,
    sites: Sequence[str] = ABLATION_SITES,
) -> NullspaceProjection:
    """Project out span(basis); ``basis`` [k, D] or [L, k, D], orthonormal or zero rows."""
    mask = make_site_mask(n_layers, layers, sites)
    return NullspaceProjection(basis=per_layer_basis(basis, n_layers), site_mask=mask)


def counterfactual_reflection(
    basis: Array,
    alpha: Array | float,
    *,
    n_layers: int,
    layers: LayerSelection = None,
    sites: Sequence[str] = ABLATION_SITES,
) -> CounterfactualReflection:
    """The reference's ``P_a = a P + (1 - a) I``; ``alpha`` scalar or [L] (see the class)."""
    mask = make_site_mask(n_layers, layers, sites)
    return CounterfactualReflection(basis=per_layer_basis(basis, n_layers),
                                    alpha=per_layer(alpha, n_layers, 0, "alpha"), site_mask=mask)
