"""Affine edits of the stream: the subspace clamp and the LEACE-style oblique eraser.

Both are edits of the stream as a whole: at stream sites they apply the affine map
``f(x) = x - ((x - c) @ A.T) @ B``; at write sites they apply its linear part
``a - (a @ A.T) @ B``, because ``f(s + a) = f(s) + a - (a @ A.T) @ B``. Applying ``f`` to an
increment instead would add the offset once per write.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from refusal_jax.interventions.masks import ABLATION_SITES, LayerSelection, make_site_mask
from refusal_jax.interventions.per_layer import per_layer, per_layer_basis
from refusal_jax.interventions.registry import LayerKind, intervention_kind
from refusal_jax.interventions.vector_ops import combine, coordinates
from refusal_jax.models.sites import SITES, STREAM_SITES, SiteContext

Array = jax.Array


@intervention_kind("clamp")
class SubspaceClamp(LayerKind):
    """Counterfactual edit that does not undo itself: clamp the stream's coordinates in span(V).

    basis: [L, k, D] orthonormal rows; target: [L, D] a point (e.g. the opposite class's mean)
    whose coordinates ``target @ V.T`` the stream takes; site_mask: [L, 4].

    At stream sites ``x - ((x - target) V^T) V``; at write sites ``a - (a V^T) V``, so that the
    stream leaving a layer keeps the target coordinates (see the module docstring). The map is
    idempotent, so applying it at several layers and sites gives the same coordinates as
    applying it once: a point at the harmful mean lands at the harmless mean's coordinates and
    stays there, while the reference reflection (``CounterfactualReflection``) flips back.
    """

    WIDTH_FIELDS = ("basis", "target")

    basis: Array
    target: Array
    site_mask: Array

    @classmethod
    def zeros(cls, n_layers: int, width: int, k: int) -> SubspaceClamp:
        return cls(basis=np.zeros((n_layers, k, width), np.float32),
                   target=np.zeros((n_layers, width), np.float32),
                   site_mask=np.zeros((n_layers, len(SITES)), np.float32))

    def apply(self, site: str, x: Array, ctx: SiteContext) -> Array:
        return _affine_erase(self.weight_at(site, x), site, x, self.basis, self.basis,
                             self.target)


@intervention_kind("eraser")
class ObliqueEraser(LayerKind):
    """LEACE-style eraser ``x - ((x - mean) @ read.T) @ write`` at the masked sites.

    read, write: [L, k, D] (LEACE's A and B); mean: [L, D]; site_mask: [L, 4]. At write sites
    the linear part ``a - (a @ read.T) @ write`` is applied (see the module docstring).
    """

    WIDTH_FIELDS = ("read", "write", "mean")

    read: Array
    write: Array
    mean: Array
    site_mask: Array

    @classmethod
    def zeros(cls, n_layers: int, width: int, k: int) -> ObliqueEraser:
        return cls(read=np.zeros((n_layers, k, width), np.float32),
                   write=np.zeros((n_layers, k, width), np.float32),
                   mean=np.zeros((n_layers, width), np.float32),
                   site_mask=np.zeros((n_layers, len(SITES)), np.float32))

    def apply(self, site: str, x: Array, ctx: SiteContext) -> Array:
        return _affine_erase(self.weight_at(site, x), site, x, self.read, self.write, self.mean)


def _affine_erase(weight: Array, site: str, x: Array, read: Array, write: Array,
                  center: Array) -> Array:
    """``x - ((x - center) @ read.T) @ write`` on the stream; only its linear part on writes."""
    center = center if site in STREAM_SITES else 0.0
    edit = combine(coordinates(x - center, read), write)
    return (x - weight * edit).astype(x.dtype)


def subspace_clamp(
    basis: Array,
    target: Array,
    *,
    n_layers: int,
    layers: LayerSelection = None,
    sites: Sequence[str] = ABLATION_SITES,
) -> SubspaceClamp:
    """Clamp span(basis) coordinates to those of ``target`` ([D] or [L, D]; see the class)."""
    mask = make_site_mask(n_layers, layers, sites)
    return SubspaceClamp(basis=per_layer_basis(basis, n_layers),
                         target=per_layer(target, n_layers, 1, "target"), site_mask=mask)


def oblique_eraser(
    read: Array,
    write: Array,
    mean: Array,
    *,
    n_layers: int,
    layers: LayerSelection = None,
    sites: Sequence[str] = ABLATION_SITES,
) -> ObliqueEraser:
    """LEACE eraser from its ``A`` (read), ``B`` (write), [k, D] or [L, k, D], and ``mean``.

    From ``refusal_jax.directions.leace``: ``oblique_eraser(e.A, e.B, e.mean, ...)`` for one pair.
    """
    mask = make_site_mask(n_layers, layers, sites)
    read_stacked = per_layer(read, n_layers, 2, "read")
    write_stacked = per_layer(write, n_layers, 2, "write")
    if read_stacked.shape != write_stacked.shape:
        raise ValueError(f"read {read_stacked.shape} and write {write_stacked.shape} differ")
    return ObliqueEraser(read=read_stacked, write=write_stacked,
                         mean=per_layer(mean, n_layers, 1, "mean"), site_mask=mask)
