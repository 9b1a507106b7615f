"""Selection of the (EOI position, layer) whose direction steers refusal (METHOD.md section 5).

Every candidate (p, l) is scored on the validation sets:

- bypass: mean refusal score of harmful val prompts under the candidate's ablation (DiM:
  directional ablation of r_hat[p, l]; INLP: nullspace projection of V[p, l]);
- steering: mean refusal score of harmless val prompts under ActAdd at ``resid_pre`` of layer l
  with coefficient ``m * ||r[p, l]||`` (DiM: along r_hat; INLP: along its first direction, so
  both are compared at the DiM magnitude), the max over the multipliers ``m``;
- KL: mean KL(baseline || intervened) of the last-position next-token distribution of harmless
  val prompts under the candidate's ablation / nullspace projection.

"local" ablations act at the source layer l only (``resid_pre``, ``attn_out``, ``mlp_out``);
"global" ones at every layer (Arditi et al.). Filters: l >= (1 - prune_layer_fraction) L,
KL > kl_threshold, steering < min_steering_score (0 in the reference), any score NaN (also given
to degenerate candidates: a zero DiM direction, an INLP pair with no accepted direction; and
to positions left out by ``select.positions``, which are not scored). DiM
survivors are ranked by bypass (lower first), INLP ones by first-classifier dev accuracy, then
bypass. ``just_one`` keeps the best; otherwise the top ``top_percentage`` of the ranking.

How the candidates are evaluated. The baseline residual stream of every val prompt at every
layer is cached once ([B, T, L, D] per prompt batch). An intervention that acts only at layers
>= s leaves layers below s untouched, so its forward starts from the cached ``resid_pre[s]``
(:func:`forward_from_layer`, a ``fori_loop`` from s with the layer weights indexed
dynamically): no recomputation below s, and s is a traced scalar, so one compiled program
serves every start layer. Candidates are sorted by start layer and stacked in chunks of
``candidate_chunk`` on a leading axis (``Compose(ablation, ActAdd)`` pytrees, the unused half
masked to zero); a chunk resumes at its earliest start layer and is evaluated by ``jax.vmap``,
returning only per-candidate means.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from refusal_jax.chat import refusal_token_ids
from refusal_jax.directions import select_k
from refusal_jax.directions.inlp import INLPResult
from refusal_jax.evaluation.refusal import refusal_score
from refusal_jax.interventions import (
    ABLATION_SITES,
    SITE_INDEX,
    ActivationAddition,
    Compose,
    DirectionalAblation,
    NullspaceProjection,
    SiteContext,
)
from refusal_jax.models.core import decoder_block, forward, unembed
from refusal_jax.models.loading import Model
from refusal_jax.pipeline.extract import prompt_batches
from refusal_jax.pipeline.progress import progress

_NO_POSITION_LIMIT = np.iinfo(np.int32).max
# A DiM direction shorter than this (relative to the largest one) is treated as zero.
_DEGENERATE_NORM = 1e-6
_SELECTION_LENGTH_BUCKET = 8


# ----------------------------------------------------------------------------------------------
# Forward from a cached layer.


def _layer_slice(tree, index):
    return jax.tree_util.tree_map(
        lambda leaf: jax.lax.dynamic_index_in_dim(leaf, index, axis=0, keepdims=False), tree)


def forward_from_layer(params, resid: jax.Array, valid: jax.Array, start_layer: jax.Array, *,
                       config, intervention=None) -> jax.Array:
    """Last-position logits [B, V] of the forward that resumes at block ``start_layer``.

    ``resid`` [B, T, D] is the (unintervened) ``resid_pre`` of block ``start_layer``; the
    intervention's sites at layers >= ``start_layer`` apply as in the full forward, those below
    are ignored (so only pass interventions that act at layers >= ``start_layer``).
    ``start_layer`` may be traced.
    """
    valid = valid.astype(bool)
    positions = jnp.where(valid, jnp.cumsum(valid, axis=1) - 1, -1).astype(jnp.int32)
    ctx = SiteContext(positions=positions, valid=valid)
    windows = jnp.asarray(config.layer_windows())
    zero = jnp.zeros((), jnp.int32)

    def block(index, x):
        iv = None if intervention is None else _layer_slice(intervention, index)
        x, _, _, _ = decoder_block(x, _layer_slice(params.layers, index), windows[index], iv, ctx,
                                   None, None, positions, zero, config)
        return x

    x = jax.lax.fori_loop(start_layer, config.n_layers, block, resid)
    return unembed(params, x[:, -1], config)


@functools.partial(jax.jit, static_argnames=("config",))
def _baseline(params, tokens, valid, refusal_ids, *, config):
    """Residual stream at every layer and position, last-position log-probs, refusal scores."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    out = forward(params, tokens, valid, config=config, capture_positions=positions,
                  logits="last")
    return (out.captures, jax.nn.log_softmax(out.logits, axis=-1),
            refusal_score(out.logits, refusal_ids))


