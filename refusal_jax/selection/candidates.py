"""The candidate interventions of selection, stacked on a leading candidate axis for ``jax.vmap``:
the ablation (or nullspace projection) of a (position, layer) and its ActAdd per multiplier."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from refusal_jax.interventions import (
    ABLATION_SITES,
    SITE_INDEX,
    ActivationAddition,
    Compose,
    DirectionalAblation,
    NullspaceProjection,
)

_NO_POSITION_LIMIT = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One intervention to score: which (p, l) it belongs to and what it is.

    kind: "ablate" (ablation / nullspace projection) or "actadd" (with ``multiplier``).
    start: first layer it acts at (where its forward resumes).
    """

    position: int
    layer: int
    kind: str
    start: int
    multiplier: float = 0.0


def _ablation_mask(n_layers: int, layers: Sequence[int]) -> np.ndarray:
    mask = np.zeros((n_layers, 4), np.float32)
    mask[np.ix_(list(layers), [SITE_INDEX[site] for site in ABLATION_SITES])] = 1.0
    return mask


def _stack_candidates(candidates: Sequence[Candidate], *, n_layers: int, global_ablation: bool,
                      ablation_basis: np.ndarray, actadd_direction: np.ndarray,
                      actadd_norm: np.ndarray) -> Compose:
    """Compose(ablation, ActAdd) pytree with a leading candidate axis.

    ablation_basis: [P, L, k, D] (DiM: k = 1 unit direction; INLP: V with zero rows unused);
    actadd_direction: [P, L, D] unit; actadd_norm: [P, L] the coefficient scale ||r||.
    """
    count, width = len(candidates), ablation_basis.shape[-1]
    k = ablation_basis.shape[-2]
    basis = np.zeros((count, n_layers, k, width), np.float32)
    ablation_mask = np.zeros((count, n_layers, 4), np.float32)
    direction = np.zeros((count, n_layers, width), np.float32)
    coeff = np.zeros((count, n_layers), np.float32)
    actadd_mask = np.zeros((count, n_layers, 4), np.float32)
    for index, cand in enumerate(candidates):
        if cand.kind == "ablate":
            basis[index] = ablation_basis[cand.position, cand.layer]
            layers = range(n_layers) if global_ablation else [cand.layer]
            ablation_mask[index] = _ablation_mask(n_layers, layers)
        else:
            direction[index, cand.layer] = actadd_direction[cand.position, cand.layer]
            coeff[index, cand.layer] = cand.multiplier * actadd_norm[cand.position, cand.layer]
            actadd_mask[index, cand.layer, SITE_INDEX["resid_pre"]] = 1.0
    if k == 1:
        ablation = DirectionalAblation(direction=jnp.asarray(basis[:, :, 0]),
                                       site_mask=jnp.asarray(ablation_mask))
    else:
        ablation = NullspaceProjection(basis=jnp.asarray(basis),
                                       site_mask=jnp.asarray(ablation_mask))
    actadd = ActivationAddition(
        direction=jnp.asarray(direction), coeff=jnp.asarray(coeff),
        site_mask=jnp.asarray(actadd_mask),
        position_start=jnp.zeros((count, n_layers), jnp.int32),
        position_stop=jnp.full((count, n_layers), _NO_POSITION_LIMIT, jnp.int32))
    return Compose((ablation, actadd))
