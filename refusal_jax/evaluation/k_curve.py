"""The tunable-k curve (the third finding of Rocchetti & Ferrara): refusal rate and
cross-entropy as an INLP intervention keeps only its first k directions.

The pipeline evaluates the intervention once per k in `k_values(n)` with the basis from
`keep_first_k(basis, k)`, which zeroes rows k.. instead of slicing them: the basis keeps its
shape, zero rows are unused directions (see `refusal_jax.interventions`), and the compiled
programs are reused for every k. The measured points go into a `KCurve`, which `plot_k_curve`
draws and the report tabulates (`KCurve.recommended_k` picks the k with the fewest refusals
whose cross-entropy stays near the baseline). Plots use matplotlib's object-oriented API (a
`Figure` rendered by the Agg canvas, no pyplot state).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from matplotlib.figure import Figure

# A cross-entropy "near baseline" on the k-curve, in nats (about 5% perplexity).
NEAR_BASELINE_NATS = 0.05


@dataclasses.dataclass
class KCurvePoint:
    k: int
    harmful_refusal_rate: float
    cross_entropy: float
    harmless_refusal_rate: float | None = None
    kl: float | None = None


@dataclasses.dataclass
class KCurve:
    """An INLP intervention measured keeping only its first k directions, k increasing."""

    intervention: str
    points: list[KCurvePoint]
    baseline_harmful_refusal_rate: float
    baseline_cross_entropy: float
    plot: str | None = None  # PNG path relative to the work directory

    def recommended_k(self, max_increase: float = NEAR_BASELINE_NATS) -> KCurvePoint | None:
        """The point with the lowest harmful refusal rate (then the smallest k) among those whose
        cross-entropy exceeds the baseline's by at most `max_increase` nats; None if none does."""
        near = [p for p in self.points
                if p.cross_entropy - self.baseline_cross_entropy <= max_increase]
        return min(near, key=lambda p: (p.harmful_refusal_rate, p.k), default=None)


def check_k_curve(curve: KCurve, where: str = "k_curve") -> None:
    """Raises ValueError, naming the field under `where`, unless the ks are distinct, increasing
    and >= 1, every rate lies in [0, 1] and every cross-entropy is finite."""
    ks = [point.k for point in curve.points]
    if not ks or ks != sorted(set(ks)) or ks[0] < 1:
        raise ValueError(f"{where}.points must have distinct increasing k >= 1, got {ks}")
    check_rate(curve.baseline_harmful_refusal_rate, f"{where}.baseline_harmful_refusal_rate")
    _check_finite(curve.baseline_cross_entropy, f"{where}.baseline_cross_entropy")
    for j, point in enumerate(curve.points):
        check_rate(point.harmful_refusal_rate, f"{where}.points[{j}].harmful_refusal_rate")
        check_rate(point.harmless_refusal_rate, f"{where}.points[{j}].harmless_refusal_rate")
        _check_finite(point.cross_entropy, f"{where}.points[{j}].cross_entropy")


def check_rate(value: float | None, where: str) -> None:
    """Raises ValueError naming ``where`` unless ``value`` is None or a rate in [0, 1]."""
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"{where} = {value} is not a rate in [0, 1]")


def _check_finite(value: float, where: str) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{where} is {value}; it must be finite")


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
    check_k_curve(curve)
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
