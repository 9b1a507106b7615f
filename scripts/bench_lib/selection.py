"""Section 3, candidate selection: the pipeline's selection stage against the published
pipeline's hooked loop, on the same DiM candidates, prompts and refusal tokens.

Candidates are (EOI position p, layer l) pairs of the DiM grid r[p, l] of the workload's
training activations; pairs whose r is zero (layer 0, where every prompt's EOI inputs are the
same template token) are never candidates, as in the pipeline. Settings come from
`refusal_jax.study.config.base_config()` (the reference ones): `select.multipliers`,
`select.mode`, the filters and ranking, `runtime.batch_size` and `runtime.candidate_chunk` (the
mode, batch size and chunk can be overridden). Prompts: the first n instructions of harmful_val
and harmless_val (sampled with seed 42; not filtered by refusal score, which changes only which
prompts are scored), wrapped in the model's chat template by our `ChatFormat` on both sides.
Refusal tokens: `refusal_token_ids(model.tokenizer)` on both sides.

- Ours: `scoring.cache_baseline` of both val sets, then `scoring.score_candidates` called as
  `select.run_selection` calls it for DiM (ablation basis the unit direction r_hat, ActAdd along
  r_hat with coefficient m * ||r||; the candidates outside the measured subset are marked
  degenerate, as `run_selection` does with `select.positions`): the shared chat prefix, every
  candidate's forward resumed from its layer, candidates vmapped in chunks. Two rows:
  `filters="all"` (bypass, KL and steering for every candidate: the like-for-like row) and
  `filters="until_chosen"` (what the pipeline runs with `select.just_one`: KL and steering in
  rank order until a candidate survives the filters).
- Baseline (Arditi et al.'s `select_direction` loop, docs/method.md section 4): per candidate, full
  transformers forward passes with hooks: directional ablation (local: block input, attention
  and MLP outputs of layer l; global: of every layer) on harmful val -> bypass; the same on
  harmless val -> KL(baseline || intervened) of the last-position next-token distribution, the
  unhooked one computed once per sweep; ActAdd at the block input of layer l on harmless val,
  one pass per multiplier -> steering. Batches of `runtime.batch_size` prompts in set order,
  each left padded to its longest (the reference tokenizer's padding), tokenized once per sweep.

One timed call of each side is a whole DiM sweep, set-up included: ours caches both baselines
(tokenizing inside), the baseline tokenizes and computes its unhooked harmless logits. The three
calls (ours "all", ours "until_chosen", baseline) are interleaved, rotating which goes first;
speed-ups are taken run by run. Both rows are compared with the same baseline runs: the
published loop scores every candidate's filters (it has no early stop).

Before timing, ours is called once per filter mode on one candidate: that compiles every
program the sweep uses (`scoring._baseline` and `scoring._score_chunk` are jitted on their shapes,
which do not depend on the number of candidates: chunks are padded to `candidate_chunk`), and
the compile time is the wall time of JAX's compile events (tracing, lowering, XLA compilation)
during those calls; compile time during the timed runs is recorded too (0 when nothing
recompiles). The baseline's warm-up is `warmup` one-candidate sweeps. With
`baseline_candidates` > 0 the baseline runs on that many of the candidates (spread over them)
and its time is extrapolated run by run, set-up + loop x candidates / measured, and the row is
marked extrapolated. Agreement: the largest absolute differences of bypass, steering (every
multiplier) and KL between the two sides over the pairs the baseline scored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bench_lib import torch_stack
from bench_lib.activations import spread
from bench_lib.measure import PeakRSS, Stats, timed_call
from bench_lib.report import Row
from bench_lib.workload import Workload
from refusal_jax.models.loading import Model
from refusal_jax.selection import components, scoring
from refusal_jax.selection.ranking import CandidateScores, rank
from refusal_jax.study.config import SELECT_MODES, base_config
from refusal_jax.text.chat import refusal_token_ids

SECTION = "3 selection"
BASELINE_LABEL = "transformers + hooks (passes per candidate)"
_COMPILE_EVENTS = "/jax/core/compile/"


@dataclasses.dataclass(frozen=True)
class SelectionProblem:
    """What both sides score: candidates, prompts, refusal tokens and the selection settings."""

    model: Model
    harmful: tuple[str, ...]
    harmless: tuple[str, ...]
    refusal_ids: np.ndarray  # [R] int32
    unit: np.ndarray  # [P, L, D] unit DiM directions r_hat (r itself where r is zero)
    norms: np.ndarray  # [P, L] ||r||
    zero: np.ndarray  # [P, L] bool: r is zero, never a candidate
    pairs: tuple[tuple[int, int], ...]  # the candidates (p, l), position-major
    multipliers: tuple[float, ...]
    global_ablation: bool
    batch_size: int
    chunk: int
    select_config: Any  # the `select` ConfigDict (filters and ranking)


def selection_problem(model: Model, directions: np.ndarray, harmful: Sequence[str],
                      harmless: Sequence[str], *, candidates: int, mode: str | None = None,
                      chunk: int = 0, batch_size: int = 0) -> SelectionProblem:
    """The problem of `candidates` pairs spread over the grid's non-zero ones (0: all of them),
    with the reference settings; `mode`, `chunk` and `batch_size` (> 0) override
    `select.mode`, `runtime.candidate_chunk` and `runtime.batch_size`."""
    config = base_config()
    mode = mode or config.select.mode
    if mode not in SELECT_MODES:
        raise ValueError(f"selection mode must be one of {SELECT_MODES}, got {mode!r}")
    if min(candidates, chunk, batch_size) < 0:
        raise ValueError(f"need candidates, chunk and batch_size >= 0, got {candidates}, "
                         f"{chunk} and {batch_size}")
    directions = np.asarray(directions, np.float32)
    n_layers, width = model.config.n_layers, model.config.d_model
    if directions.ndim != 3 or directions.shape[1:] != (n_layers, width):
        raise ValueError(f"directions must be a DiM grid [positions, {n_layers} layers, "
                         f"{width}], got shape {directions.shape}")
    if not harmful or not harmless:
        raise ValueError("selection needs at least one harmful and one harmless val prompt")
    unit, norms, zero = components.dim_candidates(directions)  # float32, as directions
    usable = np.argwhere(~zero)
    if usable.size == 0:
        raise ValueError("every DiM direction is zero: the training activations do not "
                         "separate harmful from harmless prompts")
    pairs = tuple((int(p), int(l)) for p, l in usable[spread(len(usable), candidates)])
    return SelectionProblem(
        model=model, harmful=tuple(harmful), harmless=tuple(harmless),
        refusal_ids=np.asarray(refusal_token_ids(model.tokenizer), np.int32), unit=unit,
        norms=norms, zero=zero, pairs=pairs, multipliers=tuple(config.select.multipliers),
        global_ablation=mode == "global", batch_size=batch_size or config.runtime.batch_size,
        chunk=chunk or config.runtime.candidate_chunk, select_config=config.select)


# ----------------------------------------------------------------------------------------------
# The two sides.


@dataclasses.dataclass(frozen=True)
class OursResult:
    scores: CandidateScores
    setup_s: float  # caching both val sets


def score_ours(problem: SelectionProblem, pairs: Sequence[tuple[int, int]],
               filters: str) -> OursResult:
    """The pipeline's DiM selection scores of `pairs` (see the module docstring)."""
    model = problem.model
    refusal_ids = jnp.asarray(problem.refusal_ids, jnp.int32)
    start = time.perf_counter()
    cache_args = dict(batch_size=problem.batch_size,
                      length_bucket=scoring.SELECTION_LENGTH_BUCKET)
    harmful = scoring.cache_baseline(model, problem.harmful, refusal_ids, name="harmful_val",
                                    **cache_args)
    harmless = scoring.cache_baseline(model, problem.harmless, refusal_ids, name="harmless_val",
                                     **cache_args)
    setup_s = time.perf_counter() - start  # cache_baseline returns gathered (waited) scores
    left_out = np.ones(problem.zero.shape, bool)
    left_out[tuple(np.asarray(pairs).T)] = False
    scores = scoring.score_candidates(
        model, harmful, harmless, refusal_ids, ablation_basis=problem.unit[..., None, :],
        actadd_direction=problem.unit, actadd_norm=problem.norms, degenerate=left_out,
        multipliers=problem.multipliers, global_ablation=problem.global_ablation,
        chunk=problem.chunk, name="dim", filters=filters,
        rank_args=dict(select_config=problem.select_config, accuracy=None))
    return OursResult(scores, setup_s)


