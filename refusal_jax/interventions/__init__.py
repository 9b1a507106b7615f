"""Interventions on the residual stream: pure vector edits and per-layer pytrees.

Conventions (fixed here once; the modules do not repeat them):

- Activations ``x`` have shape ``[..., D]`` (the forward passes ``[B, T, D]``). Vectors are rows,
  so every linear map acts as ``x @ M``.
- Sites, per layer (``SITES``, the column order of every site mask): ``resid_pre``, ``attn_out``,
  ``mlp_out``, ``resid_post`` (``refusal_jax.models.sites``). ``resid_pre``/``resid_post`` hold
  the stream itself, ``attn_out``/``mlp_out`` the increments added to it.
- An intervention kind (``registry``) is a frozen dataclass pytree. Every array leaf has a
  leading layer axis ``[L]``; which (layer, site) pairs are active is the float leaf
  ``site_mask [L, 4]``: the edit at a site is multiplied by the mask value, so 1 applies it and
  0 leaves ``x`` exactly unchanged. The forward scans over layers with every leaf sliced to one
  layer and calls ``x = intervention.apply(site, x, ctx)`` at each site. All values (directions,
  coefficients, alphas, masks) are arrays, so changing them never recompiles; only the kinds
  and the shapes (L, k, D) are static. ``stack`` puts several interventions of one kind and
  shape on a leading candidate axis for ``jax.vmap``; ``forms`` builds the common form that
  lets interventions of different kinds share one program.
- Normalisation, one rule: what removes or projects a direction normalises it for you
  (``directional_ablation`` takes ``r`` or ``r_hat``); a basis must be orthonormal (checked,
  never silently normalised); the plain ``ablate`` takes a unit vector and raises ValueError
  on any other; what adds a vector (``activation_addition``) adds it exactly as given, so its
  norm is the size of the edit (``coeff * direction``).
- Builders that take ``layers=`` act at every layer by default (``layers=None``).
- Edits are computed in the promoted dtype of ``x`` and the leaves (float32 leaves lift a
  bfloat16 stream to float32), with ``Precision.HIGHEST`` contractions, and returned in ``x``'s
  dtype.

Modules: ``vector_ops`` (pure edits), ``masks`` (site masks), ``registry`` (the kind base class
and name -> kind), the kinds (``addition``, ``projections``, ``affine``), ``compose``,
``forms`` (the common form), ``folding`` (kinds baked into the weights) and ``export``.
"""

from refusal_jax.interventions.addition import ActivationAddition, activation_addition
from refusal_jax.interventions.affine import (
    ObliqueEraser,
    SubspaceClamp,
    oblique_eraser,
    subspace_clamp,
)
from refusal_jax.interventions.compose import Compose, at_layer, check_compatible, stack
from refusal_jax.interventions.folding import fold
from refusal_jax.interventions.forms import Part, assemble, common_form, fill, zero_form
from refusal_jax.interventions.masks import ABLATION_SITES, make_site_mask
from refusal_jax.interventions.per_layer import UNBOUNDED_POSITION
from refusal_jax.interventions.projections import (
    CounterfactualReflection,
    DirectionalAblation,
    NullspaceProjection,
    counterfactual_reflection,
    directional_ablation,
    nullspace_projection,
)
from refusal_jax.interventions.registry import (
    LayerKind,
    intervention_kind,
    kind_class,
    kind_names,
)
from refusal_jax.interventions.vector_ops import (
    ablate,
    add_direction,
    clamp_subspace,
    oblique_erase,
    project_out,
    reflect,
)
from refusal_jax.models.sites import SITE_INDEX, SITES, STREAM_SITES, Intervention, SiteContext

__all__ = [
    "ABLATION_SITES",
    "SITES",
    "SITE_INDEX",
    "STREAM_SITES",
    "UNBOUNDED_POSITION",
    "ActivationAddition",
    "Compose",
    "CounterfactualReflection",
    "DirectionalAblation",
    "Intervention",
    "LayerKind",
    "NullspaceProjection",
    "ObliqueEraser",
    "Part",
    "SiteContext",
    "SubspaceClamp",
    "ablate",
    "activation_addition",
    "add_direction",
    "assemble",
    "at_layer",
    "check_compatible",
    "clamp_subspace",
    "common_form",
    "counterfactual_reflection",
    "directional_ablation",
    "fill",
    "fold",
    "intervention_kind",
    "kind_class",
    "kind_names",
    "make_site_mask",
    "nullspace_projection",
    "oblique_erase",
    "oblique_eraser",
    "project_out",
    "reflect",
    "stack",
    "subspace_clamp",
    "zero_form",
]
