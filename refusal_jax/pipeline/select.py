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

The filters need KL and steering, which cost 1 + M forward passes of the harmless set per pair
against one of the harmful set for bypass. With ``just_one`` only the best survivor matters, so
they are scored in rank order, a chunk of pairs at a time, until a pair survives: the choice is
the one scoring every pair would give (every pair ranked before it was scored and failed), and
the pairs after it keep NaN KL and steering in ``scores.npz``. The summary's ``ranking`` then
lists the survivors among the scored pairs (the chosen one first), ``discarded`` counts the
unscored pairs under "not_scored", and ``filters_scored`` says how many pairs were scored.
``just_one=False`` scores every pair (the reference's complete score maps; with
``top_percentage=0`` it still keeps one component).

How the candidates are evaluated. Each val prompt is the shared start of the chat template
(the system turn: about half of a short prompt's tokens) followed by its own tokens. The
baseline residual stream of every layer is cached once: [P, L, D] for the P shared tokens,
[B, S, L, D] for the rest of each prompt. An intervention that acts only at layers >= s leaves
layers below s untouched, so its forward starts from the cached ``resid_pre[s]``
(:func:`forward_from_layer`, a ``fori_loop`` from s with the layer weights indexed
dynamically): no recomputation below s, and s is a traced scalar, so one compiled program
serves every start layer. The shared tokens are computed once per candidate, not once per
prompt, and their keys and values are shared by every prompt's attention. A set of at most
``runtime.batch_size`` prompts is one batch of exactly that many rows (no filler rows), padded
to a multiple of 8 tokens. Candidates are sorted by start layer and stacked in chunks of
``candidate_chunk`` on a leading axis (``Compose(ablation, ActAdd)`` pytrees, the unused half
masked to zero); a chunk resumes at its earliest start layer and is evaluated by ``jax.vmap``,
returning only per-candidate means. The number of compiled programs is fixed: per method and
val set one (the batch shapes and the candidate chunk never change).
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

from refusal_jax import distributed
from refusal_jax.chat import left_pad, pad_token_id, refusal_token_ids
from refusal_jax.directions import select_k
from refusal_jax.directions.inlp import INLPResult
from refusal_jax.distributed import Placement
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
from refusal_jax.pipeline.progress import progress

_NO_POSITION_LIMIT = np.iinfo(np.int32).max
# A DiM direction shorter than this (relative to the largest one) is treated as zero.
_DEGENERATE_NORM = 1e-6
# Val sets are padded to a multiple of this many tokens (every candidate pays for each column).
SELECTION_LENGTH_BUCKET = 8


# ----------------------------------------------------------------------------------------------
# Forward from a cached layer.


def _layer_slice(tree, index):
    return jax.tree_util.tree_map(
        lambda leaf: jax.lax.dynamic_index_in_dim(leaf, index, axis=0, keepdims=False), tree)


def forward_from_layer(params, resid: jax.Array, valid: jax.Array, start_layer: jax.Array, *,
                       config, intervention=None, prefix: jax.Array | None = None) -> jax.Array:
    """Last-position logits [B, V] of the forward that resumes at block ``start_layer``.

    ``resid`` [B, S, D] is the (unintervened) ``resid_pre`` of block ``start_layer`` of a
    left-padded batch; the intervention's sites at layers >= ``start_layer`` apply as in the
    full forward, those below are ignored (so only pass interventions that act at layers
    >= ``start_layer``). ``start_layer`` may be traced.

    ``prefix`` [P, D], when given, is the ``resid_pre`` of block ``start_layer`` at P tokens
    that precede every row (the template's system turn, shared by all prompts): they take
    positions 0..P-1, each row's tokens follow at P.., and the prefix is computed once for the
    whole batch instead of once per row (exact: attention sees the same keys). The
    intervention then must not depend on the row (no per-row position windows).
    """
    valid = valid.astype(bool)
    batch, length, _ = resid.shape
    n_prefix = 0 if prefix is None else prefix.shape[0]
    positions = jnp.where(valid, n_prefix + jnp.cumsum(valid, axis=1) - 1, -1).astype(jnp.int32)
    ctx = SiteContext(positions=positions, valid=valid)
    windows = jnp.asarray(config.layer_windows())
    zero = jnp.zeros((), jnp.int32)

    def weights(index):
        iv = None if intervention is None else _layer_slice(intervention, index)
        return _layer_slice(params.layers, index), windows[index], iv

    if not n_prefix:
        def block(index, x):
            w, window, iv = weights(index)
            return decoder_block(x, w, window, iv, ctx, None, None, positions, zero, config)[0]

        x = jax.lax.fori_loop(start_layer, config.n_layers, block, resid)
        return unembed(params, x[:, -1], config)

    head_positions = jnp.arange(n_prefix, dtype=jnp.int32)[None]  # [1, P]
    head_ctx = SiteContext(positions=head_positions, valid=jnp.ones((1, n_prefix), bool))
    key_positions = jnp.concatenate(
        [jnp.broadcast_to(head_positions, (batch, n_prefix)), positions], axis=1)
    heads = (config.n_kv_heads, config.head_dim)
    head_slots = jnp.zeros((1, n_prefix) + heads, resid.dtype)
    row_slots = jnp.zeros((batch, length) + heads, resid.dtype)

    def block(index, carry):
        head, rows = carry
        w, window, iv = weights(index)
        # The prefix attends within itself; its keys and values are then shared by every row.
        head, _, keys, values = decoder_block(head, w, window, iv, head_ctx, head_slots,
                                              head_slots, head_positions, zero, config)
        keys, values = (jnp.concatenate([jnp.broadcast_to(kv, (batch,) + kv.shape[1:]),
                                         row_slots], axis=1) for kv in (keys, values))
        rows, _, _, _ = decoder_block(rows, w, window, iv, ctx, keys, values, key_positions,
                                      jnp.asarray(n_prefix, jnp.int32), config)
        return head, rows

    _, x = jax.lax.fori_loop(start_layer, config.n_layers, block, (prefix[None], resid))
    return unembed(params, x[:, -1], config)


@functools.partial(jax.jit, static_argnames=("config", "n_prefix"))
def _baseline(params, tokens, valid, refusal_ids, *, config, n_prefix):
    """Residual stream at every layer and position (the shared prefix of row 0 [P, L, D], the
    rest [B, S, L, D]), last-position log-probs and refusal scores."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    out = forward(params, tokens, valid, config=config, capture_positions=positions,
                  logits="last")
    return (out.captures[0, :n_prefix], out.captures[:, n_prefix:],
            jax.nn.log_softmax(out.logits, axis=-1), refusal_score(out.logits, refusal_ids))


@functools.partial(jax.jit, static_argnames=("config",))
def _score_chunk(params, prefix, cache, valid, row_weights, start_layer, interventions,
                 refusal_ids, baseline_logprobs, *, config):
    """Per-candidate sums over the batch's real rows of (refusal score, KL)."""
    def at_start(stream):
        return jax.lax.dynamic_index_in_dim(stream, start_layer, axis=-2, keepdims=False)

    resid, head = at_start(cache), (at_start(prefix) if prefix.shape[0] else None)

    def one(intervention):
        logits = forward_from_layer(params, resid, valid, start_layer, config=config,
                                    intervention=intervention, prefix=head)
        scores = refusal_score(logits, refusal_ids)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        kl = jnp.sum(jnp.exp(baseline_logprobs) * (baseline_logprobs - logprobs), axis=-1)
        return jnp.sum(row_weights * scores), jnp.sum(row_weights * kl)

    return jax.vmap(one)(interventions)


# ----------------------------------------------------------------------------------------------
# Cached baselines of a prompt set.


@dataclasses.dataclass
class CachedSet:
    """Baseline of a val set, split at the tokens every prompt starts with.

    prefix: [P, L, D] residual stream of those P shared tokens (P may be 0);
    batches: per batch of prompts, (cache [B, S, L, D] of the rest of each prompt, valid
    [B, S], row weights [B] (0 for filler rows), baseline last-position log-probs [B, V]).
    """

    prefix: jax.Array
    batches: list[tuple[jax.Array, jax.Array, jax.Array, jax.Array]]
    refusal_scores: np.ndarray  # [n] baseline refusal score of each prompt
    n: int


def shared_prefix_length(token_lists: Sequence[Sequence[int]], keep_last: int = 1) -> int:
    """Length of the longest common prefix of the token lists, leaving every list at least its
    last ``keep_last`` tokens (those whose logits or activations are read)."""
    limit = max(min(len(ids) for ids in token_lists) - keep_last, 0)
    first = token_lists[0]
    for index in range(limit):
        if any(ids[index] != first[index] for ids in token_lists):
            return index
    return limit


def split_batches(token_lists: Sequence[Sequence[int]], n_prefix: int, *, batch_size: int,
                  length_bucket: int, pad_id: int):
    """Yields (row indices, tokens [B, P + S], valid [B, P + S]): the shared prefix, then each
    prompt's remaining tokens left padded to a multiple of ``length_bucket``.

    Prompts are sorted by length and split into batches of equal size, at most ``batch_size``
    rows (n <= batch_size prompts are one batch of n rows). Every row costs a forward pass, so
    only the last batch is filled up, with fewer fillers than there are batches (repeats of its
    last prompt; callers ignore their outputs).
    """
    n = len(token_lists)
    n_batches = -(-n // batch_size)
    rows_per_batch = -(-n // n_batches)
    order = np.argsort([len(ids) for ids in token_lists], kind="stable")
    prefix = np.asarray(token_lists[0][:n_prefix], np.int32)
    for start in range(0, n, rows_per_batch):
        rows = order[start:start + rows_per_batch]
        rests = [token_lists[i][n_prefix:] for i in rows]
        rests += [rests[-1]] * (rows_per_batch - len(rows))
        length = -(-max(map(len, rests)) // length_bucket) * length_bucket
        batch = left_pad(rests, length=length, pad_id=pad_id)
        tokens = np.concatenate([np.broadcast_to(prefix, (rows_per_batch, n_prefix)),
                                 batch.tokens], axis=1)
        valid = np.concatenate([np.ones((rows_per_batch, n_prefix), bool), batch.valid], axis=1)
        yield rows, tokens, valid


def shared_prefix_batches(model: Model, instructions: Sequence[str], *, batch_size: int,
                          length_bucket: int, keep_last: int = 1):
    """The chat prompts of ``instructions`` as (P, [(row indices, tokens, valid)]): the number
    of template tokens every prompt starts with, and the batches of :func:`split_batches`.
    Raises ValueError (from ``ChatFormat.encode``) for prompts too long or merged with the
    template."""
    encoded = model.chat.encode(list(instructions), context_length=model.config.max_context,
                                length_bucket=1)
    token_lists = [list(ids[mask]) for ids, mask in zip(encoded.tokens, encoded.valid)]
    n_prefix = shared_prefix_length(token_lists, keep_last)
    return n_prefix, list(split_batches(token_lists, n_prefix, batch_size=batch_size,
                                        length_bucket=length_bucket,
                                        pad_id=pad_token_id(model.tokenizer)))


def cache_baseline(model: Model, instructions: Sequence[str], refusal_ids: jax.Array, *,
                   batch_size: int, length_bucket: int, name: str) -> CachedSet:
    n_prefix, work = shared_prefix_batches(model, instructions, batch_size=batch_size,
                                           length_bucket=length_bucket)
    batches, scores, prefix = [], np.zeros(len(instructions), np.float32), None
    for rows, tokens, valid in progress(work, len(work), f"baseline cache of {name} "
                                        f"({n_prefix} shared prefix tokens)"):
        prefix, cache, logprobs, batch_scores = _baseline(
            model.params, jnp.asarray(tokens), jnp.asarray(valid), refusal_ids,
            config=model.config, n_prefix=n_prefix)
        weights = np.zeros(len(tokens), np.float32)
        weights[:len(rows)] = 1.0
        batches.append((cache, jnp.asarray(valid[:, n_prefix:]), jnp.asarray(weights),
                        logprobs))
        scores[rows] = distributed.gather(batch_scores)[:len(rows)]
    return CachedSet(prefix=prefix, batches=batches, refusal_scores=scores,
                     n=len(instructions))


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
           chunk: int, what: str, placement: Placement | None, **stack_args
           ) -> tuple[np.ndarray, np.ndarray]:
    """Mean refusal score and mean KL of each candidate on a cached set. With a placement,
    each chunk's candidate axis is split over its mesh (logical axis ``candidates``)."""
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
        if placement is not None:
            stacked, _ = placement.leading(stacked, "candidates")
        for cache, valid, weights, logprobs in cached.batches:
            score_sum, kl_sum = distributed.gather(_score_chunk(
                model.params, cached.prefix, cache, valid, weights, jnp.asarray(start, jnp.int32),
                stacked, refusal_ids, logprobs, config=model.config))
            scores[indices] += np.asarray(score_sum, np.float64)[:len(indices)]
            kls[indices] += np.asarray(kl_sum, np.float64)[:len(indices)]
    return scores / cached.n, kls / cached.n


# ----------------------------------------------------------------------------------------------
# Scores of every (p, l) for one method.


@dataclasses.dataclass
class CandidateScores:
    """Scores of every (p, l): bypass [P, L], steering [P, L, M], kl [P, L]; NaN = degenerate
    or not scored. ``filtered`` [P, L]: whether the pair's KL and steering were computed."""

    bypass: np.ndarray
    steering: np.ndarray
    kl: np.ndarray
    filtered: np.ndarray


def _bypass_scores(model: Model, harmful: CachedSet, refusal_ids, pairs, *, chunk: int,
                   what: str, global_ablation: bool, placement: Placement | None,
                   **stack_args) -> np.ndarray:
    ablations = [Candidate(p, l, "ablate", 0 if global_ablation else l) for p, l in pairs]
    values, _ = _score(model, harmful, ablations, refusal_ids, chunk=chunk, what=what,
                       placement=placement, global_ablation=global_ablation, **stack_args)
    return values


def _filter_scores(model: Model, harmless: CachedSet, refusal_ids, pairs, *,
                   multipliers: Sequence[float], chunk: int, what: str, global_ablation: bool,
                   placement: Placement | None, **stack_args) -> tuple[np.ndarray, np.ndarray]:
    """KL of each pair's ablation [n] and refusal score under its ActAdd per multiplier [n, M]
    on the harmless set."""
    ablations = [Candidate(p, l, "ablate", 0 if global_ablation else l) for p, l in pairs]
    actadds = [Candidate(p, l, "actadd", l, m) for p, l in pairs for m in multipliers]
    values, kls = _score(model, harmless, ablations + actadds, refusal_ids, chunk=chunk,
                         what=what, placement=placement, global_ablation=global_ablation,
                         **stack_args)
    return kls[:len(pairs)], values[len(pairs):].reshape(len(pairs), len(multipliers))


def score_candidates(model: Model, harmful: CachedSet, harmless: CachedSet, refusal_ids, *,
                     ablation_basis: np.ndarray, actadd_direction: np.ndarray,
                     actadd_norm: np.ndarray, degenerate: np.ndarray,
                     multipliers: Sequence[float], global_ablation: bool, chunk: int,
                     name: str, filters: str = "all", rank_args: dict | None = None,
                     placement: Placement | None = None) -> CandidateScores:
    """Bypass of every non-degenerate (p, l), and KL and steering of

    - ``filters="all"``: every one of them;
    - ``filters="none"``: none (bypass only);
    - ``filters="until_chosen"``: the pairs that can survive the filters (a finite bypass, not a
      late layer), in rank order (``rank_args``: the keyword arguments of :func:`rank`), a few
      at a time until one survives. That one is the best survivor :func:`rank` would return
      had every pair been scored (all pairs ranked before it were scored and failed), at a
      fraction of the cost; the pairs after it keep NaN KL and steering.
    """
    if filters not in ("all", "none", "until_chosen"):
        raise ValueError(f"filters must be 'all', 'none' or 'until_chosen', got {filters!r}")
    n_positions, n_layers = degenerate.shape
    shape = (n_positions, n_layers)
    args = dict(chunk=chunk, global_ablation=global_ablation, placement=placement,
                ablation_basis=ablation_basis,
                actadd_direction=actadd_direction, actadd_norm=actadd_norm)
    pairs = [(p, l) for p in range(n_positions) for l in range(n_layers) if not degenerate[p, l]]
    scores = CandidateScores(bypass=np.full(shape, np.nan),
                             steering=np.full(shape + (len(multipliers),), np.nan),
                             kl=np.full(shape, np.nan), filtered=np.zeros(shape, bool))
    for (p, l), value in zip(pairs, _bypass_scores(model, harmful, refusal_ids, pairs,
                                                   what=f"{name} bypass", **args)):
        scores.bypass[p, l] = value

    def score_filters(group, what):
        kls, steering = _filter_scores(model, harmless, refusal_ids, group,
                                       multipliers=multipliers, what=what, **args)
        for (p, l), kl, steer in zip(group, kls, steering):
            scores.kl[p, l], scores.steering[p, l], scores.filtered[p, l] = kl, steer, True

    if filters == "all":
        score_filters(pairs, f"{name} KL and steering")
    elif filters == "until_chosen":
        order = rank_order(scores.bypass, **rank_args)
        # As many pairs as fill one candidate chunk (each is an ablation and M ActAdds).
        group_size = max(1, chunk // (1 + len(multipliers)))
        groups = [order[i:i + group_size] for i in range(0, len(order), group_size)]
        for index, group in enumerate(groups):
            score_filters(group, f"{name} KL and steering, in rank order, group {index + 1} "
                          f"of at most {len(groups)}")
            if rank(scores, **rank_args)[0]:
                break
    return scores


# ----------------------------------------------------------------------------------------------
# Filters and ranking.


def _late_layers(shape: tuple[int, int], select_config) -> np.ndarray:
    layer_limit = (1.0 - select_config.prune_layer_fraction) * shape[1]
    return np.broadcast_to(np.arange(shape[1]), shape) >= layer_limit


def _sort_key(bypass: np.ndarray, accuracy: np.ndarray | None):
    if accuracy is None:
        return lambda pair: bypass[pair]
    return lambda pair: (-accuracy[pair], bypass[pair])


def rank_order(bypass: np.ndarray, *, select_config,
               accuracy: np.ndarray | None = None) -> list[tuple[int, int]]:
    """The pairs that can survive the filters (finite bypass, not a late layer), in the order
    :func:`rank` ranks survivors."""
    eligible = np.isfinite(bypass) & ~_late_layers(bypass.shape, select_config)
    pairs = [tuple(int(i) for i in pair) for pair in np.argwhere(eligible)]
    return sorted(pairs, key=_sort_key(bypass, accuracy))


def rank(scores: CandidateScores, *, select_config,
         accuracy: np.ndarray | None = None) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """Surviving (p, l) pairs, best first, and how many pairs each filter discarded.

    ``accuracy`` [P, L] (INLP's first-classifier dev accuracy) ranks first when given. Only
    pairs whose filters were scored (``scores.filtered``) can survive; the others are counted
    under "not_scored" (when the filters were scored only until the best one was found).
    """
    steering = np.max(scores.steering, axis=-1)
    with np.errstate(invalid="ignore"):
        filters = {
            "nan": np.isnan(scores.bypass) | (scores.filtered & (np.isnan(steering)
                                                                 | np.isnan(scores.kl))),
            "late_layer": _late_layers(scores.bypass.shape, select_config),
            "kl": scores.kl > select_config.kl_threshold,
            "steering": steering < select_config.min_steering_score,
        }
    discarded = np.zeros(scores.bypass.shape, bool)
    for mask in filters.values():
        discarded |= mask
    not_scored = ~discarded & ~scores.filtered
    if not_scored.any():
        filters["not_scored"] = not_scored
    survivors = [tuple(int(i) for i in pair) for pair in np.argwhere(~discarded & ~not_scored)]
    survivors.sort(key=_sort_key(scores.bypass, accuracy))
    return survivors, {name: int(mask.sum()) for name, mask in filters.items()}


def lowest_bypass_fallback(scores: CandidateScores, discarded: dict[str, int], *,
                           select_config) -> tuple[list[tuple[int, int]], str]:
    """The ranking when no candidate passes the filters: among the candidates that could have
    (finite bypass, not a late layer; every one of them had its filters scored once none
    survived), the one with the lowest bypass score, and a note of why it was taken. Raises
    ValueError when there is none."""
    eligible = rank_order(scores.bypass, select_config=select_config)
    eligible = [pair for pair in eligible if scores.filtered[pair]]
    if not eligible:
        raise ValueError(f"no candidate to fall back on (discarded per filter: {discarded}): "
                         "every bypass score is NaN or at a late layer; check the directions "
                         "for zeros and the model for NaNs, or lower select.prune_layer_fraction")
    return eligible[:1], (
        f"no candidate passed the filters (discarded per filter: {discarded}); the one with "
        "the lowest bypass score outside the late layers is used")


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


def dim_candidates(dim: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unit directions, norms, degenerate mask) of a DiM grid [P, L, D]: a direction shorter
    than 1e-6 of the longest counts as zero (degenerate) and keeps a zero unit vector."""
    norms = np.linalg.norm(dim, axis=-1)
    degenerate = norms <= _DEGENERATE_NORM * max(float(norms.max()), 1e-30)
    return dim / np.where(degenerate, 1.0, norms)[..., None], norms, degenerate


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
    common = dict(multipliers=tuple(select_config.multipliers), chunk=runtime.candidate_chunk,
                  placement=placement)
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
        accuracy = first_accuracy if name == "inlp" else None
        rank_args = dict(select_config=select_config, accuracy=accuracy)
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
        chosen = ranking[:n_components(len(ranking), select_config)]
        summary[name] = {
            "components": [describe_component(p, l, n_positions, scores,
                                              keep if name == "inlp" else None, accuracy)
                           for p, l in chosen],
            "ranking": [[p - n_positions, l] for p, l in ranking],
            "discarded": discarded,
            "filters_scored": int(scores.filtered.sum()),
            "fallback": fallback,
        }
        if len(by_mode) == 2:
            summary[name]["spearman_local_global_bypass"] = spearman(
                by_mode["local"].bypass.ravel(), by_mode["global"].bypass.ravel())
        best = summary[name]["components"][0]
        logging.info("%s: chose (position %d, layer %d), bypass %.3f, steering %.3f, KL %.4f",
                     name, best["position"], best["layer"], best["bypass"], best["steering"],
                     best["kl"])
    return summary, arrays


def describe_component(p: int, l: int, n_positions: int, scores: CandidateScores,
                       keep: np.ndarray | None, accuracy: np.ndarray | None) -> dict:
    """The selection record of the candidate (p, l): its EOI position (negative) and index,
    layer and scores, and for INLP (`keep`, `accuracy` given) its k and first dev accuracy."""
    entry = {"position": p - n_positions, "position_index": p, "layer": l,
             "bypass": float(scores.bypass[p, l]),
             "steering": float(np.max(scores.steering[p, l])),
             "kl": float(scores.kl[p, l])}
    if keep is not None:
        entry["k"] = int(keep[p, l])
        entry["first_dev_accuracy"] = float(accuracy[p, l])
    return entry