@dataclasses.dataclass(frozen=True)
class BaselineResult:
    bypass: np.ndarray  # [n]
    steering: np.ndarray  # [n, M]
    kl: np.ndarray  # [n]
    setup_s: float  # tokenizing both sets and the unhooked harmless pass


def _torch_batches(model: Model, instructions: Sequence[str], batch_size: int, device: str):
    batches = []
    for start in range(0, len(instructions), batch_size):
        batch = model.chat.encode(list(instructions[start:start + batch_size]),
                                  context_length=model.config.max_context, length_bucket=1)
        batches.append(torch_stack.as_torch(batch.tokens, batch.valid, device))
    return batches


def _last_logits(torch_model, batches) -> list[torch.Tensor]:
    return [torch_stack.logits(torch_model, ids, mask, last_only=True) for ids, mask in batches]


@torch.no_grad()
def score_baseline(problem: SelectionProblem, torch_model, pairs: Sequence[tuple[int, int]],
                   device: str = "cpu") -> BaselineResult:
    """Bypass, steering and KL of `pairs` with hooks and full forward passes (see the module
    docstring)."""
    start = time.perf_counter()
    harmful = _torch_batches(problem.model, problem.harmful, problem.batch_size, device)
    harmless = _torch_batches(problem.model, problem.harmless, problem.batch_size, device)
    baseline_logprobs = [torch.log_softmax(logits.double(), dim=-1)
                         for logits in _last_logits(torch_model, harmless)]
    setup_s = time.perf_counter() - start
    refusal_ids = torch.as_tensor(problem.refusal_ids, dtype=torch.long, device=device)

    def mean_refusal(batches) -> float:
        scores = [torch_stack.refusal_score(logits, refusal_ids)
                  for logits in _last_logits(torch_model, batches)]
        return float(torch.cat(scores).mean())

    bypass, steering, kl = [], [], []
    for p, l in pairs:
        unit = torch.as_tensor(problem.unit[p, l], device=device)
        layers = None if problem.global_ablation else [l]
        with torch_stack.ablation_hooks(torch_model, unit, layers=layers):
            bypass.append(mean_refusal(harmful))
            kls = [torch_stack.kl_divergence(base, logits) for base, logits in
                   zip(baseline_logprobs, _last_logits(torch_model, harmless))]
            kl.append(float(torch.cat(kls).mean()))
        per_multiplier = []
        for multiplier in problem.multipliers:
            coeff = float(np.float32(multiplier) * problem.norms[p, l])  # as ours, in float32
            with torch_stack.addition_hook(torch_model, unit * coeff, l):
                per_multiplier.append(mean_refusal(harmless))
        steering.append(per_multiplier)
    return BaselineResult(np.asarray(bypass), np.asarray(steering).reshape(len(pairs), -1),
                          np.asarray(kl), setup_s)