@functools.partial(jax.jit, static_argnames=("config",))
def _score_chunk(params, cache, valid, row_weights, start_layer, interventions, refusal_ids,
                 baseline_logprobs, *, config):
    """Per-candidate sums over the batch's real rows of (refusal score, KL)."""
    resid = jax.lax.dynamic_index_in_dim(cache, start_layer, axis=2, keepdims=False)

    def one(intervention):
        logits = forward_from_layer(params, resid, valid, start_layer, config=config,
                                    intervention=intervention)
        scores = refusal_score(logits, refusal_ids)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        kl = jnp.sum(jnp.exp(baseline_logprobs) * (baseline_logprobs - logprobs), axis=-1)
        return jnp.sum(row_weights * scores), jnp.sum(row_weights * kl)

    return jax.vmap(one)(interventions)


# ----------------------------------------------------------------------------------------------
# Cached baselines of a prompt set.


@dataclasses.dataclass
class CachedSet:
    """Baseline of a val set: per prompt batch, (cache [B,T,L,D], valid, row weights, log-probs)."""

    batches: list[tuple[jax.Array, jax.Array, jax.Array, jax.Array]]
    refusal_scores: np.ndarray  # [n] baseline refusal score of each prompt
    n: int


def cache_baseline(model: Model, instructions: Sequence[str], refusal_ids: jax.Array, *,
                   batch_size: int, length_bucket: int, name: str) -> CachedSet:
    batches, scores = [], np.zeros(len(instructions), np.float32)
    total = -(-len(instructions) // batch_size)
    for rows, batch in progress(prompt_batches(model, instructions, batch_size, length_bucket),
                                total, f"baseline cache of {name}"):
        cache, logprobs, batch_scores = _baseline(
            model.params, jnp.asarray(batch.tokens), jnp.asarray(batch.valid), refusal_ids,
            config=model.config)
        weights = np.zeros(batch_size, np.float32)
        weights[:len(rows)] = 1.0
        batches.append((cache, jnp.asarray(batch.valid), jnp.asarray(weights), logprobs))
        scores[rows] = np.asarray(batch_scores)[:len(rows)]
    return CachedSet(batches=batches, refusal_scores=scores, n=len(instructions))


# ----------------------------------------------------------------------------------------------
# Candidate interventions.


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


def _score(model: Model, cached: CachedSet, candidates: list[Candidate], refusal_ids, *,
           chunk: int, what: str, **stack_args) -> tuple[np.ndarray, np.ndarray]:
    """Mean refusal score and mean KL of each candidate on a cached set."""
    scores = np.zeros(len(candidates), np.float64)
    kls = np.zeros(len(candidates), np.float64)
    # Chunks of consecutive candidates in start-layer order, each resuming at its earliest
    # start layer: starting a candidate earlier than its own layer only recomputes unedited
    # layers from their cached inputs, so it is exact and costs a few layers, where padding
    # one layer's few candidates to a full chunk would cost whole forwards.
    order = sorted(range(len(candidates)), key=lambda index: candidates[index].start)
    work = [(candidates[order[i]].start, order[i:i + chunk])
            for i in range(0, len(order), chunk)]
    for start, indices in progress(work, len(work), f"{what}: {len(candidates)} candidates in "
                                   f"{len(work)} chunks of {chunk}"):
        # Pad the chunk to a fixed size (repeating its last candidate) so shapes never change.
        padded = [candidates[i] for i in indices] + [candidates[indices[-1]]] * (
            chunk - len(indices))
        stacked = _stack_candidates(padded, n_layers=model.config.n_layers, **stack_args)
        for cache, valid, weights, logprobs in cached.batches:
            score_sum, kl_sum = _score_chunk(model.params, cache, valid, weights,
                                             jnp.asarray(start, jnp.int32), stacked, refusal_ids,
                                             logprobs, config=model.config)
            scores[indices] += np.asarray(score_sum, np.float64)[:len(indices)]
            kls[indices] += np.asarray(kl_sum, np.float64)[:len(indices)]
    return scores / cached.n, kls / cached.n


# ----------------------------------------------------------------------------------------------
# Scores of every (p, l) for one method.


@dataclasses.dataclass
class CandidateScores:
    """Scores of every (p, l): bypass [P, L], steering [P, L, M], kl [P, L]; NaN = degenerate."""

    bypass: np.ndarray
    steering: np.ndarray
    kl: np.ndarray


def score_candidates(model: Model, harmful: CachedSet, harmless: CachedSet, refusal_ids, *,
                     ablation_basis: np.ndarray, actadd_direction: np.ndarray,
                     actadd_norm: np.ndarray, degenerate: np.ndarray,
                     multipliers: Sequence[float], global_ablation: bool, chunk: int,
                     name: str) -> CandidateScores:
    """Bypass, steering and KL of every (p, l) (see the module docstring)."""
    n_positions, n_layers = degenerate.shape
    pairs = [(p, l) for p in range(n_positions) for l in range(n_layers) if not degenerate[p, l]]
    ablations = [Candidate(p, l, "ablate", 0 if global_ablation else l) for p, l in pairs]
    actadds = [Candidate(p, l, "actadd", l, m) for p, l in pairs for m in multipliers]
    stack_args = dict(global_ablation=global_ablation, ablation_basis=ablation_basis,
                      actadd_direction=actadd_direction, actadd_norm=actadd_norm)
    bypass_values, _ = _score(model, harmful, ablations, refusal_ids, chunk=chunk,
                              what=f"{name} bypass", **stack_args)
    harmless_values, kl_values = _score(model, harmless, ablations + actadds, refusal_ids,
                                        chunk=chunk, what=f"{name} KL and steering",
                                        **stack_args)
    shape = (n_positions, n_layers)
    bypass, kl = np.full(shape, np.nan), np.full(shape, np.nan)
    steering = np.full(shape + (len(multipliers),), np.nan)
    for index, (p, l) in enumerate(pairs):
        bypass[p, l] = bypass_values[index]
        kl[p, l] = kl_values[index]
    steer_values = harmless_values[len(ablations):].reshape(len(pairs), len(multipliers))
    for index, (p, l) in enumerate(pairs):
        steering[p, l] = steer_values[index]
    return CandidateScores(bypass=bypass, steering=steering, kl=kl)


# ----------------------------------------------------------------------------------------------
# Filters and ranking.


def rank(scores: CandidateScores, *, select_config, n_layers: int,
         accuracy: np.ndarray | None = None) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """Surviving (p, l) pairs, best first, and how many pairs each filter discarded.

    ``accuracy`` [P, L] (INLP's first-classifier dev accuracy) ranks first when given.
    """
    steering = np.max(scores.steering, axis=-1)
    layer_limit = (1.0 - select_config.prune_layer_fraction) * n_layers
    layers = np.broadcast_to(np.arange(n_layers), scores.bypass.shape)
    with np.errstate(invalid="ignore"):
        filters = {
            "nan": np.isnan(scores.bypass) | np.isnan(steering) | np.isnan(scores.kl),
            "late_layer": layers >= layer_limit,
            "kl": scores.kl > select_config.kl_threshold,
            "steering": steering < select_config.min_steering_score,
        }
    discarded = np.zeros(scores.bypass.shape, bool)
    for mask in filters.values():
        discarded |= mask
    survivors = [tuple(int(i) for i in pair) for pair in np.argwhere(~discarded)]
    if accuracy is None:
        survivors.sort(key=lambda pair: scores.bypass[pair])
    else:
        survivors.sort(key=lambda pair: (-accuracy[pair], scores.bypass[pair]))
    return survivors, {name: int(mask.sum()) for name, mask in filters.items()}


def n_components(n_survivors: int, select_config) -> int:
    if select_config.just_one:
        return 1
    return max(1, math.ceil(select_config.top_percentage * n_survivors))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """0-based ranks, ties given the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts + 1) / 2.0)[inverse]


def spearman(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman rank correlation over the pairs where both are finite (NaN if < 3 pairs)."""
    keep = np.isfinite(first) & np.isfinite(second)
    if keep.sum() < 3:
        return float("nan")
    a, b = _average_ranks(first[keep]), _average_ranks(second[keep])
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


# ----------------------------------------------------------------------------------------------
# The stage.


def inlp_basis(directions: dict[str, np.ndarray], directions_config
               ) -> tuple[np.ndarray, np.ndarray]:
    """INLP bases after the k policy, trimmed to the largest k kept ([P, L, k_max, D]), and the
    k kept per pair ([P, L])."""
    result = INLPResult(
        basis=directions["inlp_basis"], n_directions=directions["inlp_n_directions"],
        dev_accuracies=directions["inlp_dev_accuracies"],
        majority_rate=directions["inlp_majority_rate"],
        first_direction=directions["inlp_first_direction"],
        converged=directions["inlp_converged"], solver_steps=directions["inlp_solver_steps"])
    policy = directions_config.k_policy
    keep = np.asarray(select_k(result, policy, directions_config.k if policy == "fixed" else None))
    k_max = max(1, int(keep.max()))
    slots = np.arange(k_max)
    basis = directions["inlp_basis"][..., :k_max, :]
    return np.where((slots < keep[..., None])[..., None], basis, 0.0).astype(np.float32), keep


def run_selection(model: Model, prompts, directions: dict[str, np.ndarray], config
                  ) -> tuple[dict, dict[str, np.ndarray]]:
    """Scores, ranks and picks DiM and INLP components. Returns (summary, arrays)."""
    select_config, runtime = config.select, config.runtime
    refusal_ids = jnp.asarray(refusal_token_ids(model.tokenizer), jnp.int32)
    # Every candidate pays for each padding column, and a val set is usually one batch (one
    # compile per set whatever its length), so its padding is kept to a minimum here.
    cache_args = dict(batch_size=runtime.batch_size, length_bucket=_SELECTION_LENGTH_BUCKET)
    harmful = cache_baseline(model, prompts["harmful_val"], refusal_ids, name="harmful_val",
                             **cache_args)
    harmless = cache_baseline(model, prompts["harmless_val"], refusal_ids, name="harmless_val",
                              **cache_args)
    n_layers = model.config.n_layers
    dim = directions["dim"]
    norms = np.linalg.norm(dim, axis=-1)
    dim_degenerate = norms <= _DEGENERATE_NORM * max(float(norms.max()), 1e-30)
    dim_unit = dim / np.where(dim_degenerate, 1.0, norms)[..., None]
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
    common = dict(multipliers=tuple(select_config.multipliers), chunk=runtime.candidate_chunk)
    methods = {
        "dim": dict(ablation_basis=dim_unit[..., None, :], actadd_direction=dim_unit,
                    actadd_norm=norms, degenerate=dim_degenerate),
        "inlp": dict(ablation_basis=basis, actadd_direction=directions["inlp_first_direction"],
                     actadd_norm=norms, degenerate=dim_degenerate | (keep == 0)),
    }
    summary = {"mode": select_config.mode, "n_layers": n_layers,
               "n_positions": int(dim.shape[0]),
               "baseline": {"harmful_val_refusal_score": float(harmful.refusal_scores.mean()),
                            "harmless_val_refusal_score": float(harmless.refusal_scores.mean())}}
    arrays: dict[str, np.ndarray] = {"inlp_k": keep}
    modes = [select_config.mode]
    if select_config.compare_global:
        modes = sorted(set(modes) | {"local", "global"}, key=["local", "global"].index)
    for name, method in methods.items():
        by_mode = {}
        for mode in modes:
            by_mode[mode] = score_candidates(model, harmful, harmless, refusal_ids,
                                             global_ablation=mode == "global",
                                             name=f"{name} ({mode})", **method, **common)
            for field in ("bypass", "steering", "kl"):
                arrays[f"{name}_{mode}_{field}"] = getattr(by_mode[mode], field)
        scores = by_mode[select_config.mode]
        accuracy = first_accuracy if name == "inlp" else None
        ranking, discarded = rank(scores, select_config=select_config, n_layers=n_layers,
                                  accuracy=accuracy)
        if not ranking:
            raise ValueError(
                f"no {name} candidate passes the filters (discarded per filter: {discarded}, "
                f"of {scores.bypass.size} pairs); relax select.kl_threshold, "
                "select.min_steering_score or select.prune_layer_fraction, or check that the "
                "model refuses")
        chosen = ranking[:n_components(len(ranking), select_config)]
        summary[name] = {
            "components": [_describe(p, l, n_positions, scores, keep if name == "inlp" else None,
                                     accuracy) for p, l in chosen],
            "ranking": [[p - n_positions, l] for p, l in ranking],
            "discarded": discarded,
        }
        if len(by_mode) == 2:
            summary[name]["spearman_local_global_bypass"] = spearman(
                by_mode["local"].bypass.ravel(), by_mode["global"].bypass.ravel())
        best = summary[name]["components"][0]
        logging.info("%s: chose (position %d, layer %d), bypass %.3f, steering %.3f, KL %.4f",
                     name, best["position"], best["layer"], best["bypass"], best["steering"],
                     best["kl"])
    return summary, arrays


def _describe(p: int, l: int, n_positions: int, scores: CandidateScores,
              keep: np.ndarray | None, accuracy: np.ndarray | None) -> dict:
    entry = {"position": p - n_positions, "position_index": p, "layer": l,
             "bypass": float(scores.bypass[p, l]),
             "steering": float(np.max(scores.steering[p, l])),
             "kl": float(scores.kl[p, l])}
    if keep is not None:
        entry["k"] = int(keep[p, l])
        entry["first_dev_accuracy"] = float(accuracy[p, l])
    return entry
