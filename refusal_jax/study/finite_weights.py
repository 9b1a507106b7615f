"""Which weight of a loaded model holds NaN or inf: checked once when a study loads its model,
so damaged weights are named instead of surfacing later as NaN scores. Works on weights laid
out on a mesh (each process gets the small per-layer answers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.runtime import distributed


def first_non_finite_weight(params) -> str | None:
    """The path of the first parameter (``layers.q_proj[3]`` for layer 3 of a stacked one) that
    holds NaN or inf, or None."""
    rows = distributed.gather(_finite_rows(params))  # small: one bool per layer or array
    for path, finite in jax.tree_util.tree_flatten_with_path(rows)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        finite = np.asarray(finite)
        if not finite.all():
            return f"{name}[{int(np.argmin(finite))}]" if name.startswith("layers.") else name
    return None


@jax.jit
def _finite_rows(params):
    """Per parameter: whether each layer (stacked ones) or the whole array is finite."""
    def rows(path, leaf):
        stacked = jax.tree_util.keystr(path, simple=True, separator=".").startswith("layers.")
        finite = jnp.isfinite(leaf)
        return finite.reshape(leaf.shape[0], -1).all(axis=1) if stacked else finite.all()
    return jax.tree_util.tree_map_with_path(rows, params)