def max_abs_differences(ours: CandidateScores, baseline: BaselineResult,
                        pairs: Sequence[tuple[int, int]]) -> dict[str, float | None]:
    """Largest |ours - baseline| of each score over `pairs` (those ours scored; None: none)."""
    index = tuple(np.asarray(pairs).T)
    differences = {}
    for name, theirs in (("bypass", baseline.bypass), ("steering", baseline.steering),
                         ("kl", baseline.kl)):
        difference = np.abs(getattr(ours, name)[index] - theirs)
        finite = difference[np.isfinite(difference)]
        differences[name] = float(finite.max()) if finite.size else None
    return differences


# ----------------------------------------------------------------------------------------------
# Timing.


@contextlib.contextmanager
def compile_seconds() -> Iterator[list[float]]:
    """Yields a one-element list that holds, on exit, the wall time covered by JAX's compile
    events (tracing, lowering to MLIR, XLA compilation) inside the block; nested events (a jit
    traced inside another) are counted once."""
    spans: list[tuple[float, float]] = []

    def listener(event: str, start: float, end: float, **kwargs) -> None:
        if event.startswith(_COMPILE_EVENTS):
            spans.append((start, end))

    total = [0.0]
    jax.monitoring.register_event_time_span_listener(listener)
    try:
        yield total
    finally:
        jax.monitoring.unregister_event_time_span_listener(listener)
        covered_until = -np.inf
        for start, end in sorted(spans):
            total[0] += max(0.0, end - max(start, covered_until))
            covered_until = max(covered_until, end)


