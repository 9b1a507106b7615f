"""The select stage: score, rank and choose the DiM and INLP components (docs/method.md
section 4).

Library calls: ``selection.scoring`` (baseline caches, candidate scores), ``selection.ranking``
(filters, ranking, Spearman statistic) and ``selection.components`` (candidate directions and
their description). Writes ``selection.json`` (chosen components, rankings, filter counts) and
``scores.npz``. The config's ``reference`` switches (docs/method.md section 7) choose the
published code's INLP sites, INLP steering scale, KL and component pool instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np
from absl import logging

from refusal_jax.interventions import ABLATION_SITES
from refusal_jax.models.loading import Model
from refusal_jax.runtime.placement import Placement
from refusal_jax.selection.components import describe_component, dim_candidates, inlp_basis
from refusal_jax.selection.ranking import (
    lowest_bypass_fallback,
    n_components,
    rank,
    spearman,
    unfiltered_order,
)
from refusal_jax.selection.scoring import SELECTION_LENGTH_BUCKET, cache_baseline, score_candidates
from refusal_jax.study import artifacts
from refusal_jax.text.chat import refusal_token_ids

if TYPE_CHECKING:
    from refusal_jax.study.runner import Study

# The eps the published code adds inside the logarithms of its KL (``reference.kl_eps``).
REFERENCE_KL_EPS = 1e-6


def run(study: Study) -> list[str]:
    """Runs :func:`run_selection` on the extract stage's prompts and directions."""
    out = study.stage_dir("select")
    summary, arrays = run_selection(study.model, study.prompts(), study.directions(),
                                    study.config, placement=study.placement)
    artifacts.write_arrays(out / "scores.npz", arrays)
    artifacts.write_json(out / "selection.json", summary)
    return ["scores.npz", "selection.json"]


