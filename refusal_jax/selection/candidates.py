"""The candidate interventions of selection, stacked on a leading candidate axis for ``jax.vmap``:
the ablation (or nullspace projection) of a (position, layer) and its ActAdd per multiplier.

Every candidate is one part of the common form of the candidates' kinds
(``refusal_jax.interventions.forms``), so the candidates of a chunk share one pytree."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.interventions import ABLATION_SITES, Compose, Part, assemble
from refusal_jax.interventions.compose import check_same_form


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


def stack_parts(parts: Sequence[Part], *, kinds: Sequence[str], n_layers: int, width: int,
                ranks: Mapping[str, int] | None = None) -> Compose:
    """One candidate per part, each the common form of ``kinds`` with its part filled in,
    stacked on a leading candidate axis (jax leaves [C, L, ...])."""
    forms = [assemble([part], kinds=kinds, n_layers=n_layers, width=width, ranks=ranks)
             for part in parts]
    check_same_form(forms)
    return jax.tree_util.tree_map(lambda *leaves: jnp.asarray(np.stack(leaves)), *forms)


def stack_candidates(candidates: Sequence[Candidate], *, n_layers: int, global_ablation: bool,
                      ablation_basis: np.ndarray, actadd_direction: np.ndarray,
                      actadd_norm: np.ndarray,
                      ablation_sites: Sequence[str] = ABLATION_SITES) -> Compose:
    """Compose(ablation, ActAdd) pytree with a leading candidate axis.

    ablation_basis: [P, L, k, D] (DiM: k = 1 unit direction, a directional ablation; INLP: V
    with zero rows unused, a nullspace projection); actadd_direction: [P, L, D] unit;
    actadd_norm: [P, L] the coefficient scale ||r||; ablation_sites: the sites of each layer the
    ablation acts at.
    """
    k = ablation_basis.shape[-2]
    erasure = "ablation" if k == 1 else "nullspace"

    def part(cand: Candidate) -> Part:
        p, l = cand.position, cand.layer
        if cand.kind == "ablate":
            layers = range(n_layers) if global_ablation else [l]
            basis = ablation_basis[p, l]
            values = {"direction": basis[0]} if k == 1 else {"basis": basis}
            return Part(erasure, layers, tuple(ablation_sites), values)
        return Part("actadd", [l], ("resid_pre",),
                    {"direction": actadd_direction[p, l],
                     "coeff": cand.multiplier * actadd_norm[p, l]})

    return stack_parts([part(cand) for cand in candidates], kinds=(erasure, "actadd"),
                       n_layers=n_layers, width=ablation_basis.shape[-1], ranks={erasure: k})