@dataclasses.dataclass
class Runs:
    """Timed runs of one side: seconds and results per run, peak memory (warm-up included), the
    first warm-up call, and the JAX compile time during the warm-up calls and the timed runs."""

    seconds: list[float] = dataclasses.field(default_factory=list)
    results: list[Any] = dataclasses.field(default_factory=list)
    memory: PeakRSS = dataclasses.field(default_factory=PeakRSS)
    first_call_s: float | None = None
    compile_s_warmup: float = 0.0
    compile_s_timed: float = 0.0


def time_interleaved(calls: dict[str, Callable[[], Any]],
                     warmups: dict[str, tuple[Callable[[], Any], int]], *,
                     repeats: int) -> dict[str, Runs]:
    """Runs each call `repeats` times, interleaved (the first to run rotates), after its
    warm-up calls (`warmups[name]` = (function, count)). Every run's result is kept."""
    if repeats < 1:
        raise ValueError(f"need repeats >= 1, got {repeats}")
    runs = {name: Runs() for name in calls}
    for name, (function, count) in warmups.items():
        with compile_seconds() as compile_s:
            seconds = [timed_call(function, runs[name].memory)[0] for _ in range(count)]
        runs[name].first_call_s = seconds[0] if seconds else None
        runs[name].compile_s_warmup = compile_s[0]
    names = list(calls)
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            with compile_seconds() as compile_s:
                seconds, result = timed_call(calls[name], runs[name].memory)
            runs[name].seconds.append(seconds)
            runs[name].results.append(result)
            runs[name].compile_s_timed += compile_s[0]
    return runs


# ----------------------------------------------------------------------------------------------
# The section.


def _where(problem: SelectionProblem, pairs) -> list[list[int]]:
    """(position counted from the end, layer) of each pair."""
    n_positions = problem.zero.shape[0]
    return [[p - n_positions, l] for p, l in pairs]


def _chosen(problem: SelectionProblem, scores: CandidateScores) -> list[int] | None:
    ranking, _ = rank(scores, select_config=problem.select_config)
    return _where(problem, ranking[:1])[0] if ranking else None


def _per_candidate(runs: Runs, count: int) -> Stats:
    """Seconds per candidate of each run, its set-up left out."""
    return Stats.of((total - result.setup_s) / count
                    for total, result in zip(runs.seconds, runs.results))


FILTERS = ("all", "until_chosen")


