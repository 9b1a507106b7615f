"""The interventions compared by the study, built from the selected components.

Each variant has one intervention for harmful prompts and one for harmless prompts (they
differ only for ActAdd, which subtracts the direction on harmful prompts and adds it on
harmless ones) and, for the weight-folded model, its own params and config.

Where they act. A component is a selected (EOI position p, layer l) with its direction(s).
In "local" mode an ablation-like intervention acts at the component's layer l only (sites
``resid_pre``, ``attn_out``, ``mlp_out``); in "global" mode at every layer. ActAdd always acts at
``resid_pre`` of layer l, every position, with coefficient ``||r||`` of the DiM component (INLP
ActAdd: along the first INLP direction, at the norm of the best DiM direction). Several
components are merged into one common form (``refusal_jax.interventions.forms``): every
variant is a ``Compose`` of the kinds ``FORM_KINDS``, so the jitted programs compile once for
all of them. LEACE is fitted at, and applied at, the DiM components. ``dim_folded`` is the
global ablation of the best DiM direction folded into the weights; it must match the hooked
global ablation (checked by :func:`folding_agreement`). Each variant names the method whose
component it acts at (``source``): the evaluate stage reads its activations there.

The variants are the rows of ``VARIANTS`` (name -> :class:`VariantSpec`); ``study.config``
takes the valid ``infer.interventions`` names from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax import interventions as iv
from refusal_jax.models.core import forward
from refusal_jax.models.loading import Model
from refusal_jax.selection.components import inlp_basis

# The kinds of the common form, in the order they apply: every kind a variant below uses
# (nullspace projection is the reflection with alpha = 1).
FORM_KINDS = ("ablation", "actadd", "reflection", "clamp", "eraser")


@dataclasses.dataclass
class Variant:
    name: str
    description: str
    harmful: Any  # intervention pytree or None
    harmless: Any
    params: Any = None  # replacement params (the folded model), else None
    config: Any = None
    source: str = "dim"  # whose selected component it acts at: "dim" or "inlp"


class _Components:
    """The selected components of both methods, as parts of the common form."""

    def __init__(self, model: Model, directions: dict[str, np.ndarray], selection: dict,
                 config, inlp_k: int | None):
        self.model, self.directions, self.dim = model, directions, directions["dim"]
        self.n_layers = model.config.n_layers
        self.global_mode = config.select.mode == "global"
        self.dim_parts = selection["dim"]["components"]
        self.inlp_parts = selection["inlp"]["components"]
        # ActAdd's components and the best DiM component differ from the erasures' ones only
        # under reference.unfiltered_components (select stage).
        self.dim_actadd_parts = selection["dim"].get("actadd_components", self.dim_parts)
        self.inlp_actadd_parts = selection["inlp"].get("actadd_components", self.inlp_parts)
        basis, _ = inlp_basis(directions, config.directions)
        # As many basis rows as the chosen components use: other pairs may keep more
        # directions, and every row of the common form costs each variant's forward passes.
        k_max = max([c["k"] for c in self.inlp_parts], default=1)
        basis = basis[..., :k_max, :]
        if inlp_k is not None:
            basis = np.where((np.arange(basis.shape[-2]) < inlp_k)[:, None], basis, 0.0)
        self.basis = basis
        self.ranks = {"reflection": k_max, "clamp": k_max,
                      "eraser": directions["leace_read"].shape[-2]}
        self.best = selection["dim"].get("best", self.dim_parts[0])
        self.best_norm = float(np.linalg.norm(self.dim[self._pl(self.best)]))
        self.text = {  # the fields of the descriptions
            "mode": "all layers" if self.global_mode else "the source layer",
            "dim_where": _where(self.dim_parts), "inlp_where": _where(self.inlp_parts),
            "dim_actadd_where": _where(self.dim_actadd_parts),
            "inlp_actadd_where": _where(self.inlp_actadd_parts),
            "best_where": _where([self.best]),
            "k_text": ", ".join(f"k={c['k']}" for c in self.inlp_parts),
            "best_norm": self.best_norm,
        }

    @staticmethod
    def _pl(c: dict) -> tuple[int, int]:
        """The (position, layer) whose direction the component uses: its own, or its
        ``direction_source``."""
        return tuple(c.get("direction_source", (c["position_index"], c["layer"])))

    def _layers(self, c: dict) -> list[int]:
        return list(range(self.n_layers)) if self.global_mode else [c["layer"]]

    def form(self, parts: list[iv.Part]) -> iv.Compose:
        return iv.common_form(parts, kinds=FORM_KINDS, n_layers=self.n_layers,
                              width=self.model.config.d_model, ranks=self.ranks)

    def none(self) -> iv.Compose:
        return self.form([])

    def dim_ablation(self) -> iv.Compose:
        return self.form([iv.Part("ablation", self._layers(c), iv.ABLATION_SITES,
                                  dict(direction=_unit(self.dim[self._pl(c)])))
                          for c in self.dim_parts])

    def dim_actadd(self, sign: float) -> iv.Compose:
        return self.form([iv.Part("actadd", [c["layer"]], ("resid_pre",),
                                  dict(direction=_unit(self.dim[self._pl(c)]),
                                       coeff=sign * np.linalg.norm(self.dim[self._pl(c)])))
                          for c in self.dim_actadd_parts])

    def inlp_map(self, kind: str, alpha: float | None = None) -> iv.Compose:
        """``kind`` "reflection" (with ``alpha``) or "clamp" (to the harmless mean)."""
        if kind == "clamp":
            return self.form([iv.Part("clamp", self._layers(c), iv.ABLATION_SITES,
                                      dict(basis=self.basis[self._pl(c)],
                                           target=self.directions["harmless_mean"][self._pl(c)]))
                              for c in self.inlp_parts])
        return self.form([iv.Part("reflection", self._layers(c), iv.ABLATION_SITES,
                                  dict(basis=self.basis[self._pl(c)], alpha=alpha))
                          for c in self.inlp_parts])

    def inlp_actadd(self, sign: float) -> iv.Compose:
        return self.form([iv.Part("actadd", [c["layer"]], ("resid_pre",),
                                  dict(direction=self.directions["inlp_first_direction"][
                                      self._pl(c)], coeff=sign * self.best_norm))
                          for c in self.inlp_actadd_parts])

    def leace(self) -> iv.Compose:
        return self.form([iv.Part("eraser", self._layers(c), iv.ABLATION_SITES,
                                  dict(read=self.directions["leace_read"][self._pl(c)],
                                       write=self.directions["leace_write"][self._pl(c)],
                                       mean=self.directions["leace_mean"][self._pl(c)]))
                          for c in self.dim_parts])

    def folded_dim_ablation(self) -> tuple[Any, Any]:
        """(params, config) with the global ablation of the best DiM direction folded in."""
        return iv.fold(self.model.params,
                       global_ablation(self.model, self.dim[self._pl(self.best)]),
                       config=self.model.config)


Build = Callable[[_Components], Any]


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    """A row of the variant table.

    description: a ``str.format`` template over ``_Components.text``.
    harmful: its intervention on harmful prompts; None: no hooks.
    harmless: its intervention on harmless prompts; None: the one on harmful prompts.
    weights: its own (params, config), e.g. a folded model; None: the model's.
    source: whose selected component it acts at ("dim" or "inlp").
    k_curve: its INLP basis can be cut to the first k directions (the tunable-k curve).
    """

    description: str
    harmful: Build | None = None
    harmless: Build | None = None
    weights: Build | None = None
    source: str = "dim"
    k_curve: bool = False


VARIANTS: dict[str, VariantSpec] = {
    "baseline": VariantSpec("no intervention", harmful=lambda c: c.none()),
    "dim_ablation": VariantSpec(
        "DiM directional ablation at {mode}, direction of {dim_where}",
        harmful=lambda c: c.dim_ablation()),
    "dim_folded": VariantSpec(
        "global DiM ablation of {best_where} folded into the weights (no hooks)",
        weights=lambda c: c.folded_dim_ablation()),
    "dim_actadd": VariantSpec(
        "DiM ActAdd at resid_pre of {dim_actadd_where}, coefficient ||r||: subtracted on harmful, "
        "added on harmless prompts",
        harmful=lambda c: c.dim_actadd(-1.0), harmless=lambda c: c.dim_actadd(1.0)),
    "inlp_nullspace": VariantSpec(
        "INLP nullspace projection at {mode}, {inlp_where}, {k_text}",
        harmful=lambda c: c.inlp_map("reflection", 1.0), source="inlp", k_curve=True),
    "inlp_reflection_a1": VariantSpec(
        "INLP counterfactual map a=1 at {mode}, {inlp_where}, {k_text}",
        harmful=lambda c: c.inlp_map("reflection", 1.0), source="inlp", k_curve=True),
    "inlp_reflection": VariantSpec(
        "INLP counterfactual reflection a=2 (reference semantics) at {mode}, {inlp_where}, "
        "{k_text}",
        harmful=lambda c: c.inlp_map("reflection", 2.0), source="inlp", k_curve=True),
    "inlp_clamp": VariantSpec(
        "INLP subspace clamped to the harmless mean (non-undoing flip) at {mode}, "
        "{inlp_where}, {k_text}",
        harmful=lambda c: c.inlp_map("clamp"), source="inlp", k_curve=True),
    "inlp_actadd": VariantSpec(
        "ActAdd along the first INLP direction at resid_pre of {inlp_actadd_where}, coefficient "
        "||r|| of the best DiM direction ({best_norm:.3g}): subtracted on harmful, added on "
        "harmless prompts",
        harmful=lambda c: c.inlp_actadd(-1.0), harmless=lambda c: c.inlp_actadd(1.0),
        source="inlp"),
    "leace": VariantSpec("LEACE erasure at {mode}, fitted at {dim_where}",
                         harmful=lambda c: c.leace()),
}


def build_variants(model: Model, directions: dict[str, np.ndarray], selection: dict, config, *,
                   names: list[str] | None = None, inlp_k: int | None = None) -> list[Variant]:
    """The variants ``names`` (default ``config.infer.interventions``), in that order.

    ``inlp_k`` keeps only the first ``inlp_k`` INLP directions of every component (the
    tunable-k curve); zeroed rows keep the shapes, so nothing recompiles.
    """
    names = config.infer.interventions if names is None else names
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {tuple(VARIANTS)}")
    components = _Components(model, directions, selection, config, inlp_k)
    return [_build(name, VARIANTS[name], components) for name in names]


def _build(name: str, spec: VariantSpec, components: _Components) -> Variant:
    harmful = None if spec.harmful is None else spec.harmful(components)
    harmless = harmful if spec.harmless is None else spec.harmless(components)
    params, config = (None, None) if spec.weights is None else spec.weights(components)
    return Variant(name, spec.description.format(**components.text), harmful, harmless,
                   params=params, config=config, source=spec.source)


def _where(parts: list[dict]) -> str:
    def one(c: dict) -> str:
        if "direction_source" not in c:
            return f"(pos {c['position']}, layer {c['layer']})"
        p, l = c["direction_source"]
        p += c["position"] - c["position_index"]
        return f"(pos {c['position']}, layer {c['layer']}; direction of pos {p}, layer {l})"

    return ", ".join(one(c) for c in parts)


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def first_equal(variants: Sequence[Variant]) -> list[int]:
    """For each variant, the index of the first one in ``variants`` that runs the same
    intervention on the model's own weights: equal trees and leaves (shapes, dtypes, values) on
    both prompt classes, so the same completions and metrics (e.g. ``inlp_nullspace`` and
    ``inlp_reflection_a1``, one map under two names). Its own index when none earlier does; a
    variant with its own weights or config is never merged."""
    firsts: list[int] = []
    for index, variant in enumerate(variants):
        firsts.append(next((j for j in range(index) if firsts[j] == j
                            and _same_intervention(variants[j], variant)), index))
    return firsts


def _same_intervention(a: Variant, b: Variant) -> bool:
    if any(v.params is not None or v.config is not None for v in (a, b)):
        return False
    return all(_equal_trees(getattr(a, cls), getattr(b, cls)) for cls in ("harmful", "harmless"))


def _equal_trees(a: Any, b: Any) -> bool:
    leaves_a, structure_a = jax.tree.flatten(a)
    leaves_b, structure_b = jax.tree.flatten(b)
    if structure_a != structure_b:
        return False
    for x, y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != y.dtype or not np.array_equal(x, y):
            return False
    return True


def global_ablation(model: Model, direction: np.ndarray):
    return iv.directional_ablation(direction, n_layers=model.config.n_layers, layers=None)


def folding_agreement(model: Model, folded: Variant, direction: np.ndarray, batch) -> float:
    """Max |logit difference| between the folded model and the hooked global ablation."""
    tokens, valid = jnp.asarray(batch.tokens), jnp.asarray(batch.valid)
    hooked = forward(model.params, tokens, valid, config=model.config,
                     intervention=global_ablation(model, direction), logits="last").logits
    unhooked = forward(folded.params, tokens, valid, config=folded.config, logits="last").logits
    return float(jnp.max(jnp.abs(hooked - unhooked)))
