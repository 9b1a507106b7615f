"""Site masks: which (layer, site) pairs an intervention acts at.

A site mask is a float [L, 4] array whose columns follow ``SITES``; the edit at a site is
multiplied by its value, so 1 applies it and 0 leaves ``x`` exactly unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.models.sites import SITE_INDEX, SITES

# The sites of directional ablation (Arditi et al.) and of the INLP interventions.
ABLATION_SITES: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out")

LayerSelection = int | Sequence[int] | None


def site_columns(sites: Sequence[str]) -> list[int]:
    """The mask columns of ``sites``, a non-empty sequence of site names."""
    if isinstance(sites, str):
        raise ValueError(f"sites must be a sequence of site names, got the string {sites!r}")
    unknown = [site for site in sites if site not in SITE_INDEX]
    if unknown or not sites:
        raise ValueError(f"sites must be a non-empty subset of {SITES}, got {tuple(sites)}")
    return [SITE_INDEX[site] for site in sites]


def layer_list(n_layers: int, layers: LayerSelection) -> list[int]:
    """``layers`` (one index, a sequence of indices, or None for all) as a checked list."""
    if not isinstance(n_layers, (int, np.integer)) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    if layers is None:
        selected = list(range(n_layers))
    elif isinstance(layers, (int, np.integer)):
        selected = [int(layers)]
    else:
        selected = [int(layer) for layer in layers]
    if not selected:
        raise ValueError("layers is empty; pass None for all layers")
    outside = [layer for layer in selected if not 0 <= layer < n_layers]
    if outside:
        raise ValueError(f"layers {outside} outside [0, {n_layers}) for n_layers={n_layers}")
    return selected


def make_site_mask(n_layers: int, layers: LayerSelection, sites: Sequence[str]) -> jax.Array:
    """Float32 [n_layers, 4] mask: 1 at (layer, site) for the selected layers and sites.

    ``layers``: one index, a sequence of indices, or None for all layers.
    """
    selected, columns = layer_list(n_layers, layers), site_columns(sites)
    mask = np.zeros((n_layers, len(SITES)), np.float32)
    mask[np.ix_(selected, columns)] = 1.0
    return jnp.asarray(mask)


def site_weight(site_mask: jax.Array, site: str, kind: str) -> jax.Array:
    """The mask value of ``site`` in a mask sliced to one layer ([4]), as ``apply`` reads it."""
    if site not in SITE_INDEX:
        raise ValueError(f"unknown site {site!r}; expected one of {SITES}")
    if site_mask.ndim != 1:
        raise ValueError(
            f"{kind}.apply expects leaves sliced to one layer (site_mask of shape [4]), got "
            f"site_mask of shape {site_mask.shape}; use at_layer(intervention, layer) outside "
            "the forward's scan"
        )
    return site_mask[SITE_INDEX[site]]