def run_selection(model: Model, prompts, directions: dict[str, np.ndarray], config, *,
                  placement: Placement | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Scores, ranks and picks DiM and INLP components. Returns (summary, arrays). With a
    placement, the candidates of every chunk are evaluated in parallel over its mesh."""
    select_config, runtime = config.select, config.runtime
    refusal_ids = jnp.asarray(refusal_token_ids(model.tokenizer), jnp.int32)
    # Every candidate pays for each padding column, and a val set is usually one batch (one
    # compile per set whatever its length), so its padding is kept to a minimum here.
    cache_args = dict(batch_size=runtime.batch_size, length_bucket=SELECTION_LENGTH_BUCKET)
    harmful = cache_baseline(model, prompts["harmful_val"], refusal_ids, name="harmful_val",
                             **cache_args)
    harmless = cache_baseline(model, prompts["harmless_val"], refusal_ids, name="harmless_val",
                              **cache_args)
    n_layers = model.config.n_layers
    dim = directions["dim"]
    dim_unit, norms, dim_degenerate = dim_candidates(dim)
    n_positions = dim.shape[0]
    if select_config.positions:
        if min(select_config.positions) < -n_positions:
            raise ValueError(f"select.positions {tuple(select_config.positions)} reach beyond "
                             f"the {n_positions} EOI positions of this chat template")
        scored = np.zeros(n_positions, bool)
        scored[[n_positions + p for p in select_config.positions]] = True
        dim_degenerate = dim_degenerate | ~scored[:, None]
    basis, keep = inlp_basis(directions, config.directions)
    first_accuracy = directions["inlp_dev_accuracies"][..., 0]
    reference = config.reference
    common = dict(multipliers=tuple(select_config.multipliers), chunk=runtime.candidate_chunk,
                  kl_eps=REFERENCE_KL_EPS if reference.kl_eps else 0.0, placement=placement)
    methods = {
        "dim": dict(ablation_basis=dim_unit[..., None, :], actadd_direction=dim_unit,
                    actadd_norm=norms, degenerate=dim_degenerate),
        "inlp": dict(ablation_basis=basis, actadd_direction=directions["inlp_first_direction"],
                     actadd_norm=norms, degenerate=dim_degenerate | (keep == 0),
                     ablation_sites=(("resid_pre",) if reference.inlp_block_input_only
                                     else ABLATION_SITES)),
    }
    summary = {"mode": select_config.mode, "n_layers": n_layers,
               "n_positions": int(dim.shape[0]),
               "baseline": {"harmful_val_refusal_score": float(harmful.refusal_scores.mean()),
                            "harmless_val_refusal_score": float(harmless.refusal_scores.mean())}}
    arrays: dict[str, np.ndarray] = {"inlp_k": keep}
    modes = [select_config.mode]
    if select_config.compare_global:
        modes = sorted(set(modes) | {"local", "global"}, key=["local", "global"].index)
    scores_by_method, rankings = {}, {}
    for name, method in methods.items():
        accuracy = first_accuracy if name == "inlp" else None
        rank_args = dict(select_config=select_config, accuracy=accuracy)
        if name == "inlp" and reference.inlp_steering_best_dim_norm:
            best_dim = rankings["dim"][0]
            method = {**method, "actadd_norm": np.full_like(norms, norms[best_dim])}
        by_mode = {}
        for mode in modes:
            # The mode compared with the chosen one needs only its bypass scores (Spearman).
            filters = ("none" if mode != select_config.mode else
                       "until_chosen" if select_config.just_one else "all")
            by_mode[mode] = score_candidates(model, harmful, harmless, refusal_ids,
                                             global_ablation=mode == "global",
                                             name=f"{name} ({mode})", filters=filters,
                                             rank_args=rank_args, **method, **common)
            for field in ("bypass", "steering", "kl"):
                arrays[f"{name}_{mode}_{field}"] = getattr(by_mode[mode], field)
        scores = by_mode[select_config.mode]
        ranking, discarded = rank(scores, **rank_args)
        fallback = None
        if not ranking and select_config.when_none_pass == "error":
            raise ValueError(
                f"no {name} candidate passes the filters (discarded per filter: {discarded}, "
                f"of {scores.bypass.size} pairs); relax select.kl_threshold, "
                "select.min_steering_score or select.prune_layer_fraction, check that the "
                "model refuses, or set select.when_none_pass='lowest_bypass'")
        if not ranking:
            ranking, fallback = lowest_bypass_fallback(scores, discarded,
                                                       select_config=select_config)
            logging.warning("%s: %s", name, fallback)
        scores_by_method[name], rankings[name] = scores, ranking
        summary[name] = {
            "ranking": [[p - n_positions, l] for p, l in ranking],
            "discarded": discarded,
            "filters_scored": int(scores.filtered.sum()),
            "fallback": fallback,
        }
        if len(by_mode) == 2:
            summary[name]["spearman_local_global_bypass"] = spearman(
                by_mode["local"].bypass.ravel(), by_mode["global"].bypass.ravel())
    for name in methods:
        summary[name] = {**_components(name, scores_by_method, rankings[name], keep, first_accuracy,
                                       n_positions, config), **summary[name]}
        best = summary[name]["components"][0]
        logging.info("%s: chose (position %d, layer %d), bypass %s, steering %s, KL %s",
                     name, best["position"], best["layer"], best["bypass"], best["steering"],
                     best["kl"])
    return summary, arrays


def _components(name: str, scores: dict, ranking: list[tuple[int, int]], keep: np.ndarray,
                first_accuracy: np.ndarray, n_positions: int, config) -> dict:
    """The components of method ``name`` as ``selection.json`` records them: the top of its
    filtered ``ranking``; or, under ``reference.unfiltered_components``, the published code's:
    the ablation or nullspace projection of the best filtered pair (``direction_source``) acts
    at the layers of the top ``n_components(pool)`` pairs of the unfiltered ranking, ``pool``
    the smaller of the two methods' unfiltered pools, and ActAdd at the best pair alone
    (``actadd_components``)."""
    inlp = name == "inlp"

    def describe(p: int, l: int) -> dict:
        return describe_component(p, l, n_positions, scores[name], keep if inlp else None,
                                  first_accuracy if inlp else None)

    if not config.reference.unfiltered_components:
        return {"components": [describe(p, l) for p, l in
                               ranking[:n_components(len(ranking), config.select)]]}
    orders = {method: unfiltered_order(method_scores.bypass,
                                       accuracy=first_accuracy if method == "inlp" else None)
              for method, method_scores in scores.items()}
    pool = min(len(order) for order in orders.values())
    best = describe(*ranking[0])
    components = []
    for p, l in orders[name][:n_components(pool, config.select)]:
        entry = {**describe(p, l), "direction_source": [best["position_index"], best["layer"]]}
        if inlp:
            entry["k"] = best["k"]  # the basis used is the best pair's
        components.append(entry)
    return {"components": components, "actadd_components": [best], "best": best,
            "unfiltered_pool": pool}
