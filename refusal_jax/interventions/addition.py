"""Activation addition (ActAdd): add a vector to the stream at chosen sites and positions."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from refusal_jax.interventions import folding
from refusal_jax.interventions.masks import LayerSelection, make_site_mask
from refusal_jax.interventions.per_layer import UNBOUNDED_POSITION, per_layer, position_bound
from refusal_jax.interventions.registry import LayerKind, intervention_kind
from refusal_jax.interventions.vector_ops import add_direction
from refusal_jax.models.config import ModelConfig
from refusal_jax.models.params import Params
from refusal_jax.models.sites import SITES, SiteContext

Array = jax.Array


@intervention_kind("actadd")
class ActivationAddition(LayerKind):
    """``x + coeff * direction`` at the masked (layer, site) pairs and token positions.

    direction: [L, D]; coeff: [L]; site_mask: [L, 4].
    position_start, position_stop: [L] or [L, B] int32. The edit applies to valid tokens whose
      position (``ctx.positions``) lies in ``[position_start, position_stop)``. Defaults cover
      every position. Use [L, B] for per-prompt windows, e.g. only the generated tokens
      (start = prompt length of each row) or only the last ``n`` prompt tokens
      (start = prompt length - n, stop = prompt length).
    """

    WIDTH_FIELDS = ("direction",)

    direction: Array
    coeff: Array
    site_mask: Array
    position_start: Array
    position_stop: Array

    @classmethod
    def zeros(cls, n_layers: int, width: int, k: int) -> ActivationAddition:
        """No addition; the window covers every position."""
        return cls(direction=np.zeros((n_layers, width), np.float32),
                   coeff=np.zeros(n_layers, np.float32),
                   site_mask=np.zeros((n_layers, len(SITES)), np.float32),
                   position_start=np.zeros(n_layers, np.int32),
                   position_stop=np.full(n_layers, UNBOUNDED_POSITION, np.int32))

    def apply(self, site: str, x: Array, ctx: SiteContext) -> Array:
        weight = self.weight_at(site, x)
        in_window = (ctx.positions >= self.position_start[..., None]) & (
            ctx.positions < self.position_stop[..., None]
        )
        scale = weight * self.coeff * (ctx.valid & in_window)
        return add_direction(x, self.direction, scale[..., None]).astype(x.dtype)

    def fold(self, params: Params, *, config: ModelConfig) -> tuple[Params, ModelConfig]:
        """Into the embedding rows, at ``resid_pre`` of layer 0 only (see ``folding``)."""
        return folding.fold_activation_addition(
            params, self.direction, self.coeff, self.site_mask, self.position_start,
            self.position_stop, config=config)


def activation_addition(
    direction: Array,
    coeff: Array | float,
    *,
    n_layers: int,
    layers: LayerSelection = None,
    sites: Sequence[str] = ("resid_pre",),
    position_start: Array | int = 0,
    position_stop: Array | int | None = None,
) -> ActivationAddition:
    """ActAdd ``x + coeff * direction``; ``direction`` is used as given ([D] or [L, D]).

    Pass the unit ``r_hat`` with ``coeff = m * ||r||`` (method.md), or ``r`` with ``coeff = m``.
    ``coeff``: scalar or [L]. ``position_start`` / ``position_stop``: a scalar or one value per
    prompt ([B]); the edit applies at positions in ``[start, stop)`` (default: all).
    """
    mask = make_site_mask(n_layers, layers, sites)
    stop = UNBOUNDED_POSITION if position_stop is None else position_stop
    return ActivationAddition(
        direction=per_layer(direction, n_layers, 1, "direction"),
        coeff=per_layer(coeff, n_layers, 0, "coeff"),
        site_mask=mask,
        position_start=position_bound(position_start, n_layers, "position_start"),
        position_stop=position_bound(stop, n_layers, "position_stop"),
    )