def selection_rows(w: Workload, directions: np.ndarray, *, candidates: int,
                   baseline_candidates: int, n_prompts: int, mode: str | None, chunk: int,
                   batch_size: int, warmup: int, repeats: int,
                   filters: Sequence[str] = FILTERS) -> tuple[list[Row], dict[str, Any]]:
    """The rows of section 3, one per filter mode in `filters` (see the module docstring), and
    what the JSON records about the section."""
    if baseline_candidates < 0 or warmup < 0:
        raise ValueError(f"need baseline_candidates >= 0 and warmup >= 0, got "
                         f"{baseline_candidates} and {warmup}")
    if not filters or not set(filters) <= set(FILTERS):
        raise ValueError(f"filters must be one or more of {FILTERS}, got {list(filters)}")
    filters = [name for name in FILTERS if name in filters]
    problem = selection_problem(
        w.chat_model, directions, w.instructions("harmful_val", n_prompts),
        w.instructions("harmless_val", n_prompts), candidates=candidates, mode=mode,
        chunk=chunk, batch_size=batch_size)
    pairs = problem.pairs
    measured = tuple(pairs[i] for i in spread(len(pairs), baseline_candidates))
    extrapolated = len(measured) < len(pairs)
    torch_model, device = w.torch_model, w.torch_device
    one = pairs[:1]
    calls = {name: functools.partial(score_ours, problem, pairs, name) for name in filters}
    warmups = {name: (functools.partial(score_ours, problem, one, name), 1) for name in filters}
    calls["baseline"] = lambda: score_baseline(problem, torch_model, measured, device)
    warmups["baseline"] = (lambda: score_baseline(problem, torch_model, measured[:1], device),
                           warmup)
    runs = time_interleaved(calls, warmups, repeats=repeats)

    base = runs["baseline"]
    n, scale = len(pairs), len(pairs) / len(measured)
    baseline_setups = [result.setup_s for result in base.results]
    baseline_seconds = Stats.of(setup + (total - setup) * scale
                                for total, setup in zip(base.seconds, baseline_setups))
    n_usable = int((~problem.zero).sum())
    which = (f"all {n} (position, layer) pairs" if n == n_usable else
             f"{n} of {n_usable} (position, layer) pairs, spread over the grid")
    mode = "global" if problem.global_ablation else "local"
    common = {
        "candidates": n, "grid_positions_layers": list(problem.zero.shape),
        "zero_directions_left_out": int(problem.zero.sum()),
        "val_prompts_per_set": len(problem.harmful), "batch_size": problem.batch_size,
        "candidate_chunk": problem.chunk, "multipliers": list(problem.multipliers),
        "mode": mode,
        "baseline_forward_passes_per_candidate_and_batch":
            {"harmful_val": 1, "harmless_val": 1 + len(problem.multipliers)},
        "baseline_setup_s": Stats.of(baseline_setups).to_json(),
        "baseline_s_per_candidate": _per_candidate(base, len(measured)).to_json(),
        "compiled": "ours: before timing, one score_candidates call per filter mode on one "
                    "candidate compiles every program of the sweep (shapes do not depend on "
                    "the number of candidates); compile_s = wall time of JAX compile events "
                    "in those calls",
    }
    if extrapolated:
        common["note"] = (f"baseline extrapolated: measured on {len(measured)} of the {n} "
                          f"candidates, time = setup + loop x {n}/{len(measured)}, run by run")
        common["baseline_measured_s"] = Stats.of(base.seconds).to_json()

    # Both rows run the same compiled programs; the first warm-up call compiles them.
    compile_s = sum(runs[name].compile_s_warmup for name in filters)
    theirs = base.results[-1]
    with_all = "all" in runs
    chosen_all = _chosen(problem, runs["all"].results[-1].scores) if with_all else None
    rows = []
    for name in filters:
        side = runs[name]
        scores = side.results[-1].scores
        details = {
            **common,
            "first_call_s": {"ours": round(side.first_call_s, 4),
                             "baseline": None if base.first_call_s is None
                             else round(base.first_call_s, 4)},
            "compile_s_in_timed_runs": round(side.compile_s_timed, 4),
            "ours_setup_s": Stats.of(result.setup_s for result in side.results).to_json(),
            "ours_s_per_candidate": _per_candidate(side, n).to_json(),
            "filters_scored": int(scores.filtered.sum()),
            "chosen_position_layer": _chosen(problem, scores),
            "max_abs_diff": max_abs_differences(scores, theirs, measured),
            "max_abs_baseline_score": {"bypass": float(np.abs(theirs.bypass).max()),
                                       "steering": float(np.abs(theirs.steering).max()),
                                       "kl": float(np.abs(theirs.kl).max())},
        }
        if name == "until_chosen" and with_all:
            details["same_choice_as_all"] = details["chosen_position_layer"] == chosen_all
        what = ("every candidate's bypass, KL and steering" if name == "all" else
                "the pipeline's default: KL and steering in rank order until one survives")
        rows.append(Row(
            section=SECTION, step=f"DiM selection, filters={name!r} ({what}); {which}, "
            f"{mode} ablation, {len(problem.harmful)} + {len(problem.harmless)} val prompts",
            ours=Stats.of(side.seconds), baseline=baseline_seconds,
            baseline_label=BASELINE_LABEL,
            speedup=Stats.of(b / o for b, o in zip(baseline_seconds.runs, side.seconds)),
            work=n, work_unit="cand", compile_s=compile_s,
            memory={"ours": side.memory, "baseline": base.memory}, extrapolated=extrapolated,
            details=details))
    info = {"candidates_position_layer": _where(problem, pairs),
            "baseline_candidates_position_layer": _where(problem, measured),
            "settings": "refusal_jax.study.config.base_config() (select.*, runtime.*)",
            "prompts": f"the first {len(problem.harmful)} of harmful_val and harmless_val "
                       f"(seed-42 order) from {w.instruction_source}",
            "chat_model": problem.model.source}
    return rows, info
