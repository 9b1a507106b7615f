"""Model-running steps timed against transformers: capture, forward, a candidate sweep,
generation.

`selection_rows` here is the scaling section's candidate step: a bypass-score sweep of
all-layer ablations on token batches, which needs no chat template. Section 3 compares the
pipeline's real selection stage instead (`bench_lib.selection`).

Each function times one step for our jitted JAX code and for the transformers model with the
same weights (forward hooks where the published pipelines use hooks), and returns `Row`s. Our
side is compiled ahead of time (`jit(...).lower(...).compile()`), so the compile time is
reported on its own and never enters the timed runs. Warm-up: `warmup` untimed calls of each
side; for the long steps (candidate sweep, generation) ours gets none (it is compiled already)
and the baseline's warm-up is a reduced call (one candidate, two new tokens) that pays the same
first-call costs. Each row also records how far the two outputs are apart, as a check that both
sides computed the same thing.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bench_lib import torch_stack
from bench_lib.measure import compile_timed, time_pair
from bench_lib.report import Row
from bench_lib.workload import Prompts, Workload
from refusal_jax import interventions
from refusal_jax.evaluation.refusal import refusal_score
from refusal_jax.models.core import forward
from refusal_jax.models.generate import generate, generate_each

TRANSFORMERS_HOOKS = "transformers + hooks"
TRANSFORMERS = "transformers"


def _arrays(prompts: Prompts):
    return (jnp.asarray(prompts.tokens), jnp.asarray(prompts.valid),
            jnp.asarray(prompts.eoi_positions))


def _max_abs_diff(ours, theirs, mask=None) -> float:
    ours = np.asarray(ours, np.float32)
    theirs = theirs.float().cpu().numpy() if isinstance(theirs, torch.Tensor) else theirs
    diff = np.abs(ours - theirs)
    return float(diff[mask].max() if mask is not None else diff.max())


def capture_rows(w: Workload, prompts: Prompts, *, warmup: int, repeats: int,
                 section: str = "1 capture") -> list[Row]:
    """Activations at the EOI positions of every layer, and plain forward logits."""
    config = w.config
    tokens, valid, positions = _arrays(prompts)
    model = w.torch_model
    ids, mask = torch_stack.as_torch(prompts.tokens, prompts.valid, w.torch_device)
    positions_t = torch.as_tensor(prompts.eoi_positions, dtype=torch.long, device=w.torch_device)
    B, T = prompts.tokens.shape
    shape = {"batch": B, "length": T, "valid_tokens": int(prompts.valid.sum())}

    capture = jax.jit(lambda p, t, v, pos: forward(p, t, v, config=config, capture_positions=pos,
                                                   logits="none").captures)
    captured, capture_compile_s = compile_timed(capture, w.params, tokens, valid, positions)
    pair = time_pair(lambda: captured(w.params, tokens, valid, positions),
                     lambda: torch_stack.capture_resid_pre(model, ids, mask, positions_t),
                     warmup=warmup, repeats=repeats)
    rows = [Row.from_pair(
        section, f"capture resid_pre at {prompts.eoi_positions.shape[1]} EOI positions x "
        f"{config.n_layers} layers, batch {B} x {T} tokens", pair,
        baseline_label=TRANSFORMERS_HOOKS, work=B * T, work_unit="tok",
        compile_s=capture_compile_s,
        details=shape | {"max_abs_diff": _max_abs_diff(pair.ours.result, pair.baseline.result)})]

    logits = jax.jit(lambda p, t, v: forward(p, t, v, config=config, logits="all").logits)
    logits_compiled, logits_compile_s = compile_timed(logits, w.params, tokens, valid)
    pair = time_pair(lambda: logits_compiled(w.params, tokens, valid),
                     lambda: torch_stack.logits(model, ids, mask), warmup=warmup, repeats=repeats)
    rows.append(Row.from_pair(
        section, f"forward, logits at every position, batch {B} x {T} tokens", pair,
        baseline_label=TRANSFORMERS, work=B * T, work_unit="tok", compile_s=logits_compile_s,
        details=shape | {"max_abs_diff_valid": _max_abs_diff(
            pair.ours.result, pair.baseline.result, prompts.valid)}))
    return rows


def ablation_candidates(w: Workload, directions: np.ndarray):
    """All-layer directional ablation of each direction, stacked on a candidate axis."""
    return interventions.stack([
        interventions.directional_ablation(d, n_layers=w.config.n_layers, layers=None)
        for d in np.asarray(directions)])


def selection_rows(w: Workload, prompts: Prompts, directions: np.ndarray, *, warmup: int,
                   repeats: int, chunk: int = 0, section: str = "3 selection") -> list[Row]:
    """Bypass score (mean refusal score under all-layer ablation) of every candidate direction
    on a token batch: the scaling section's stand-in for selection (see the module docstring).

    Ours: one compiled call, `jax.vmap` over the stacked candidates (`lax.map` over chunks of
    `chunk` candidates when `chunk` > 0). Baseline: hooks and one forward pass per candidate.
    """
    config = w.config
    tokens, valid, _ = _arrays(prompts)
    candidates = ablation_candidates(w, directions)
    refusal_ids = jnp.asarray(w.refusal_ids)
    n_candidates = directions.shape[0]
    batch_size = n_candidates if chunk <= 0 else min(chunk, n_candidates)

    def bypass_scores(params, tokens, valid, candidates, refusal_ids):
        def one(candidate):
            last = forward(params, tokens, valid, config=config, intervention=candidate,
                           logits="last").logits
            return jnp.mean(refusal_score(last, refusal_ids))
        return jax.lax.map(one, candidates, batch_size=batch_size)

    args = (w.params, tokens, valid, candidates, refusal_ids)
    compiled, compile_s = compile_timed(jax.jit(bypass_scores), *args)

    model = w.torch_model
    ids, mask = torch_stack.as_torch(prompts.tokens, prompts.valid, w.torch_device)
    directions_t = torch.as_tensor(np.asarray(directions), device=w.torch_device)
    refusal_ids_t = torch.as_tensor(w.refusal_ids, dtype=torch.long, device=w.torch_device)

    def hooked_sweep(directions_t=directions_t):
        scores = []
        for direction in directions_t:
            with torch_stack.ablation_hooks(model, direction):
                last = torch_stack.logits(model, ids, mask, last_only=True)
            scores.append(torch_stack.refusal_score(last, refusal_ids_t).mean())
        return torch.stack(scores)

    pair = time_pair(lambda: compiled(*args), hooked_sweep, warmup=warmup, repeats=repeats,
                     ours_warmup=0, baseline_warmup=lambda: hooked_sweep(directions_t[:1]))
    B, T = prompts.tokens.shape
    return [Row.from_pair(
        section, f"bypass-score sweep: {n_candidates} candidates (all-layer ablation), "
        f"{B} prompts x {T} tokens", pair, baseline_label=TRANSFORMERS_HOOKS + " (1 pass/cand.)",
        work=n_candidates, work_unit="cand", compile_s=compile_s,
        details={"candidates": n_candidates, "batch": B, "length": T,
                 "vmap_chunk": batch_size,
                 "ours_s_per_candidate": pair.ours.seconds.scaled(1 / n_candidates).to_json(),
                 "baseline_s_per_candidate":
                     pair.baseline.seconds.scaled(1 / n_candidates).to_json(),
                 "max_abs_score_diff": _max_abs_diff(pair.ours.result, pair.baseline.result)})]


def generation_rows(w: Workload, prompts: Prompts, direction: np.ndarray, *,
                    max_new_tokens: int, warmup: int, repeats: int,
                    sweep: np.ndarray | None = None,
                    section: str = "4 generation") -> list[Row]:
    """Greedy generation of exactly `max_new_tokens` per row (no stop token on either side),
    without and with all-layer directional ablation; with `sweep` ([V, D] directions), also
    the all-layer ablation of each of them: ours in one `generate_each`, transformers in one
    hooked `generate` per direction."""
    config = w.config
    tokens, valid, _ = _arrays(prompts)
    model = w.torch_model
    ids, mask = torch_stack.as_torch(prompts.tokens, prompts.valid, w.torch_device)
    direction_t = torch.as_tensor(np.array(direction), device=w.torch_device)
    ablation = interventions.directional_ablation(direction, n_layers=config.n_layers,
                                                  layers=None)
    B, T = prompts.tokens.shape
    rows = []
    for label, intervention, hooks in (
            ("no intervention", None, contextlib.nullcontext),
            ("all-layer ablation", ablation,
             functools.partial(torch_stack.ablation_hooks, model, direction_t))):
        # stop_ids=[-1] matches no token, so every row generates max_new_tokens tokens.
        run = jax.jit(lambda p, t, v, iv: generate(
            p, t, v, config=config, max_new_tokens=max_new_tokens, intervention=iv,
            stop_ids=[-1], pad_id=0).tokens)
        compiled, compile_s = compile_timed(run, w.params, tokens, valid, intervention)

        def hooked_generate(hooks=hooks, new_tokens=max_new_tokens):
            with hooks():
                return torch_stack.generate(model, ids, mask, max_new_tokens=new_tokens,
                                            pad_id=0)

        pair = time_pair(lambda: compiled(w.params, tokens, valid, intervention),
                         hooked_generate, warmup=warmup, repeats=repeats, ours_warmup=0,
                         baseline_warmup=functools.partial(hooked_generate, new_tokens=2))
        ours_tokens = np.asarray(pair.ours.result)
        theirs = pair.baseline.result.cpu().numpy()
        rows.append(Row.from_pair(
            section, f"greedy generation, {label}, batch {B}, {max_new_tokens} new tokens", pair,
            baseline_label="transformers generate" + (" + hooks" if intervention else ""),
            work=B * max_new_tokens, work_unit="new tok", compile_s=compile_s,
            details={"batch": B, "prompt_length": T, "new_tokens": max_new_tokens,
                     "same_shape": list(ours_tokens.shape) == list(theirs.shape),
                     **_token_agreement(ours_tokens, theirs)}))
    if sweep is not None:
        rows.append(_sweep_row(w, prompts, sweep, max_new_tokens=max_new_tokens, warmup=warmup,
                               repeats=repeats, section=section))
    return rows


def _sweep_row(w: Workload, prompts: Prompts, directions: np.ndarray, *, max_new_tokens: int,
               warmup: int, repeats: int, section: str) -> Row:
    config, model = w.config, w.torch_model
    tokens, valid, _ = _arrays(prompts)
    ids, mask = torch_stack.as_torch(prompts.tokens, prompts.valid, w.torch_device)
    ablations = [interventions.directional_ablation(d, n_layers=config.n_layers, layers=None)
                 for d in directions]
    run = jax.jit(lambda p, t, v, ivs: generate_each(
        p, t, v, ivs, config=config, max_new_tokens=max_new_tokens, stop_ids=[-1],
        pad_id=0).tokens)
    compiled, compile_s = compile_timed(run, w.params, tokens, valid, ablations)

    def hooked_sweep(new_tokens=max_new_tokens):
        outputs = []
        for direction in directions:
            with torch_stack.ablation_hooks(model, torch.as_tensor(direction,
                                                                   device=w.torch_device)):
                outputs.append(torch_stack.generate(model, ids, mask, max_new_tokens=new_tokens,
                                                    pad_id=0))
        return torch.stack(outputs)

    pair = time_pair(lambda: compiled(w.params, tokens, valid, ablations), hooked_sweep,
                     warmup=warmup, repeats=repeats, ours_warmup=0,
                     baseline_warmup=functools.partial(hooked_sweep, new_tokens=2))
    ours, theirs = np.asarray(pair.ours.result), pair.baseline.result.cpu().numpy()
    V, B = len(directions), prompts.tokens.shape[0]
    return Row.from_pair(
        section, f"greedy generation, {V} all-layer ablations (a sweep), batch {B}, "
        f"{max_new_tokens} new tokens", pair,
        baseline_label=f"transformers generate + hooks, {V} calls", work=V * B * max_new_tokens,
        work_unit="new tok", compile_s=compile_s,
        details={"interventions": V, "batch": B, "prompt_length": prompts.tokens.shape[1],
                 "new_tokens": max_new_tokens, "ours": "one generate_each call",
                 **_token_agreement(ours, theirs), "rows": V * B})


def shared_prefill_row(w: Workload, prompts: Prompts, directions: np.ndarray, layer: int, *,
                       max_new_tokens: int, warmup: int, repeats: int,
                       section: str = "4 generation") -> Row:
    """Ours against ours: `generate_each` of V ablations acting at `layer` only (the study's
    local mode), with the layers below it run once for all V (the default) and with the plain
    prefill (every layer for each variant). Exactly `max_new_tokens` per row."""
    config = w.config
    tokens, valid, _ = _arrays(prompts)
    ablations = [interventions.directional_ablation(d, n_layers=config.n_layers, layers=[layer])
                 for d in directions]
    runs = {share: jax.jit(functools.partial(
        lambda p, t, v, ivs, share: generate_each(
            p, t, v, ivs, config=config, max_new_tokens=max_new_tokens, stop_ids=[-1],
            pad_id=0, share_prefill=share).tokens, share=share)) for share in (True, False)}
    compiled = {share: compile_timed(run, w.params, tokens, valid, ablations)
                for share, run in runs.items()}
    pair = time_pair(lambda: compiled[True][0](w.params, tokens, valid, ablations),
                     lambda: compiled[False][0](w.params, tokens, valid, ablations),
                     warmup=warmup, repeats=repeats)
    V, (B, T) = len(directions), prompts.tokens.shape
    return Row.from_pair(
        section, f"greedy generation, {V} ablations at layer {layer} of {config.n_layers}, "
        f"batch {B}, {max_new_tokens} new tokens: shared prefill", pair,
        baseline_label="ours, plain prefill (every layer per variant)",
        work=V * B * max_new_tokens, work_unit="new tok", compile_s=compiled[True][1],
        details={"interventions": V, "batch": B, "prompt_length": T,
                 "new_tokens": max_new_tokens, "layer": layer,
                 **_token_agreement(np.asarray(pair.ours.result),
                                    np.asarray(pair.baseline.result))})


def _token_agreement(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """How far two stacks' greedy tokens [..., T] agree: the rows identical throughout, and
    the min and median count of new tokens identical before a row's first difference (in
    bfloat16 a near-tie can flip one argmax, after which the rows go their own ways)."""
    if ours.shape != theirs.shape:
        return {"rows_identical": None, "leading_tokens_identical": None}
    same = (ours == theirs).reshape(-1, ours.shape[-1])
    leading = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
    return {"rows_identical": int(np.sum(same.all(axis=1))),
            "leading_tokens_identical": [int(leading.min()), float(np.median(leading))]}
