"""Interventions on the residual stream: pure vector functions and per-layer pytrees.

Conventions (fixed here once; the functions below do not repeat them):

- Activations ``x`` have shape ``[..., D]`` (the forward passes ``[B, T, D]``). Vectors are rows,
  so every linear map acts as ``x @ M``.
- ``direction`` is a ``[D]`` vector, ``r_hat`` a unit one. ``basis`` ``V`` is ``[k, D]`` with
  orthonormal rows; a row of zeros is "unused" and contributes nothing, so a k-policy can mask
  directions without changing shapes (and without recompiling).
- Sites, per layer ``l`` (``SITES`` order is the column order of every site mask):
    ``resid_pre``  input of block ``l`` (before its norm);
    ``attn_out``   what attention adds to the stream (after o_proj; Gemma2: after its post-norm);
    ``mlp_out``    what the MLP adds to the stream (after down_proj; Gemma2: after its post-norm);
    ``resid_post`` output of block ``l`` (equal to ``resid_pre`` of block ``l + 1``).
  ``resid_pre``/``resid_post`` hold the stream itself ("stream sites"); ``attn_out``/``mlp_out``
  hold increments that are added to it ("write sites").
- An intervention is a ``jax.tree_util.register_dataclass`` pytree. Every array leaf has a
  leading layer axis ``[L]``; which (layer, site) pairs are active is the float leaf
  ``site_mask [L, 4]``: the edit at a site is multiplied by the mask value, so 1 applies it and
  0 leaves ``x`` exactly unchanged. The forward scans over layers with every leaf sliced to one
  layer and calls ``x = intervention.apply(site, x, ctx)`` at each site. All values (directions,
  coefficients, alphas, masks) are arrays, so changing them never recompiles; only the kind of
  intervention and the shapes (L, k, D) are static. ``stack`` puts several interventions of one
  kind and shape on a leading candidate axis for ``jax.vmap``.
- Affine edits (``SubspaceClamp``, ``ObliqueEraser``) are edits of the stream as a whole: at
  stream sites they apply the affine map ``f(x) = x - ((x - c) @ A.T) @ B``; at write sites they
  apply its linear part ``a - (a @ A.T) @ B``, because ``f(s + a) = f(s) + a - (a @ A.T) @ B``.
  Applying ``f`` to an increment instead would add the offset once per write.
- Edits are computed in the promoted dtype of ``x`` and the leaves (float32 leaves lift a
  bfloat16 stream to float32), with ``Precision.HIGHEST`` contractions so that the removed
  component really is zero on accelerators too, and returned in ``x``'s dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.models.sites import (
    SITE_INDEX,
    SITES,
    STREAM_SITES,
    Intervention,
    SiteContext,
)

# The sites of directional ablation (Arditi et al.) and of the INLP interventions.
ABLATION_SITES: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out")

_HIGHEST = jax.lax.Precision.HIGHEST
# Default ActAdd position_stop: no upper limit.
UNBOUNDED_POSITION = int(np.iinfo(np.int32).max)
# Tolerance of the orthonormality check of a basis (float32 Gram-Schmidt reaches ~1e-6).
_ORTHONORMAL_ATOL = 1e-3

Array = jax.Array
LayerSelection = int | Sequence[int] | None


class _ChecksFit:
    """``check_fits``, which the forward calls on the intervention it is given."""

    def check_fits(self, n_layers: int, d_model: int) -> None:
        check_compatible(self, n_layers=n_layers, d_model=d_model, allow_candidate_axis=False)


# --------------------------------------------------------------------------------------------
# Pure functions on vectors (any shape [..., D]; no layers, no sites).


def _coordinates(x: Array, basis: Array) -> Array:
    """Coordinates ``x @ basis.T`` ([..., k]) of ``x`` along the rows of ``basis``."""
    return jnp.einsum("...d,kd->...k", x, basis, precision=_HIGHEST)


def _combine(coordinates: Array, basis: Array) -> Array:
    """The vector ``coordinates @ basis`` ([..., D])."""
    return jnp.einsum("...k,kd->...d", coordinates, basis, precision=_HIGHEST)


def add_direction(x: Array, direction: Array, coeff: Array | float) -> Array:
    """Activation addition: ``x + coeff * direction``."""
    return x + coeff * direction


def ablate(x: Array, r_hat: Array) -> Array:
    """Directional ablation: ``x - (x . r_hat) r_hat`` for a unit ``r_hat`` [D]."""
    return project_out(x, r_hat[None, :])


def project_out(x: Array, basis: Array) -> Array:
    """Nullspace projection ``P x`` with ``P = I - V^T V``: ``x - (x V^T) V``."""
    return reflect(x, basis, 1.0)


def reflect(x: Array, basis: Array, alpha: Array | float) -> Array:
    """Counterfactual map ``P_a x = a P x + (1 - a) x = x - a (x V^T) V``.

    ``alpha = 1`` is nullspace projection; ``alpha = 2`` negates the component inside the
    subspace (a reflection, an involution).
    """
    return x - alpha * _combine(_coordinates(x, basis), basis)


def clamp_subspace(x: Array, basis: Array, target: Array) -> Array:
    """Set the coordinates of ``x`` in span(V) to those of the point ``target`` [D].

    ``x - ((x - target) V^T) V``: the part of ``x`` outside the subspace is kept. Idempotent.
    """
    return oblique_erase(x, basis, basis, target)


def oblique_erase(x: Array, read: Array, write: Array, mean: Array) -> Array:
    """Low-rank affine eraser (LEACE form): ``x - ((x - mean) @ read.T) @ write``.

    ``read`` and ``write`` are [k, D] (LEACE's ``A`` and ``B``), ``mean`` [D].
    """
    return x - _combine(_coordinates(x - mean, read), write)


# --------------------------------------------------------------------------------------------
# Per-layer pytrees. Leaves below are documented with their full shapes ([L, ...]); inside
# ``apply`` they are sliced to one layer.


def _site_weight(site_mask: Array, site: str, kind: str) -> Array:
    if site not in SITE_INDEX:
        raise ValueError(f"unknown site {site!r}; expected one of {SITES}")
    if site_mask.ndim != 1:
        raise ValueError(
            f"{kind}.apply expects leaves sliced to one layer (site_mask of shape [4]), got "
            f"site_mask of shape {site_mask.shape}; use at_layer(intervention, layer) outside "
            "the forward's scan"
        )
    return site_mask[SITE_INDEX[site]]


def _check_width(x: Array, width: int, kind: str) -> None:
    if x.shape[-1] != width:
        raise ValueError(f"{kind}: activations have width {x.shape[-1]}, the intervention {width}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ActivationAddition(_ChecksFit):
    """``x + coeff * direction`` at the masked (layer, site) pairs and token positions.

    direction: [L, D]; coeff: [L]; site_mask: [L, 4].
    position_start, position_stop: [L] or [L, B] int32. The edit applies to valid tokens whose
      position (``ctx.positions``) lies in ``[position_start, position_stop)``. Defaults cover
      every position. Use [L, B] for per-prompt windows, e.g. only the generated tokens
      (start = prompt length of each row) or only the last ``n`` prompt tokens
      (start = prompt length - n, stop = prompt length).
    """

    direction: Array
    coeff: Array
    site_mask: Array
    position_start: Array
    position_stop: Array

    def apply(self, site: str, x: Array, ctx: SiteContext) -> Array:
        weight = _site_weight(self.site_mask, site, "ActivationAddition")
        _check_width(x, self.direction.shape[-1], "ActivationAddition")
        in_window = (ctx.positions >= self.position_start[..., None]) & (
            ctx.positions < self.position_stop[..., None]
        )
        scale = weight * self.coeff * (ctx.valid & in_window)
        return add_direction(x, self.direction, scale[..., None]).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DirectionalAblation(_ChecksFit):
    """``x - (x . r_hat) r_hat`` at the masked sites. direction: [L, D] unit; site_mask: [L, 4]."""

    direction: Array
    site_mask: Array

    def apply(self, site: str, x: Array, ctx: SiteContext) -> Array:
        weight = _site_weight(self.site_mask, site, "DirectionalAblation")
        _check_width(x, self.direction.shape[-1], "DirectionalAblation")
        return reflect(x, self.direction[None, :], weight).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NullspaceProjection(_ChecksFit):
    """``x - (x V^T) V`` at the masked sites.

    basis: [L, k, D] orthonormal (or zero) rows; site_mask: [L, 4].
    """

    basis: Array
    site_mask: Array

    def apply(self, site: str, x: Array, ctx: SiteContext) -> Array:
        weight = _site_weight(self.site_mask, site, "NullspaceProjection")
        _check_width(x, self.basis.shape[-1], "NullspaceProjection")
        return reflect(x, self.basis, weight).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CounterfactualReflection(_ChecksFit):
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

    basis: Array
    alpha: Array
    site_mask: Array

    def apply(self, site: str, x: Array, ctx: SiteContext) -> Array:
        weight = _site_weight(self.site_mask, site, "CounterfactualReflection")
        _check_width(x, self.basis.shape[-1], "CounterfactualReflection")
        return reflect(x, self.basis, weight * self.alpha).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SubspaceClamp(_ChecksFit):
    """Counterfactual edit that does not undo itself: clamp the stream's coordinates in span(V).

    basis: [L, k, D] orthonormal rows; target: [L, D] a point (e.g. the opposite class's mean)
    whose coordinates ``target @ V.T`` the stream takes; site_mask: [L, 4].

    At stream sites ``x - ((x - target) V^T) V``; at write sites ``a - (a V^T) V``, so that the
    stream leaving a layer keeps the target coordinates (see the module docstring). The map is
    idempotent, so applying it at several layers and sites gives the same coordinates as
    applying it once: a point at the harmful mean lands at the harmless mean's coordinates and
    stays there, while the reference reflection (``CounterfactualReflection``) flips back.
    """

    basis: Array
    target: Array
    site_mask: Array

    def apply(self, site: str, x: Array, ctx: SiteContext) -> Array:
        return _affine_erase(self, site, x, self.basis, self.basis, self.target)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ObliqueEraser(_ChecksFit):
    """LEACE-style eraser ``x - ((x - mean) @ read.T) @ write`` at the masked sites.

    read, write: [L, k, D] (LEACE's A and B); mean: [L, D]; site_mask: [L, 4]. At write sites
    the linear part ``a - (a @ read.T) @ write`` is applied (see the module docstring).
    """

    read: Array
    write: Array
    mean: Array
    site_mask: Array

    def apply(self, site: str, x: Array, ctx: SiteContext) -> Array:
        return _affine_erase(self, site, x, self.read, self.write, self.mean)


def _affine_erase(
    intervention: Any, site: str, x: Array, read: Array, write: Array, center: Array
) -> Array:
    """``x - ((x - center) @ read.T) @ write`` on the stream; only its linear part on writes."""
    kind = type(intervention).__name__
    weight = _site_weight(intervention.site_mask, site, kind)
    _check_width(x, read.shape[-1], kind)
    center = center if site in STREAM_SITES else 0.0
    edit = _combine(_coordinates(x - center, read), write)
    return (x - weight * edit).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Compose(_ChecksFit):
    """Several interventions applied in order at every site: ``interventions[0]`` first.

    ``Compose((a, b)).apply(site, x, ctx) == b.apply(site, a.apply(site, x, ctx), ctx)``.
    """

    interventions: tuple[Intervention, ...]

    def apply(self, site: str, x: Array, ctx: SiteContext) -> Array:
        for intervention in self.interventions:
            x = intervention.apply(site, x, ctx)
        return x


# --------------------------------------------------------------------------------------------
# Helpers on whole pytrees.

T = TypeVar("T")


def at_layer(intervention: T, layer: int) -> T:
    """The intervention sliced to one layer, as the forward's scan sees it."""
    return jax.tree_util.tree_map(lambda leaf: leaf[layer], intervention)


def stack(interventions: Sequence[T]) -> T:
    """Stack interventions of one kind and shape on a new leading candidate axis (for vmap)."""
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
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *interventions)


# Leaves whose last axis is not the model width.
_NON_VECTOR_FIELDS = frozenset({"site_mask", "coeff", "alpha", "position_start", "position_stop"})


def check_compatible(
    intervention: object, *, n_layers: int, d_model: int, allow_candidate_axis: bool = True
) -> None:
    """Raise ValueError unless the intervention fits a model with ``n_layers`` and ``d_model``.

    Works on a single intervention ([L, ...] leaves) and, when ``allow_candidate_axis``, on a
    stacked one ([C, L, ...]). The forward pass itself takes a single one (vmap over the rest).
    """
    if isinstance(intervention, Compose):
        for part in intervention.interventions:
            check_compatible(
                part, n_layers=n_layers, d_model=d_model, allow_candidate_axis=allow_candidate_axis
            )
        return
    if not hasattr(intervention, "apply"):
        raise ValueError(f"not an intervention (no apply method): {type(intervention).__name__}")
    if not hasattr(intervention, "site_mask"):
        return  # a user-defined intervention: its own apply is responsible for its shapes
    kind = type(intervention).__name__
    mask_shape = intervention.site_mask.shape
    if not allow_candidate_axis and len(mask_shape) != 2:
        raise ValueError(
            f"{kind} has a leading candidate axis (site_mask {mask_shape}); the forward takes one "
            "intervention: jax.vmap over the candidate axis to evaluate a stack"
        )
    if mask_shape[-2:] != (n_layers, len(SITES)):
        raise ValueError(
            f"{kind} was built for {mask_shape[-2]} layers (site_mask {mask_shape}); the model has "
            f"{n_layers}: pass n_layers={n_layers} to its constructor"
        )
    for field in dataclasses.fields(intervention):
        if field.name in _NON_VECTOR_FIELDS:
            continue
        leaf = getattr(intervention, field.name)
        if leaf.shape[-1] != d_model:
            raise ValueError(
                f"{kind}.{field.name} has width {leaf.shape[-1]}; the model's d_model is {d_model}"
            )


# --------------------------------------------------------------------------------------------
# Constructors from plain arrays.


def make_site_mask(n_layers: int, layers: LayerSelection, sites: Sequence[str]) -> Array:
    """Float32 [n_layers, 4] mask: 1 at (layer, site) for the selected layers and sites.

    ``layers``: one index, a sequence of indices, or None for all layers.
    """
    if not isinstance(n_layers, (int, np.integer)) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    if isinstance(sites, str):
        raise ValueError(f"sites must be a sequence of site names, got the string {sites!r}")
    unknown = [site for site in sites if site not in SITE_INDEX]
    if unknown or not sites:
        raise ValueError(f"sites must be a non-empty subset of {SITES}, got {tuple(sites)}")
    if layers is None:
        layer_list = list(range(n_layers))
    elif isinstance(layers, (int, np.integer)):
        layer_list = [int(layers)]
    else:
        layer_list = [int(layer) for layer in layers]
    if not layer_list:
        raise ValueError("layers is empty; pass None for all layers")
    outside = [layer for layer in layer_list if not 0 <= layer < n_layers]
    if outside:
        raise ValueError(f"layers {outside} outside [0, {n_layers}) for n_layers={n_layers}")
    mask = np.zeros((n_layers, len(SITES)), np.float32)
    mask[np.ix_(layer_list, [SITE_INDEX[site] for site in sites])] = 1.0
    return jnp.asarray(mask)


def _per_layer(value: object, n_layers: int, vector_ndim: int, name: str) -> Array:
    """``value`` of ndim ``vector_ndim`` (shared) or ``vector_ndim + 1`` (per layer) -> [L, ...]."""
    array = jnp.asarray(value, dtype=jnp.float32)
    if array.ndim == vector_ndim:
        return jnp.broadcast_to(array, (n_layers, *array.shape))
    if array.ndim == vector_ndim + 1 and array.shape[0] == n_layers:
        return array
    raise ValueError(
        f"{name} must have {vector_ndim} dims (shared by all layers) or {vector_ndim + 1} with a "
        f"leading axis of n_layers={n_layers}; got shape {array.shape}"
    )


def _per_layer_basis(basis: Array, n_layers: int) -> Array:
    """An orthonormal basis [k, D] or [L, k, D] -> [L, k, D] (checked before broadcasting)."""
    array = jnp.asarray(basis, dtype=jnp.float32)
    _check_orthonormal(array, "basis")
    return _per_layer(array, n_layers, 2, "basis")


def _is_concrete(array: Array) -> bool:
    return not isinstance(array, jax.core.Tracer)


def _unit_rows(direction: Array, name: str) -> Array:
    norms = jnp.linalg.norm(direction, axis=-1, keepdims=True)
    if _is_concrete(norms) and not np.all(np.asarray(norms) > 0):
        raise ValueError(f"{name} has a zero (or NaN) row; it cannot be normalised")
    return direction / norms


def _check_orthonormal(basis: Array, name: str) -> None:
    """Rows must be orthonormal or zero (zero rows are unused directions)."""
    if not _is_concrete(basis):
        return
    rows = np.asarray(basis, np.float64)
    gram = np.einsum("...kd,...jd->...kj", rows, rows)
    diagonal = np.diagonal(gram, axis1=-2, axis2=-1)
    used = (diagonal > 0.5).astype(np.float64)
    expected = used[..., :, None] * np.eye(gram.shape[-1])
    if not np.allclose(gram, expected, atol=_ORTHONORMAL_ATOL):
        error = np.abs(gram - expected).max()
        raise ValueError(
            f"{name} rows must be orthonormal (or zero for unused directions); V V^T is off by "
            f"{error:.3g}. Orthonormalise it first (e.g. Gram-Schmidt / QR of V^T)."
        )


def _position_bound(value: object, n_layers: int, name: str) -> Array:
    """A scalar or per-prompt [B] int bound -> [L] or [L, B] int32."""
    array = jnp.asarray(value, dtype=jnp.int32)
    if array.ndim > 1:
        raise ValueError(
            f"{name} must be a scalar or one value per prompt ([B]); got shape {array.shape}"
        )
    return jnp.broadcast_to(array, (n_layers, *array.shape))


def activation_addition(
    direction: Array,
    coeff: Array | float,
    *,
    n_layers: int,
    layers: LayerSelection,
    sites: Sequence[str] = ("resid_pre",),
    position_start: Array | int = 0,
    position_stop: Array | int | None = None,
) -> ActivationAddition:
    """ActAdd ``x + coeff * direction``; ``direction`` is used as given ([D] or [L, D]).

    Pass the unit ``r_hat`` with ``coeff = m * ||r||`` (METHOD.md), or ``r`` with ``coeff = m``.
    ``coeff``: scalar or [L]. ``position_start`` / ``position_stop``: a scalar or one value per
    prompt ([B]); the edit applies at positions in ``[start, stop)`` (default: all).
    """
    mask = make_site_mask(n_layers, layers, sites)
    stop = UNBOUNDED_POSITION if position_stop is None else position_stop
    return ActivationAddition(
        direction=_per_layer(direction, n_layers, 1, "direction"),
        coeff=_per_layer(coeff, n_layers, 0, "coeff"),
        site_mask=mask,
        position_start=_position_bound(position_start, n_layers, "position_start"),
        position_stop=_position_bound(stop, n_layers, "position_stop"),
    )


def directional_ablation(
    direction: Array,
    *,
    n_layers: int,
    layers: LayerSelection,
    sites: Sequence[str] = ABLATION_SITES,
) -> DirectionalAblation:
    """Ablate ``direction`` ([D] or [L, D]; normalised here, so ``r`` or ``r_hat`` both work).

    ``layers=None`` with the default sites is Arditi et al.'s global ablation (foldable into the
    weights with ``refusal_jax.interventions.folding``).
    """
    mask = make_site_mask(n_layers, layers, sites)
    unit = _unit_rows(_per_layer(direction, n_layers, 1, "direction"), "direction")
    return DirectionalAblation(direction=unit, site_mask=mask)


def nullspace_projection(
    basis: Array,
    *,
    n_layers: int,
    layers: LayerSelection,
    sites: Sequence[str] = ABLATION_SITES,
) -> NullspaceProjection:
    """Project out span(basis); ``basis`` [k, D] or [L, k, D], orthonormal or zero rows."""
    mask = make_site_mask(n_layers, layers, sites)
    stacked = _per_layer_basis(basis, n_layers)
    return NullspaceProjection(basis=stacked, site_mask=mask)


def counterfactual_reflection(
    basis: Array,
    alpha: Array | float,
    *,
    n_layers: int,
    layers: LayerSelection,
    sites: Sequence[str] = ABLATION_SITES,
) -> CounterfactualReflection:
    """The reference's ``P_a = a P + (1 - a) I``; ``alpha`` scalar or [L] (see the class)."""
    mask = make_site_mask(n_layers, layers, sites)
    stacked = _per_layer_basis(basis, n_layers)
    return CounterfactualReflection(
        basis=stacked, alpha=_per_layer(alpha, n_layers, 0, "alpha"), site_mask=mask
    )


def subspace_clamp(
    basis: Array,
    target: Array,
    *,
    n_layers: int,
    layers: LayerSelection,
    sites: Sequence[str] = ABLATION_SITES,
) -> SubspaceClamp:
    """Clamp span(basis) coordinates to those of ``target`` ([D] or [L, D]; see the class)."""
    mask = make_site_mask(n_layers, layers, sites)
    stacked = _per_layer_basis(basis, n_layers)
    return SubspaceClamp(
        basis=stacked, target=_per_layer(target, n_layers, 1, "target"), site_mask=mask
    )


def oblique_eraser(
    read: Array,
    write: Array,
    mean: Array,
    *,
    n_layers: int,
    layers: LayerSelection,
    sites: Sequence[str] = ABLATION_SITES,
) -> ObliqueEraser:
    """LEACE eraser from its ``A`` (read), ``B`` (write), [k, D] or [L, k, D], and ``mean``.

    From ``refusal_jax.directions.leace``: ``oblique_eraser(e.A, e.B, e.mean, ...)`` for one pair.
    """
    mask = make_site_mask(n_layers, layers, sites)
    read_stacked = _per_layer(read, n_layers, 2, "read")
    write_stacked = _per_layer(write, n_layers, 2, "write")
    if read_stacked.shape != write_stacked.shape:
        raise ValueError(f"read {read_stacked.shape} and write {write_stacked.shape} differ")
    return ObliqueEraser(
        read=read_stacked,
        write=write_stacked,
        mean=_per_layer(mean, n_layers, 1, "mean"),
        site_mask=mask,
    )
