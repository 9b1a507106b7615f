"""Interventions on a loaded model, and baking them into its weights.

The builders take the model (for its number of layers) and the same arguments as their
``refusal_jax.interventions`` namesakes. One normalisation rule: what removes a direction
normalises it (``directional_ablation`` takes ``r`` or ``r_hat``), a basis must be orthonormal
(an INLP ``basis`` is), and ``activation_addition`` adds ``coeff * direction`` exactly as given
(with a DiM ``r``, ``coeff = 1`` adds the gap between the class means). ``layers=None`` (the
default) acts at every layer; ``layers=21`` or ``layers=[20, 21]`` at those. Values are arrays,
so building many interventions of one kind never recompiles what runs them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jax.typing import ArrayLike

from refusal_jax import interventions as iv
from refusal_jax.directions import LeaceEraser
from refusal_jax.interventions.export import export_hf_checkpoint
from refusal_jax.interventions.masks import LayerSelection
from refusal_jax.models.loading import Model


def directional_ablation(model: Model, direction: ArrayLike, *, layers: LayerSelection = None,
                         sites: Sequence[str] = iv.ABLATION_SITES) -> iv.DirectionalAblation:
    """``x - (x . r_hat) r_hat`` with ``r_hat = direction / |direction|`` ([D] or [L, D]);
    every layer with the default sites is Arditi et al.'s ablation (foldable)."""
    return iv.directional_ablation(direction, n_layers=model.config.n_layers, layers=layers,
                                   sites=sites)


def nullspace_projection(model: Model, basis: ArrayLike, *, layers: LayerSelection = None,
                         sites: Sequence[str] = iv.ABLATION_SITES) -> iv.NullspaceProjection:
    """``x - (x V^T) V`` for an orthonormal ``basis`` V [k, D] (zero rows unused), e.g. an
    INLP ``basis``."""
    return iv.nullspace_projection(basis, n_layers=model.config.n_layers, layers=layers,
                                   sites=sites)


def counterfactual_reflection(model: Model, basis: ArrayLike, alpha: ArrayLike = 2.0, *,
                              layers: LayerSelection = None,
                              sites: Sequence[str] = iv.ABLATION_SITES
                              ) -> iv.CounterfactualReflection:
    """``x - alpha (x V^T) V`` (INLP's counterfactual map; ``alpha = 1`` projects)."""
    return iv.counterfactual_reflection(basis, alpha, n_layers=model.config.n_layers,
                                        layers=layers, sites=sites)


def activation_addition(model: Model, direction: ArrayLike, coeff: ArrayLike = 1.0, *,
                        layers: LayerSelection = None, sites: Sequence[str] = ("resid_pre",),
                        position_start: ArrayLike = 0,
                        position_stop: ArrayLike | None = None) -> iv.ActivationAddition:
    """``x + coeff * direction``, the direction as given (not normalised), at token positions
    in ``[position_start, position_stop)`` (default: all)."""
    return iv.activation_addition(direction, coeff, n_layers=model.config.n_layers,
                                  layers=layers, sites=sites, position_start=position_start,
                                  position_stop=position_stop)


def leace_eraser(model: Model, eraser: LeaceEraser, *, layers: LayerSelection = None,
                 sites: Sequence[str] = iv.ABLATION_SITES) -> iv.ObliqueEraser:
    """The LEACE eraser of one pair (``mean`` [D]: fitted on one pair's activations, e.g.
    ``fit_leace(harmful[:, -1, 21], harmless[:, -1, 21])``)."""
    if eraser.mean.ndim != 1:
        raise ValueError(f"leace_eraser takes one pair's eraser (mean of shape (D,)); got mean "
                         f"of shape {eraser.mean.shape}: index the pair first")
    return iv.oblique_eraser(eraser.A, eraser.B, eraser.mean, n_layers=model.config.n_layers,
                             layers=layers, sites=sites)


def fold(model: Model, intervention: Any) -> Model:
    """The model with ``intervention`` baked into its weights (no hook needed; see
    ``refusal_jax.interventions.folding`` for which interventions fold exactly)."""
    params, config = iv.fold(model.params, intervention, config=model.config)
    return dataclasses.replace(model, params=params, config=config)


def export(model: Model, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Writes the model (e.g. a ``fold`` result) as a Hugging Face safetensors checkpoint."""
    return export_hf_checkpoint(directory, model.params, model.config, hf_config=model.hf_config,
                                tokenizer=model.tokenizer, overwrite=overwrite)
