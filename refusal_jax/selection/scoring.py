"""Selection of the (EOI position, layer) whose direction steers refusal (docs/method.md section 4).

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
layers below s untouched, so its forward starts from the cached ``resid_pre[s]`` (``forward``
with ``start_layer=s``: a ``fori_loop`` from s with the layer weights indexed dynamically): no
recomputation below s, and s is a traced scalar, so one compiled program serves every start
layer. The shared tokens are computed once per candidate, not once per prompt, and their keys
and values are shared by every prompt's attention (``models.batching.forward_shared_prefix``).
A set of at most ``runtime.batch_size`` prompts is one batch of exactly that many rows (no
filler rows), padded to a multiple of 8 tokens. Candidates are sorted by start layer and
stacked in chunks of ``candidate_chunk`` on a leading axis (``Compose(ablation, ActAdd)``
pytrees, the unused half masked to zero); a chunk resumes at its earliest start layer and is
evaluated by ``jax.vmap``, returning only per-candidate means. The number of compiled
programs is fixed: per method and val set one (the batch shapes and the candidate chunk never
change).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.evaluation.kl import kl_from_log_probs
from refusal_jax.evaluation.refusal import refusal_score
from refusal_jax.interventions import ABLATION_SITES
from refusal_jax.models.batching import forward_shared_prefix, shared_prefix_batches
from refusal_jax.models.core import forward
from refusal_jax.models.loading import Model
from refusal_jax.runtime import distributed
from refusal_jax.runtime.placement import Placement
from refusal_jax.runtime.progress import progress
from refusal_jax.selection.candidates import Candidate, stack_candidates
from refusal_jax.selection.ranking import CandidateScores, rank, rank_order

# Val sets are padded to a multiple of this many tokens (every candidate pays for each column).
SELECTION_LENGTH_BUCKET = 8


@functools.partial(jax.jit, static_argnames=("config", "n_prefix"))
def _baseline(params, tokens, valid, refusal_ids, *, config, n_prefix):
    """Residual stream at every layer and position (the shared prefix of row 0 [P, L, D], the
    rest [B, S, L, D]), last-position log-probs and refusal scores."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    out = forward(params, tokens, valid, config=config, capture_positions=positions,
                  logits="last")
    return (out.captures[0, :n_prefix], out.captures[:, n_prefix:],
            jax.nn.log_softmax(out.logits, axis=-1), refusal_score(out.logits, refusal_ids))


@functools.partial(jax.jit, static_argnames=("config", "kl_eps"))
def _score_chunk(params, prefix, cache, valid, row_weights, start_layer, interventions,
                 refusal_ids, baseline_logprobs, *, config, kl_eps):
    """Per-candidate sums over the batch's real rows of (refusal score, KL with ``kl_eps``
    inside its logarithms, see :func:`refusal_jax.evaluation.kl.kl_from_log_probs`)."""
    def at_start(stream):
        return jax.lax.dynamic_index_in_dim(stream, start_layer, axis=-2, keepdims=False)

    resid, head = at_start(cache), at_start(prefix)

    def one(intervention):
        logits = forward_shared_prefix(params, head, resid, valid, config=config,
                                       intervention=intervention, start_layer=start_layer,
                                       logits="last").logits
        scores = refusal_score(logits, refusal_ids)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        kl = kl_from_log_probs(baseline_logprobs, logprobs, eps=kl_eps)
        return jnp.sum(row_weights * scores), jnp.sum(row_weights * kl)

    return jax.vmap(one)(interventions)


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


def _score(model: Model, cached: CachedSet, candidates: list[Candidate], refusal_ids, *,
           chunk: int, what: str, placement: Placement | None, kl_eps: float, **stack_args
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
        stacked = stack_candidates(padded, n_layers=model.config.n_layers, **stack_args)
        if placement is not None:
            stacked, _ = placement.leading(stacked, "candidates")
        for cache, valid, weights, logprobs in cached.batches:
            score_sum, kl_sum = distributed.gather(_score_chunk(
                model.params, cached.prefix, cache, valid, weights, jnp.asarray(start, jnp.int32),
                stacked, refusal_ids, logprobs, config=model.config, kl_eps=kl_eps))
            scores[indices] += np.asarray(score_sum, np.float64)[:len(indices)]
            kls[indices] += np.asarray(kl_sum, np.float64)[:len(indices)]
    return scores / cached.n, kls / cached.n


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
                     ablation_sites: Sequence[str] = ABLATION_SITES, kl_eps: float = 0.0,
                     placement: Placement | None = None) -> CandidateScores:
    """Bypass of every non-degenerate (p, l), and KL and steering of

    - ``filters="all"``: every one of them;
    - ``filters="none"``: none (bypass only);
    - ``filters="until_chosen"``: the pairs that can survive the filters (a finite bypass, not a
      late layer), in rank order (``rank_args``: the keyword arguments of :func:`rank`), a few
      at a time until one survives. That one is the best survivor :func:`rank` would return
      had every pair been scored (all pairs ranked before it were scored and failed), at a
      fraction of the cost; the pairs after it keep NaN KL and steering.

    ``ablation_sites``: where a local ablation acts in its layer (every site of
    :data:`refusal_jax.interventions.ABLATION_SITES` by default); ``kl_eps``: see
    :func:`refusal_jax.evaluation.kl.kl_from_log_probs`.
    """
    if filters not in ("all", "none", "until_chosen"):
        raise ValueError(f"filters must be 'all', 'none' or 'until_chosen', got {filters!r}")
    n_positions, n_layers = degenerate.shape
    shape = (n_positions, n_layers)
    args = dict(chunk=chunk, global_ablation=global_ablation, placement=placement,
                kl_eps=kl_eps, ablation_sites=tuple(ablation_sites), ablation_basis=ablation_basis,
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
