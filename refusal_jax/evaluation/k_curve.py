"""The tunable-k curve (the third finding of Rocchetti & Ferrara): refusal rate and
cross-entropy as an INLP intervention keeps only its first k directions.

The pipeline evaluates the intervention once per k in `k_values(n)` with the basis from
`keep_first_k(basis, k)`, which zeroes rows k.. instead of slicing them: the basis keeps its
shape, zero rows are unused directions (see `refusal_jax.interventions`), and the compiled
programs are reused for every k. The measured points go into a `refusal_jax.results.schema.KCurve`,
which `plot_k_curve` draws and the report tabulates (`KCurve.recommended_k` picks the k with the
fewest refusals whose cross-entropy stays near the baseline). Plots use matplotlib's
object-oriented API (a `Figure` rendered by the Agg canvas, no pyplot state).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
from matplotlib.figure import Figure

from refusal_jax.results.schema import KCurve, validate_k_curve


def k_values(n_directions: int) -> list[int]:
    """1, 2, 4, ... (powers of two below `n_directions`), then `n_directions` itself."""
    if isinstance(n_directions, bool) or not isinstance(n_directions, int) or n_directions < 1:
        raise ValueError(f"n_directions must be a positive integer, got {n_directions!r}; an "
                         "INLP basis without directions has no k-curve")
    values = []
    k = 1
    while k < n_directions:
        values.append(k)
        k *= 2
    return values + [n_directions]


def keep_first_k(basis: jax.Array, k: int | jax.Array) -> jax.Array:
    """`basis` [..., K, D] with rows k.. set to zero (k may be a traced scalar)."""
    basis = jnp.asarray(basis)
    if basis.ndim < 2:
        raise ValueError(f"basis must be [..., K, D], got shape {basis.shape}")
    if not isinstance(k, jax.core.Tracer) and not 0 <= int(k) <= basis.shape[-2]:
        raise ValueError(f"k = {k} outside [0, {basis.shape[-2]}] for a basis of "
                         f"{basis.shape[-2]} rows")
    keep = jnp.arange(basis.shape[-2]) < k
    return jnp.where(keep[:, None], basis, jnp.zeros((), basis.dtype))


def plot_k_curve(path: str | os.PathLike, curve: KCurve) -> Path:
    """PNG: refusal rates (left axis) and cross-entropy (right axis) against k (log2 scale),
    with the baseline values as dashed lines."""
    curve = validate_k_curve(curve)
    path = Path(path)
    ks = [point.k for point in curve.points]
    figure = Figure(figsize=(6.4, 4.4))
    rate_axis = figure.subplots()
    rate_axis.plot(ks, [p.harmful_refusal_rate for p in curve.points], "o-", color="tab:red",
                   label="harmful refusal rate")
    if all(p.harmless_refusal_rate is not None for p in curve.points):
        rate_axis.plot(ks, [p.harmless_refusal_rate for p in curve.points], "s-",
                       color="tab:orange", label="harmless refusal rate")
    rate_axis.axhline(curve.baseline_harmful_refusal_rate, color="tab:red", linestyle="--",
                      linewidth=0.8, label="baseline harmful refusal rate")
    rate_axis.set_ylim(-0.03, 1.03)
    rate_axis.set_ylabel("refusal rate")
    rate_axis.set_xlabel("k (first INLP directions kept)")
    rate_axis.set_xscale("log", base=2)
    rate_axis.set_xticks(ks, [str(k) for k in ks])
    ce_axis = rate_axis.twinx()
    ce_axis.plot(ks, [p.cross_entropy for p in curve.points], "^-", color="tab:blue",
                 label="cross-entropy")
    ce_axis.axhline(curve.baseline_cross_entropy, color="tab:blue", linestyle="--",
                    linewidth=0.8, label="baseline cross-entropy")
    ce_axis.set_ylabel("cross-entropy (nats)")
    handles = [h for axis in (rate_axis, ce_axis) for h in axis.get_legend_handles_labels()[0]]
    labels = [lab for axis in (rate_axis, ce_axis) for lab in axis.get_legend_handles_labels()[1]]
    figure.legend(handles, labels, fontsize=7, loc="lower center", ncol=3, frameon=False)
    rate_axis.set_title(f"{curve.intervention}: keeping the first k INLP directions", fontsize=10)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
