"""INLP over (EOI position, layer) pairs: ours, every pair in one compiled call, vs
the per-pair loops of scripts/inlp_baselines.py.

Each baseline is compared with ours under the same rules on the same train/dev split:
- scikit-learn loop (`sklearn_inlp_pair`): our default rules, stratified split;
- torch L-BFGS loop (`torch_reference_inlp_pair`, the published code's loop): the reference
  rules (non-stratified split, stop below 0.55 after keeping the failing classifier), against
  ours with `absolute_stop=True, keep_failing=True`. Its L-BFGS (lr 1, no line search) does
  not converge on real activations, so its first classifiers are worse than ours and it stops early;
- the same torch loop with torch's strong-Wolfe line search, which converges: the comparison
  at equal accuracy.
Ours runs on `pairs` pairs spread over the positions and layers (0: all of them), compiled
ahead of time and not warmed up (one run is long; the compile time is reported on its own). A
baseline runs on the same pairs, or, with `baseline_pairs` > 0, on that many of them, and its
time on all of ours' pairs is then extrapolated (time x pairs / measured pairs) and the row is
marked `extrapolated`. Quality: the first classifier's dev accuracy of both on every pair the
baseline ran on.
"""

from __future__ import annotations

import functools
from typing import Any

import inlp_baselines
import jax
import jax.numpy as jnp
import numpy as np

from bench_lib.activations import Activations, spread
from bench_lib.measure import Stats, compile_timed, time_pair
from bench_lib.report import Row
from refusal_jax.directions import fit_inlp_split, train_dev_split

SECTION = "2 inlp"
# name -> (per-pair baseline, reference rules?)
BASELINES = {
    "scikit-learn loop": (inlp_baselines.sklearn_inlp_pair, False),
    "torch L-BFGS loop": (inlp_baselines.torch_reference_inlp_pair, True),
    "torch L-BFGS loop + line search": (functools.partial(
        inlp_baselines.torch_reference_inlp_pair, line_search_fn="strong_wolfe"), True),
}


def _classifiers_fitted(dev_accuracies) -> int:
    return int(np.isfinite(np.asarray(dev_accuracies)).sum())


def run(acts: Activations, *, max_directions: int, pairs: int, baseline_pairs: int,
        repeats: int, baselines: tuple[str, ...] = tuple(BASELINES)
        ) -> tuple[list[Row], dict[str, Any]]:
    n, P, L, D = acts.features.shape
    features = np.moveaxis(acts.features, 0, 2).reshape(P * L, n, D)
    chosen = spread(P * L, pairs)
    measured = chosen[spread(len(chosen), baseline_pairs)]
    extrapolated = len(measured) < len(chosen)
    where = lambda indices: [[int(i // L) - P, int(i % L)] for i in indices]  # noqa: E731
    rows: list[Row] = []
    info: dict[str, Any] = {"pairs": where(chosen), "baseline_pairs": where(measured),
                            "max_directions": max_directions, "comparisons": {}}
    in_chosen = np.searchsorted(chosen, measured)  # positions of `measured` within `chosen`
    for name in baselines:
        baseline, reference = BASELINES[name]
        rules = "reference rules" if reference else "default rules"
        split = train_dev_split(acts.labels, stratified=not reference, seed=0)
        train_y, dev_y = acts.labels[split.train_index], acts.labels[split.dev_index]
        args = (jnp.asarray(features[chosen][:, split.train_index]), jnp.asarray(train_y),
                jnp.asarray(features[chosen][:, split.dev_index]), jnp.asarray(dev_y))
        fit = jax.jit(functools.partial(fit_inlp_split, max_directions=max_directions,
                                        absolute_stop=reference, keep_failing=reference))
        compiled, compile_s = compile_timed(fit, *args)

        def baseline_loop(indices=measured, baseline=baseline, split=split, train_y=train_y,
                          dev_y=dev_y):
            return [baseline(features[i][split.train_index], train_y,
                             features[i][split.dev_index], dev_y,
                             max_directions=max_directions) for i in indices]

        pair = time_pair(lambda compiled=compiled, args=args: compiled(*args), baseline_loop,
                         warmup=1, repeats=repeats, ours_warmup=0,
                         baseline_warmup=functools.partial(baseline_loop, measured[:1]))
        result, fits = pair.ours.result, pair.baseline.result
        accuracies = np.asarray(result.dev_accuracies)
        fitted = {"ours": _classifiers_fitted(accuracies),
                  "ours_on_baseline_pairs": _classifiers_fitted(accuracies[in_chosen]),
                  "baseline": sum(f.n_classifiers for f in fits)}
        baseline_seconds, speedup = pair.baseline.seconds, pair.speedup
        details = {
            "split": {"train": len(train_y), "dev": len(dev_y), "stratified": not reference},
            "classifiers_fitted": fitted,
            "ours_s_per_classifier": pair.ours.seconds.scaled(1 / fitted["ours"]).to_json(),
            "baseline_s_per_classifier":
                baseline_seconds.scaled(1 / max(fitted["baseline"], 1)).to_json(),
            "directions_per_pair_ours": np.asarray(result.n_directions).tolist(),
            "solver_steps_max_per_pair_ours": np.asarray(result.solver_steps).max(-1).tolist(),
        }
        if extrapolated:
            baseline_seconds = baseline_seconds.scaled(len(chosen) / len(measured))
            speedup = Stats.of([baseline_seconds.median / s for s in pair.ours.seconds.runs])
            details["note"] = (f"baseline extrapolated: measured on {len(measured)} of the "
                               f"{len(chosen)} pairs, time x {len(chosen)}/{len(measured)}")
            details["baseline_measured_s"] = pair.baseline.seconds.to_json()
        which = (f"all {len(chosen)} pairs" if len(chosen) == P * L
                 else f"{len(chosen)} of {P * L} pairs (spread over positions and layers)")
        rows.append(Row(
            section=SECTION, step=f"INLP ({rules}, N={max_directions}), {which}: ours "
            f"vs {name}", ours=pair.ours.seconds, baseline=baseline_seconds,
            baseline_label=name, speedup=speedup, work=fitted["ours"], work_unit="clf",
            compile_s=compile_s,
            memory={"ours": pair.ours.memory, "baseline": pair.baseline.memory},
            extrapolated=extrapolated, details=details))
        info["comparisons"][name] = {
            "rules": rules,
            "first_accuracy_ours": [round(float(a), 4) for a in accuracies[in_chosen, 0]],
            "first_accuracy_baseline": [round(f.first_accuracy, 4) for f in fits],
        }
    info["accuracy_table"] = accuracy_table(info)
    return rows, info


def accuracy_table(info: dict[str, Any]) -> str:
    """First-classifier dev accuracy per measured pair: ours / baseline, under the same rules."""
    names = list(info["comparisons"])
    header = "| (position, layer) | " + " | ".join(
        f"ours / {name} ({info['comparisons'][name]['rules']})" for name in names) + " |"
    lines = [header, "|" + "|".join([" --- "] * (len(names) + 1)) + "|"]
    for index, (position, layer) in enumerate(info["baseline_pairs"]):
        cells = [f"{info['comparisons'][name]['first_accuracy_ours'][index]:.3f} / "
                 f"{info['comparisons'][name]['first_accuracy_baseline'][index]:.3f}"
                 for name in names]
        lines.append(f"| ({position}, {layer}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)
