"""The interventions compared by the study, built from the selected components.

Each variant has one intervention for harmful prompts and one for harmless prompts (they
differ only for ActAdd, which subtracts the direction on harmful prompts and adds it on
harmless ones) and, for the weight-folded model, its own params and config.

Where they act. A component is a selected (EOI position p, layer l) with its direction(s).
In "local" mode an ablation-like intervention acts at the component's layer l only (sites
``resid_pre``, ``attn_out``, ``mlp_out``); in "global" mode at every layer. ActAdd always acts at
``resid_pre`` of layer l, every position, with coefficient ``||r||`` of the DiM component (INLP
ActAdd: along the first INLP direction, at the norm of the best DiM direction). Several
components are merged (see ``_Slots``: every variant has the same pytree form, so the jitted
programs compile once for all of them). LEACE is fitted at, and applied at, the DiM
components. ``dim_folded`` is the global ablation of the best DiM direction folded into the
weights; it must match the hooked global ablation (checked by :func:`folding_agreement`). Each
variant names the method whose component it acts at (``source``): the evaluate stage reads its
activations there.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp
import numpy as np

from refusal_jax import interventions as iv
from refusal_jax.interventions.folding import fold_projection
from refusal_jax.models.core import forward
from refusal_jax.models.loading import Model
from refusal_jax.selection.components import inlp_basis


@dataclasses.dataclass
class Variant:
    name: str
    description: str
    harmful: Any  # intervention pytree or None
    harmless: Any
    params: Any = None  # replacement params (the folded model), else None
    config: Any = None
    source: str = "dim"  # whose selected component it acts at: "dim" or "inlp"


# Slots of the common intervention form, applied in this order (one is active per variant).
SLOTS = ("ablation", "actadd", "reflection", "clamp", "eraser")


class _Slots:
    """Per-layer leaves of every slot, zero (inactive) until a component sets some layers.

    All variants share one pytree structure and shape, ``Compose`` of the five slots, so the
    jitted generation, capture and cross-entropy programs compile once for all of them (a
    zero site mask leaves the stream exactly unchanged). Nullspace projection is the
    reflection slot with alpha = 1.
    """

    def __init__(self, n_layers: int, width: int, k: int):
        self.n_layers = n_layers
        zeros = functools.partial(np.zeros, dtype=np.float32)
        self.leaves = {
            "ablation": dict(direction=zeros((n_layers, width))),
            "actadd": dict(direction=zeros((n_layers, width)), coeff=zeros(n_layers)),
            "reflection": dict(basis=zeros((n_layers, k, width)), alpha=zeros(n_layers)),
            "clamp": dict(basis=zeros((n_layers, k, width)), target=zeros((n_layers, width))),
            "eraser": dict(read=zeros((n_layers, 1, width)), write=zeros((n_layers, 1, width)),
                           mean=zeros((n_layers, width))),
        }
        self.masks = {slot: zeros((n_layers, len(iv.SITES))) for slot in SLOTS}

    def free(self, slot: str, layers: list[int]) -> bool:
        return not self.masks[slot][layers].any()

    def set(self, slot: str, layers: list[int], sites, **values) -> None:
        self.masks[slot][np.ix_(layers, [iv.SITE_INDEX[site] for site in sites])] = 1.0
        for name, value in values.items():
            self.leaves[slot][name][layers] = np.asarray(value, np.float32)

    def build(self) -> iv.Compose:
        leaves = {slot: {name: jnp.asarray(value) for name, value in fields.items()}
                  for slot, fields in self.leaves.items()}
        masks = {slot: jnp.asarray(mask) for slot, mask in self.masks.items()}
        everywhere = np.iinfo(np.int32).max
        return iv.Compose((
            iv.DirectionalAblation(site_mask=masks["ablation"], **leaves["ablation"]),
            iv.ActivationAddition(site_mask=masks["actadd"],
                                  position_start=jnp.zeros(self.n_layers, jnp.int32),
                                  position_stop=jnp.full(self.n_layers, everywhere, jnp.int32),
                                  **leaves["actadd"]),
            iv.CounterfactualReflection(site_mask=masks["reflection"], **leaves["reflection"]),
            iv.SubspaceClamp(site_mask=masks["clamp"], **leaves["clamp"]),
            iv.ObliqueEraser(site_mask=masks["eraser"], **leaves["eraser"]),
        ))


def _assemble(model: Model, k: int, parts: list[tuple[str, list[int], tuple, dict]]):
    """The common form of ``parts`` = [(slot, layers, sites, leaf values)].

    Parts of one slot at different layers share one ``_Slots``; a part whose layers are taken
    starts another one, and the result composes them (a different pytree structure, which
    compiles separately).
    """
    config = model.config
    groups = [_Slots(config.n_layers, config.d_model, k)]
    for slot, layers, sites, values in parts:
        group = next((g for g in groups if g.free(slot, layers)), None)
        if group is None:
            group = _Slots(config.n_layers, config.d_model, k)
            groups.append(group)
        group.set(slot, layers, sites, **values)
    built = [group.build() for group in groups]
    return built[0] if len(built) == 1 else iv.Compose(tuple(built))


def build_variants(model: Model, directions: dict[str, np.ndarray], selection: dict, config, *,
                   names: list[str] | None = None, inlp_k: int | None = None) -> list[Variant]:
    """The variants ``names`` (default ``config.infer.interventions``), in that order.

    ``inlp_k`` keeps only the first ``inlp_k`` INLP directions of every component (the
    tunable-k curve); zeroed rows keep the shapes, so nothing recompiles.
    """
    n_layers = model.config.n_layers
    global_mode = config.select.mode == "global"
    dim_parts = selection["dim"]["components"]
    inlp_parts = selection["inlp"]["components"]
    dim = directions["dim"]
    basis, _ = inlp_basis(directions, config.directions)
    # As many basis rows as the chosen components use: other pairs may keep more directions,
    # and every row of the common form costs each variant's forward passes.
    k_max = max([c["k"] for c in inlp_parts], default=1)
    basis = basis[..., :k_max, :]
    if inlp_k is not None:
        basis = np.where((np.arange(basis.shape[-2]) < inlp_k)[:, None], basis, 0.0)
    best = dim_parts[0]
    best_norm = float(np.linalg.norm(dim[best["position_index"], best["layer"]]))
    mode = "all layers" if global_mode else "the source layer"

    def pl(c):
        return c["position_index"], c["layer"]

    def where_text(parts):
        return ", ".join(f"(pos {c['position']}, layer {c['layer']})" for c in parts)

    def layers_of(c):
        return list(range(n_layers)) if global_mode else [c["layer"]]

    def unit(vector):
        return vector / np.linalg.norm(vector)

    def build(parts):
        return _assemble(model, k_max, parts)

    def dim_ablation():
        return build([("ablation", layers_of(c), iv.ABLATION_SITES,
                       dict(direction=unit(dim[pl(c)]))) for c in dim_parts])

    def dim_actadd(sign):
        return build([("actadd", [c["layer"]], ("resid_pre",),
                       dict(direction=unit(dim[pl(c)]), coeff=sign * np.linalg.norm(dim[pl(c)])))
                      for c in dim_parts])

    def inlp_map(kind, alpha=None):
        if kind == "clamp":
            return build([("clamp", layers_of(c), iv.ABLATION_SITES,
                           dict(basis=basis[pl(c)], target=directions["harmless_mean"][pl(c)]))
                          for c in inlp_parts])
        return build([("reflection", layers_of(c), iv.ABLATION_SITES,
                       dict(basis=basis[pl(c)], alpha=alpha)) for c in inlp_parts])

    def inlp_actadd(sign):
        return build([("actadd", [c["layer"]], ("resid_pre",),
                       dict(direction=directions["inlp_first_direction"][pl(c)],
                            coeff=sign * best_norm)) for c in inlp_parts])

    def leace():
        return build([("eraser", layers_of(c), iv.ABLATION_SITES,
                       dict(read=directions["leace_read"][pl(c)],
                            write=directions["leace_write"][pl(c)],
                            mean=directions["leace_mean"][pl(c)])) for c in dim_parts])

    no_intervention = build([])

    k_text = ", ".join(f"k={c['k']}" for c in inlp_parts)
    builders = {
        "baseline": lambda: Variant("baseline", "no intervention", no_intervention,
                                    no_intervention),
        "dim_ablation": lambda: _same("dim_ablation", f"DiM directional ablation at {mode}, "
                                      f"direction of {where_text(dim_parts)}", dim_ablation()),
        "dim_folded": lambda: _folded(model, dim[pl(best)], where_text([best])),
        "dim_actadd": lambda: Variant(
            "dim_actadd", f"DiM ActAdd at resid_pre of {where_text(dim_parts)}, coefficient "
            "||r||: subtracted on harmful, added on harmless prompts", dim_actadd(-1.0),
            dim_actadd(1.0)),
        "inlp_nullspace": lambda: _same(
            "inlp_nullspace", f"INLP nullspace projection at {mode}, {where_text(inlp_parts)}, "
            f"{k_text}", inlp_map("reflection", 1.0), source="inlp"),
        "inlp_reflection_a1": lambda: _same(
            "inlp_reflection_a1", f"INLP counterfactual map a=1 at {mode}, "
            f"{where_text(inlp_parts)}, {k_text}", inlp_map("reflection", 1.0), source="inlp"),
        "inlp_reflection": lambda: _same(
            "inlp_reflection", f"INLP counterfactual reflection a=2 (reference semantics) at "
            f"{mode}, {where_text(inlp_parts)}, {k_text}", inlp_map("reflection", 2.0),
            source="inlp"),
        "inlp_clamp": lambda: _same(
            "inlp_clamp", f"INLP subspace clamped to the harmless mean (non-undoing flip) at "
            f"{mode}, {where_text(inlp_parts)}, {k_text}", inlp_map("clamp"), source="inlp"),
        "inlp_actadd": lambda: Variant(
            "inlp_actadd", f"ActAdd along the first INLP direction at resid_pre of "
            f"{where_text(inlp_parts)}, coefficient ||r|| of the best DiM direction "
            f"({best_norm:.3g}): subtracted on harmful, added on harmless prompts",
            inlp_actadd(-1.0), inlp_actadd(1.0), source="inlp"),
        "leace": lambda: _same("leace", f"LEACE erasure at {mode}, fitted at "
                               f"{where_text(dim_parts)}", leace()),
    }
    return [builders[name]() for name in (config.infer.interventions if names is None
                                          else names)]


def _same(name: str, description: str, intervention: Any, source: str = "dim") -> Variant:
    return Variant(name, description, intervention, intervention, source=source)


def global_ablation(model: Model, direction: np.ndarray):
    return iv.directional_ablation(direction, n_layers=model.config.n_layers, layers=None)


def _folded(model: Model, direction: np.ndarray, where: str) -> Variant:
    params, config = fold_projection(model.params, global_ablation(model, direction),
                                     config=model.config)
    return Variant("dim_folded", f"global DiM ablation of {where} folded into the weights "
                   "(no hooks)", None, None, params=params, config=config)


def folding_agreement(model: Model, folded: Variant, direction: np.ndarray, batch) -> float:
    """Max |logit difference| between the folded model and the hooked global ablation."""
    tokens, valid = jnp.asarray(batch.tokens), jnp.asarray(batch.valid)
    hooked = forward(model.params, tokens, valid, config=model.config,
                     intervention=global_ablation(model, direction), logits="last").logits
    unhooked = forward(folded.params, tokens, valid, config=folded.config, logits="last").logits
    return float(jnp.max(jnp.abs(hooked - unhooked)))
