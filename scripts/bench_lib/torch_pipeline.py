"""A PyTorch twin of the pipeline (`python -m refusal_jax.main`): the same work per stage, done
the way the published refusal pipelines do it, and timed per stage (section 5's baseline).

Inputs are shared with our pipeline, not re-derived: the config is read from the same
ml_collections file and `--config.*` overrides (`config_from_flags`), the model is loaded by
`runtime.loading.load_study_model` (same params, tokenizer, chat template) and copied into a
transformers model (`torch_stack.torch_model`, as `bench_lib.workload` builds a workload's), and
the prompt sets are `study.data.sample_sets` (same seed-42 samples). The computations are
PyTorch / scikit-learn:

extract   per set (harmful/harmless train and val), batches of `runtime.batch_size` prompts in
          set order, each left padded to its longest (the reference tokenizer's padding): one
          hooked forward per batch collecting every layer's block input at the EOI positions
          (`torch_stack.capture_hooks`) and the last-position refusal score
          (`torch_stack.refusal_score`); the refusal-score filter (`data.refusal_filters`); DiM
          and class means (torch means); INLP at every (position, layer) with the per-pair
          scikit-learn loop of `bench_lib.inlp_bench` (our default rules, same stratified split
          and seed; its accepted classifiers are recorded to rebuild the basis the loop built);
          LEACE at every pair (no published PyTorch form in these pipelines: the closed form of
          `directions.leace` in torch, one SVD per pair).
select    DiM: `bench_lib.selection.score_baseline` (Arditi et al.'s hooked loop: per candidate,
          ablation on harmful val -> bypass, ablation on harmless val -> KL, ActAdd per
          multiplier on harmless val -> steering) on the candidates our stage scores (non-zero
          directions at `select.positions`). INLP: the same loop with a nullspace-projection hook
          (`site_hooks`, same math as `NullspaceProjection`) and ActAdd along the first INLP
          direction at the DiM norm. The published loop has no early stop, so every candidate's
          KL and steering are scored (ours, with `select.just_one`, scores them in rank order
          until one survives: the counts are recorded side by side). Ranking and filters:
          `selection.ranking.rank`. With `select.compare_global` the other mode's bypass sweep is
          run too. `run_twin(select_sample=n)` (the benchmark's
          `--pipeline_twin_select_candidates`) scores n of each method's candidates, evenly
          spread, and extrapolates the stage's time to all of them: at the reference size the
          published loop takes over an hour on a 2-core CPU.
infer     per variant of `infer.interventions`, greedy `generate` on harmful / harmless eval in
          batches of `runtime.generation_batch_size` (set order, padded to the longest), up to
          `infer.max_new_tokens`, stopping when every row has emitted a stop token (as ours),
          decoded by `ChatFormat.decode`. Interventions are forward hooks with our math:
          ablation (`torch_stack.ablation_hooks`), ActAdd (`torch_stack.addition_hook`),
          INLP reflection / nullspace projection, the subspace clamp and the LEACE eraser
          (`site_hooks`; no published PyTorch form: affine edits act on the stream at the block
          input and by their linear part on the attention and MLP outputs, as
          `refusal_jax.interventions`); `dim_folded` orthogonalises the writing matrices of a
          copy of the model (Arditi et al.'s `get_orthogonalized_matrix`; tied embeddings are
          untied as `refusal_jax.interventions.folding` does) and checks it against the hooked
          global ablation on one batch (two forwards), as our stage does.
evaluate  per variant: substring refusal rates of its completions (`evaluation.refusal
          .refusal_rate`), a hooked forward of harmful eval and of harmless eval capturing every
          layer at the EOI positions of the components' sources, KL(baseline || variant) on
          harmless eval (`torch_stack.kl_divergence`), cross-entropy on the built-in text (and
          `evaluate.cross_entropy_files`) under the harmful-prompt hooks; the offline judge of
          every completion of both sets (`evaluation.outcomes`): fluency, one forward of the
          unsteered transformers model per batch of `runtime.batch_size` non-refusal rows
          (prompt + reply), and relevance, all-MiniLM-L6-v2 in transformers, each distinct
          text embedded once (`bench_lib.torch_judge`), with our text-only measures
          (degeneration, word counts) and labelling rule; the two baseline forwards first; the
          tunable-k curve (completions, harmless forward and cross-entropy per k below the full
          basis; no judge, as ours).

Not mirrored (recorded in `TwinResult.not_mirrored`): the report stage and the geometry
analysis and plots (small; their inputs, the captures, are computed), the safety judge and
multiple choice (`evaluate.judge_source`, `evaluate.mc_files`), INLP with the reference rules
(`reference.inlp_*`), meshes. Ours runs on a padded, length-sorted batch layout and
resumes candidate forwards from cached layers; those are how it saves work, so the twin's
counts are prompts, batches (forward passes), candidates and generated tokens, each recorded.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np
import torch
from absl import flags as absl_flags
from absl import logging
from ml_collections import config_flags

from bench_lib import inlp_bench, selection, torch_judge, torch_stack
from bench_lib.activations import spread
from refusal_jax.directions import train_dev_split
from refusal_jax.evaluation import cross_entropy as ce
from refusal_jax.evaluation.degeneration import degeneration_measures, words
from refusal_jax.evaluation.k_curve import k_values
from refusal_jax.evaluation.outcomes import label_completions
from refusal_jax.evaluation.refusal import is_refusal, refusal_rate
from refusal_jax.models.loading import Model
from refusal_jax.runtime.loading import load_study_model
from refusal_jax.selection import components
from refusal_jax.selection.ranking import (
    CandidateScores,
    lowest_bypass_fallback,
    n_components,
    rank,
)
from refusal_jax.study.config import check_config
from refusal_jax.study.data import refusal_filters, sample_sets
from refusal_jax.study.stages.infer import FOLDING_TOLERANCE
from refusal_jax.text.chat import pad_token_id, refusal_token_ids

MIRRORED_STAGES = ("extract", "select", "infer", "evaluate")
INLP_LOOP = "scikit-learn loop"  # the inlp_bench baseline with our default rules
CPU = {"attention": "sdpa", "device": "cpu"}  # the dtype is the config's model.dtype


def config_from_flags(command_flags: Sequence[str]) -> ml_collections.ConfigDict:
    """The config `python -m refusal_jax.main <command_flags>` runs with: `--config=FILE` and
    its `--config.key=value` overrides (other main flags, `--workdir` and `--stages`, are read
    and ignored). Raises ValueError without `--config`."""
    if not any(flag.startswith("--config=") for flag in command_flags):
        raise ValueError(f"the pipeline flags {list(command_flags)} name no --config=FILE; the "
                         "PyTorch twin reads the same config file as the pipeline")
    values = absl_flags.FlagValues()
    argv = ["torch_pipeline", *command_flags]
    # `sys_argv`: the overrides to register are those of `argv`, not of this process.
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values,
                                    lock_config=True, sys_argv=argv)
    absl_flags.DEFINE_string("workdir", None, "ignored", flag_values=values)
    absl_flags.DEFINE_list("stages", None, "ignored", flag_values=values)
    values(argv)
    check_config(values.config)
    return values.config


@dataclasses.dataclass
class StageResult:
    seconds: float
    work: dict[str, Any]


@dataclasses.dataclass
class TwinResult:
    """Per stage: wall seconds and work counts; the artefacts tests compare with ours."""

    stages: dict[str, StageResult]
    load_s: float  # our loader + the transformers copy (inside stages["extract"].seconds)
    prompts: dict[str, list[str]]
    directions: dict[str, np.ndarray]
    selection: dict[str, Any]
    completions: dict[str, dict[str, list[str]]]
    metrics: dict[str, dict[str, Any]]
    # variant -> prompt set -> the offline judge's measures [n] per completion and "label"
    judged: dict[str, dict[str, dict[str, Any]]]
    not_mirrored: list[str]


# ----------------------------------------------------------------------------------------------
# Hooks of the interventions with no published PyTorch form.


def _project(x: torch.Tensor, basis: torch.Tensor, alpha: float) -> torch.Tensor:
    """``x - alpha (x V^T) V`` (alpha 1: nullspace projection; 2: reflection)."""
    basis = basis.to(x.dtype)
    return x - alpha * (x @ basis.T) @ basis


def _affine_erase(x: torch.Tensor, read: torch.Tensor, write: torch.Tensor,
                  center: torch.Tensor | None) -> torch.Tensor:
    """``x - ((x - center) A^T) B``; ``center=None`` gives the linear part (write sites)."""
    read, write = read.to(x.dtype), write.to(x.dtype)
    shifted = x if center is None else x - center.to(x.dtype)
    return x - (shifted @ read.T) @ write


@contextlib.contextmanager
def site_hooks(model, edits: Sequence[tuple[int, Callable, Callable]]) -> Iterator[None]:
    """For each (layer, stream_fn, write_fn): `stream_fn` on the block input (forward pre-hook,
    our `resid_pre`), `write_fn` on the attention and MLP outputs (`attn_out`, `mlp_out`)."""
    handles = []
    layers = torch_stack.decoder_layers(model)
    for layer, stream_fn, write_fn in edits:
        def pre_hook(module, args, kwargs, stream_fn=stream_fn):
            hidden = torch_stack._hidden_states(args, kwargs)
            return torch_stack._replace_hidden_states(args, kwargs, stream_fn(hidden))

        def output_hook(module, inputs, output, write_fn=write_fn):
            if isinstance(output, tuple):
                return (write_fn(output[0]), *output[1:])
            return write_fn(output)

        handles.append(layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(layers[layer].self_attn.register_forward_hook(output_hook))
        handles.append(layers[layer].mlp.register_forward_hook(output_hook))
    with torch_stack._removed_on_exit(handles):
        yield


def projection_edits(basis: np.ndarray, layers: Sequence[int], alpha: float = 1.0):
    """Edits of `P_a = x - a (x V^T) V` at the ablation sites of `layers` (linear: the same map
    on the stream and on the writes)."""
    tensor = torch.as_tensor(np.asarray(basis, np.float32))
    edit = functools.partial(_project, basis=tensor, alpha=alpha)
    return [(layer, edit, edit) for layer in layers]


def affine_edits(read: np.ndarray, write: np.ndarray, center: np.ndarray,
                 layers: Sequence[int]):
    """Edits of ``x - ((x - c) A^T) B`` (clamp: A = B = V, c = target; LEACE: its A, B, mean)."""
    read, write, center = (torch.as_tensor(np.asarray(a, np.float32))
                           for a in (read, write, center))
    stream = functools.partial(_affine_erase, read=read, write=write, center=center)
    linear = functools.partial(_affine_erase, read=read, write=write, center=None)
    return [(layer, stream, linear) for layer in layers]


def folded_model(model, direction: np.ndarray):
    """A copy of `model` with the global ablation of `direction` folded into the matrices that
    write to the stream (embedding rows, o_proj, down_proj); tied embeddings are untied, the LM
    head keeping the original embedding (as `refusal_jax.interventions.folding`)."""
    unit = torch.as_tensor(np.asarray(direction, np.float32))
    unit = unit / unit.norm()
    folded = copy.deepcopy(model)
    embed = folded.model.embed_tokens.weight
    lm_head_tied = folded.lm_head.weight is embed
    with torch.no_grad():
        new_embed = embed - (embed @ unit.to(embed.dtype))[:, None] * unit.to(embed.dtype)
        if lm_head_tied:
            folded.lm_head.weight = torch.nn.Parameter(embed.detach().clone())
            folded.config.tie_word_embeddings = False
        folded.model.embed_tokens.weight = torch.nn.Parameter(new_embed)
        for layer in torch_stack.decoder_layers(folded):
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                weight = linear.weight  # [D, in]: rows index the stream
                r = unit.to(weight.dtype)
                weight.sub_(r[:, None] * (r @ weight)[None, :])
    return folded


# ----------------------------------------------------------------------------------------------
# The twin.


class _Twin:
    def __init__(self, config, torch_options: dict[str, str], select_sample: int = 0):
        self.config = config
        self.select_sample = select_sample
        self.select_extrapolated_s = 0.0  # select's time for the candidates not scored
        torch_options = {**torch_options, "dtype": config.model.dtype}  # ours' params dtype
        self.device = torch_options["device"]
        start = time.perf_counter()
        model_config = config.model
        self.model: Model = load_study_model(model_config.source, dtype=model_config.dtype,
                                             system_prompt=model_config.system_prompt or None,
                                             seed=config.seed)
        hf_config = self.model.hf_config or torch_stack.llama_hf_config(self.model.config)
        self.torch = torch_stack.torch_model(hf_config, self.model.config, self.model.params,
                                             **torch_options)
        self.load_s = time.perf_counter() - start
        self.refusal_ids = torch.as_tensor(refusal_token_ids(self.model.tokenizer),
                                           dtype=torch.long, device=self.device)
        self.stop_ids = sorted(self.model.chat.stop_token_ids)
        self.work: dict[str, Any] = {}

    def count(self, key: str, amount: int = 1) -> None:
        self.work[key] = self.work.get(key, 0) + amount

    def batches(self, texts: Sequence[str], batch_size: int):
        """(Batch, input_ids, attention_mask) of `texts` in order, each padded to its longest."""
        for start in range(0, len(texts), batch_size):
            batch = self.model.chat.encode(list(texts[start:start + batch_size]),
                                           context_length=self.model.config.max_context,
                                           length_bucket=1)
            yield batch, *torch_stack.as_torch(batch.tokens, batch.valid, self.device)

    def capture(self, texts: Sequence[str], eoi_indices: Sequence[int] | None = None,
                model=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block inputs [n, P, L, D] at the EOI positions (`eoi_indices` of them; all by default)
        and last-position logits [n, V], one hooked forward per batch."""
        model = self.torch if model is None else model
        captures, logits = [], []
        for batch, ids, mask in self.batches(texts, self.config.runtime.batch_size):
            positions = self.model.chat.eoi_positions(batch)
            if eoi_indices is not None:
                positions = positions[:, list(eoi_indices)]
            index = torch.as_tensor(positions, dtype=torch.long, device=self.device)
            with torch_stack.capture_hooks(model, index) as captured:
                logits.append(torch_stack.logits(model, ids, mask, last_only=True))
            captures.append(torch.stack(captured, dim=2).float())
            self.count("forward_passes")
            self.count("prompt_rows", len(ids))
        return torch.cat(captures), torch.cat(logits)

    # -- extract ---------------------------------------------------------------------------

    def extract(self) -> None:
        config = self.config
        self.prompts = sample_sets(config.data, config.seed).sets
        acts, scores = {}, {}
        for name in ("harmful_train", "harmless_train", "harmful_val", "harmless_val"):
            acts[name], logits = self.capture(self.prompts[name])
            scores[name] = torch_stack.refusal_score(logits, self.refusal_ids).cpu().numpy()
        for name, keep in refusal_filters(scores, config.data).items():
            self.prompts[name] = [t for t, kept in zip(self.prompts[name], keep) if kept]
            acts[name] = acts[name][torch.as_tensor(keep, device=acts[name].device)]
        harmful, harmless = acts["harmful_train"], acts["harmless_train"]
        self.work["kept"] = {name: len(self.prompts[name]) for name in acts}
        self.directions = {"dim": (harmful.mean(0) - harmless.mean(0)).cpu().numpy(),
                           "harmful_mean": harmful.mean(0).cpu().numpy(),
                           "harmless_mean": harmless.mean(0).cpu().numpy()}
        self.directions.update(self.inlp(harmful.cpu().numpy(), harmless.cpu().numpy()))
        self.directions.update(leace(harmful, harmless))

    def inlp(self, harmful: np.ndarray, harmless: np.ndarray) -> dict[str, np.ndarray]:
        """The scikit-learn per-pair loop at every (position, layer), with the basis it built."""
        settings = self.config.directions
        reference = self.config.reference
        if reference.inlp_split or reference.inlp_absolute_stop or reference.inlp_keep_failing:
            raise ValueError("the PyTorch twin mirrors INLP with the default rules only; run "
                             "with reference.inlp_split, inlp_absolute_stop and "
                             "inlp_keep_failing False")
        pair_fit, _ = inlp_bench.BASELINES[INLP_LOOP]
        examples = np.concatenate([harmful, harmless])
        labels = np.concatenate([np.ones(len(harmful), np.int32),
                                 np.zeros(len(harmless), np.int32)])
        split = train_dev_split(labels, stratified=True, seed=self.config.seed)
        train_y, dev_y = labels[split.train_index], labels[split.dev_index]
        n_positions, n_layers, width = examples.shape[1:]
        most = settings.inlp_max_directions
        out = {"inlp_basis": np.zeros((n_positions, n_layers, most, width), np.float32),
               "inlp_n_directions": np.zeros((n_positions, n_layers), np.int32),
               "inlp_dev_accuracies": np.full((n_positions, n_layers, most), np.nan, np.float32),
               "inlp_majority_rate": np.full((n_positions, n_layers),
                                             max(dev_y.mean(), 1 - dev_y.mean()), np.float32),
               "inlp_first_direction": np.zeros((n_positions, n_layers, width), np.float32),
               "inlp_converged": np.ones((n_positions, n_layers, most), bool),
               "inlp_solver_steps": np.zeros((n_positions, n_layers, most), np.int32)}
        for p in range(n_positions):
            for l in range(n_layers):
                x = examples[:, p, l]
                fit = pair_fit(x[split.train_index], train_y, x[split.dev_index], dev_y,
                               max_directions=most,
                               inverse_regularization=settings.inlp_inverse_regularization)
                self.count("inlp_classifiers", fit.n_classifiers)
                out["inlp_basis"][p, l, :fit.n_directions] = fit.basis
                out["inlp_n_directions"][p, l] = fit.n_directions
                out["inlp_dev_accuracies"][p, l, :fit.n_classifiers] = fit.dev_accuracies
                norm = np.linalg.norm(fit.first_weight)  # 0 where nothing is separable
                out["inlp_first_direction"][p, l] = fit.first_weight / (norm if norm > 0 else 1)
        self.count("inlp_pairs", n_positions * n_layers)
        return out

    # -- select ----------------------------------------------------------------------------

    def select(self) -> None:
        config, model = self.config, self.model
        select_config, runtime = config.select, config.runtime
        harmful, harmless = self.prompts["harmful_val"], self.prompts["harmless_val"]
        dim = self.directions["dim"]
        unit, norms, degenerate = components.dim_candidates(dim)
        n_positions = dim.shape[0]
        if select_config.positions:
            scored = np.zeros(n_positions, bool)
            scored[[n_positions + p for p in select_config.positions]] = True
            degenerate = degenerate | ~scored[:, None]
        basis, keep = components.inlp_basis(self.directions, config.directions)
        self.inlp_k = keep
        first_accuracy = self.directions["inlp_dev_accuracies"][..., 0]
        modes = [select_config.mode]
        if select_config.compare_global:
            modes = ["local", "global"]
        problem = dataclasses.replace(
            selection.selection_problem(model, dim, harmful, harmless, candidates=0,
                                        mode=select_config.mode,
                                        chunk=runtime.candidate_chunk,
                                        batch_size=runtime.batch_size),
            multipliers=tuple(select_config.multipliers), select_config=select_config)
        inlp_layers = list(range(model.config.n_layers))
        candidates = {
            "dim": {"degenerate": degenerate, "actadd": unit, "accuracy": None,
                    "ablation": lambda p, l, layers: torch_stack.ablation_hooks(
                        self.torch, torch.as_tensor(unit[p, l]), layers=layers)},
            "inlp": {"degenerate": degenerate | (keep == 0),
                     "actadd": self.directions["inlp_first_direction"],
                     "accuracy": first_accuracy,
                     "ablation": lambda p, l, layers: site_hooks(self.torch, projection_edits(
                         basis[p, l], inlp_layers if layers is None else layers))},
        }
        self.selection = {"mode": select_config.mode}
        for name, method in candidates.items():
            eligible = [tuple(int(i) for i in pair)
                        for pair in np.argwhere(~method["degenerate"])]
            pairs = [eligible[i] for i in spread(len(eligible), self.select_sample)]
            self.count(f"{name}_candidates", len(eligible))
            self.count(f"{name}_candidates_scored", len(pairs))
            by_mode = {}
            for mode in modes:
                filters = mode == select_config.mode
                shaped = dataclasses.replace(problem, global_ablation=mode == "global")
                start = time.perf_counter()
                if name == "dim" and filters:  # the published loop, as section 3 runs it
                    scored = selection.score_baseline(shaped, self.torch, pairs, self.device)
                    self._count_selection_passes(shaped, len(pairs), filters=True)
                else:
                    scored = self.score_pairs(shaped, pairs, method["ablation"],
                                              method["actadd"], norms, filters=filters)
                if len(pairs) < len(eligible):
                    per_candidate = (time.perf_counter() - start - scored.setup_s) / len(pairs)
                    self.select_extrapolated_s += per_candidate * (len(eligible) - len(pairs))
                by_mode[mode] = _candidate_scores(scored, pairs, dim.shape[:2],
                                                  len(select_config.multipliers), filters)
            scores = by_mode[select_config.mode]
            ranking, discarded = rank(scores, select_config=select_config,
                                             accuracy=method["accuracy"])
            fallback = None
            if not ranking:
                # The later stages need a component to do their work, whatever
                # select.when_none_pass says: the twin's INLP directions come from
                # scikit-learn's solver, not ours, so its filter results can differ from ours.
                ranking, fallback = lowest_bypass_fallback(
                    scores, discarded, select_config=select_config)
            chosen = ranking[:n_components(len(ranking), select_config)]
            self.selection[name] = {"components": [components.describe_component(
                p, l, n_positions, scores, keep if name == "inlp" else None, method["accuracy"])
                for p, l in chosen], "filters_scored": int(scores.filtered.sum()),
                "fallback": fallback}

    def _count_selection_passes(self, problem, n_pairs: int, *, filters: bool) -> None:
        batch = problem.batch_size
        harmful = -(-len(problem.harmful) // batch)
        harmless = -(-len(problem.harmless) // batch)
        per_pair = harmful + (harmless * (1 + len(problem.multipliers)) if filters else 0)
        self.count("forward_passes", (harmless if filters else 0) + per_pair * n_pairs)

    @torch.no_grad()
    def score_pairs(self, problem, pairs, ablation, actadd_direction, norms, *, filters: bool
                    ) -> selection.BaselineResult:
        """`selection.score_baseline`'s loop with any ablation hook (`ablation(p, l, layers)`,
        layers None: every layer); bypass only without `filters`."""
        self._count_selection_passes(problem, len(pairs), filters=filters)
        start = time.perf_counter()
        harmful = selection._torch_batches(problem.model, problem.harmful, problem.batch_size,
                                           self.device)
        harmless = selection._torch_batches(problem.model, problem.harmless,
                                            problem.batch_size, self.device)
        base = ([torch.log_softmax(logits.double(), dim=-1)
                 for logits in selection._last_logits(self.torch, harmless)] if filters else [])
        setup_s = time.perf_counter() - start

        def mean_refusal(batches) -> float:
            return float(torch.cat([torch_stack.refusal_score(logits, self.refusal_ids)
                                    for logits in selection._last_logits(self.torch, batches)]
                                   ).mean())

        bypass, steering, kl = [], [], []
        for p, l in pairs:
            with ablation(p, l, None if problem.global_ablation else [l]):
                bypass.append(mean_refusal(harmful))
                if filters:
                    kl.append(float(torch.cat([
                        torch_stack.kl_divergence(b, logits) for b, logits in
                        zip(base, selection._last_logits(self.torch, harmless))]).mean()))
            if filters:
                direction = torch.as_tensor(actadd_direction[p, l], device=self.device)
                per_multiplier = []
                for multiplier in problem.multipliers:
                    coeff = float(np.float32(multiplier) * norms[p, l])
                    with torch_stack.addition_hook(self.torch, direction * coeff, l):
                        per_multiplier.append(mean_refusal(harmless))
                steering.append(per_multiplier)
        steering = np.asarray(steering).reshape(len(steering), len(problem.multipliers))
        return selection.BaselineResult(np.asarray(bypass), steering, np.asarray(kl), setup_s)

    # -- infer -----------------------------------------------------------------------------

    def variant(self, name: str, inlp_k: int | None = None):
        """(hooks on harmful prompts, hooks on harmless prompts, model) of a variant; hooks are
        context-manager factories."""
        config, directions, n_layers = self.config, self.directions, self.model.config.n_layers
        dim_parts = self.selection["dim"]["components"]
        inlp_parts = self.selection["inlp"]["components"]
        basis, _ = components.inlp_basis(directions, config.directions)
        if inlp_k is not None:
            basis = np.where((np.arange(basis.shape[-2]) < inlp_k)[:, None], basis, 0.0)
        dim = directions["dim"]
        best = dim_parts[0]
        best_norm = float(np.linalg.norm(dim[best["position_index"], best["layer"]]))
        global_mode = config.select.mode == "global"

        def pl(c):
            return c["position_index"], c["layer"]

        def layers_of(c):
            return None if global_mode else [c["layer"]]

        def every(c):
            return list(range(n_layers)) if global_mode else [c["layer"]]

        def stacked(factories):
            @contextlib.contextmanager
            def hooks():
                with contextlib.ExitStack() as stack:
                    for factory in factories:
                        stack.enter_context(factory())
                    yield
            return hooks

        def ablation():
            return stacked([functools.partial(
                torch_stack.ablation_hooks, self.torch, torch.as_tensor(dim[pl(c)]),
                layers=layers_of(c)) for c in dim_parts])

        def actadd(parts, direction_of, coeff_of, sign):
            return stacked([functools.partial(
                torch_stack.addition_hook, self.torch,
                torch.as_tensor(np.asarray(direction_of(c), np.float32) * np.float32(
                    sign * coeff_of(c))), c["layer"]) for c in parts])

        def edits(make):
            return stacked([functools.partial(site_hooks, self.torch, make(c))
                            for c in inlp_parts])

        def unit(vector):
            return vector / np.linalg.norm(vector)

        def same(hooks):
            return hooks, hooks, self.torch

        none = stacked([])
        builders = {
            "baseline": lambda: same(none),
            "dim_ablation": lambda: same(ablation()),
            "dim_folded": lambda: (none, none, self.folded(dim[pl(best)])),
            "dim_actadd": lambda: tuple(actadd(
                dim_parts, lambda c: unit(dim[pl(c)]), lambda c: np.linalg.norm(dim[pl(c)]),
                sign) for sign in (-1.0, 1.0)) + (self.torch,),
            "inlp_nullspace": lambda: same(edits(
                lambda c: projection_edits(basis[pl(c)], every(c), 1.0))),
            "inlp_reflection_a1": lambda: same(edits(
                lambda c: projection_edits(basis[pl(c)], every(c), 1.0))),
            "inlp_reflection": lambda: same(edits(
                lambda c: projection_edits(basis[pl(c)], every(c), 2.0))),
            "inlp_clamp": lambda: same(edits(lambda c: affine_edits(
                basis[pl(c)], basis[pl(c)], directions["harmless_mean"][pl(c)], every(c)))),
            "inlp_actadd": lambda: tuple(actadd(
                inlp_parts, lambda c: directions["inlp_first_direction"][pl(c)],
                lambda c: best_norm, sign) for sign in (-1.0, 1.0)) + (self.torch,),
            "leace": lambda: same(stacked([functools.partial(site_hooks, self.torch, affine_edits(
                directions["leace_read"][pl(c)], directions["leace_write"][pl(c)],
                directions["leace_mean"][pl(c)], every(c))) for c in dim_parts])),
        }
        return builders[name]()

    def folded(self, direction: np.ndarray):
        """The folded copy, checked against the hooked global ablation on one batch (as our
        infer stage does; two forwards)."""
        if getattr(self, "_folded", None) is None:
            self._folded = folded_model(self.torch, direction)
            texts = self.prompts["harmless_eval"][:self.config.runtime.batch_size]
            _, ids, mask = next(self.batches(texts, len(texts)))
            with torch_stack.ablation_hooks(self.torch, torch.as_tensor(direction)):
                hooked = torch_stack.logits(self.torch, ids, mask, last_only=True)
            plain = torch_stack.logits(self._folded, ids, mask, last_only=True)
            self.count("forward_passes", 2)
            self.folding_difference = float((hooked - plain).abs().max())
            if not self.folding_difference <= FOLDING_TOLERANCE:
                raise RuntimeError(f"the folded transformers model disagrees with the hooked "
                                   f"global ablation by {self.folding_difference:.3g} logits "
                                   f"(tolerance {FOLDING_TOLERANCE}): a bug in the twin")
        return self._folded

    def complete(self, texts: Sequence[str], hooks, model) -> list[str]:
        pad = pad_token_id(self.model.tokenizer)
        completions = []
        for _, ids, mask in self.batches(texts, self.config.runtime.generation_batch_size):
            with hooks():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                     max_new_tokens=self.config.infer.max_new_tokens,
                                     eos_token_id=self.stop_ids, pad_token_id=pad)
            new = out[:, ids.shape[1]:].cpu().numpy()
            self.count("generate_calls")
            self.count("decode_steps", new.shape[1])
            self.count("generated_tokens", int(_tokens_before_stop(new, self.stop_ids).sum()))
            completions += self.model.chat.decode(new)
        return completions

    def complete_variant(self, name: str, inlp_k: int | None = None) -> dict[str, list[str]]:
        harmful_hooks, harmless_hooks, model = self.variant(name, inlp_k)
        return {cls: self.complete(self.prompts[f"{cls}_eval"], hooks, model)
                for cls, hooks in (("harmful", harmful_hooks), ("harmless", harmless_hooks))}

    def infer(self) -> None:
        self.completions = {}
        for name in self.config.infer.interventions:
            self.completions[name] = self.complete_variant(name)
            self.count("completions", sum(map(len, self.completions[name].values())))

    # -- evaluate --------------------------------------------------------------------------

    def cross_entropy(self, corpus: ce.ScoredTokens, hooks, model) -> float:
        """Mean token cross-entropy (nats) of `corpus` under `hooks`: float32 per token (as
        transformers' loss), summed in float64."""
        batch_size = min(self.config.runtime.batch_size, len(corpus.tokens))
        total = 0.0
        for start in range(0, len(corpus.tokens), batch_size):
            rows = slice(start, start + batch_size)
            ids, mask = torch_stack.as_torch(corpus.tokens[rows], corpus.valid[rows], self.device)
            with hooks():
                logits = torch_stack.logits(model, ids, mask)[:, :-1].float()
            targets = torch.as_tensor(corpus.targets[rows][:, 1:], device=self.device)
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:],
                                                    reduction="none")
            total += float(nll[targets].double().sum())
            self.count("forward_passes")
        return total / corpus.n_targets

    def judge(self, completions: dict[str, list[str]]) -> dict[str, Any]:
        """The offline judge of each prompt set's completions (`evaluation.outcomes`): the
        measures of `outcomes.MEASURES` per completion, fluency from the unsteered transformers
        model (refusals not scored: NaN) and relevance from `self.embeddings`, and the labels."""
        runtime = self.config.runtime
        judged = {}
        for cls, replies in completions.items():
            requests = self.prompts[f"{cls}_eval"]
            refusal = np.asarray([is_refusal(reply) for reply in replies], bool)
            nll, forwards = torch_judge.reply_nll(
                self.torch, self.model.chat, requests,
                [None if refused else reply for reply, refused in zip(replies, refusal)],
                batch_size=runtime.batch_size, max_context=self.model.config.max_context,
                device=self.device)
            self.count("forward_passes", forwards)
            self.count("fluency_rows", int(np.isfinite(nll).sum()))
            measures = {"refusal": refusal,
                        "relevance": self.embeddings.relevance(requests, replies),
                        "reply_nll": nll, **degeneration_measures(replies),
                        "n_words": np.asarray([len(words(reply)) for reply in replies])}
            judged[cls] = {**measures, "label": label_completions(measures)}
        return judged

    def variant_metrics(self, name: str, completions, base_logits, sources, corpora, *,
                        geometry: bool = True, judge: bool = True,
                        inlp_k: int | None = None) -> dict[str, Any]:
        """Our evaluate stage's metrics of a variant; the judge's (and `self.judged[name]`)
        only with `judge`, as ours leaves them out of the k-curve's points."""
        harmful_hooks, harmless_hooks, model = self.variant(name, inlp_k)
        if geometry:
            with harmful_hooks():
                self.capture(self.prompts["harmful_eval"], sources, model)
        with harmless_hooks():
            _, logits = self.capture(self.prompts["harmless_eval"], sources, model)
        base = torch.log_softmax(base_logits.double(), dim=-1)
        metrics = {
            "harmful_refusal_rate": refusal_rate(completions["harmful"]),
            "harmless_refusal_rate": refusal_rate(completions["harmless"]),
            "kl": float(torch_stack.kl_divergence(base, logits).mean()),
            "cross_entropy": {corpus_name: self.cross_entropy(corpus, harmful_hooks, model)
                              for corpus_name, corpus in corpora.items()},
        }
        if judge:
            self.judged[name] = self.judge(completions)
            metrics.update(_judge_metrics(self.judged[name]))
        return metrics

    def evaluate(self) -> None:
        config, settings = self.config, self.config.evaluate
        corpora = {"builtin": ce.builtin_corpus(self.model.tokenizer)}
        for path in settings.cross_entropy_files:
            corpus = ce.load_corpus(path, chat=self.model.chat)
            corpora[corpus.name] = corpus
        corpora = {name: ce.truncate_corpus(corpus, settings.cross_entropy_max_tokens)
                   for name, corpus in corpora.items()}
        sources = [self.selection[m]["components"][0]["position_index"] for m in ("dim", "inlp")]
        # The judge's sentence embeddings of every request and completion, each text once.
        self.embeddings = torch_judge.SentenceEmbeddings(device=self.device)
        self.embeddings([*self.prompts["harmful_eval"], *self.prompts["harmless_eval"],
                         *(text for name in config.infer.interventions
                           for texts in self.completions[name].values() for text in texts)])
        self.judged = {}
        self.capture(self.prompts["harmful_eval"], sources)
        _, base_logits = self.capture(self.prompts["harmless_eval"], sources)
        self.metrics = {name: self.variant_metrics(name, self.completions[name], base_logits,
                                                   sources, corpora)
                        for name in config.infer.interventions}
        curve = settings.k_curve_intervention
        self.work["k_curve_points"] = 0
        if curve:
            n_directions = max(c["k"] for c in self.selection["inlp"]["components"])
            for k in k_values(n_directions):
                if k == n_directions and curve in self.metrics:
                    continue
                completions = self.complete_variant(curve, inlp_k=k)
                self.metrics[f"{curve}_k{k}"] = self.variant_metrics(
                    curve, completions, base_logits, sources, corpora, geometry=False,
                    judge=False, inlp_k=k)
                self.count("k_curve_points")
        self.work["encoded_texts"] = len(self.embeddings.cache)
        self.work["encoder_batches"] = self.embeddings.batches


def leace(harmful: torch.Tensor, harmless: torch.Tensor) -> dict[str, np.ndarray]:
    """LEACE erasers of every (position, layer) from [n, P, L, D] captures (the closed form of
    `refusal_jax.directions.leace`, in torch)."""
    x = torch.cat([harmful, harmless]).float()
    n, n_positions, n_layers, width = x.shape
    labels = torch.cat([torch.ones(len(harmful)), torch.zeros(len(harmless))]).to(x.device)
    features = x.permute(1, 2, 0, 3).reshape(n_positions * n_layers, n, width)
    mean = features.mean(1)
    centered = features - mean[:, None]
    z = labels - labels.mean()
    left, singular, right_t = torch.linalg.svd(centered, full_matrices=False)
    rcond = max(n, width) * torch.finfo(torch.float32).eps
    keep = singular > rcond * singular[:, :1]
    coordinates = torch.where(keep, torch.einsum("pnk,n->pk", left, z), 0.0)
    inverse = torch.where(keep, 1.0 / torch.where(keep, singular, 1.0), 0.0)
    cross = torch.einsum("pnd,n->pd", centered, z) / n
    whitened = torch.einsum("pkd,pk->pd", right_t, inverse * coordinates)
    q = (coordinates ** 2).sum(-1) / n
    erasable = q > torch.finfo(torch.float32).eps * (z ** 2).mean()
    norm = torch.sqrt(torch.where(erasable, q, 1.0))[:, None]
    read = torch.where(erasable[:, None], whitened / norm, 0.0)
    write = torch.where(erasable[:, None], cross / norm, 0.0)

    def grid(tensor):
        return tensor.reshape(n_positions, n_layers, *tensor.shape[1:]).cpu().numpy()

    return {"leace_mean": grid(mean), "leace_read": grid(read[:, None]),
            "leace_write": grid(write[:, None])}


def _candidate_scores(scored: selection.BaselineResult, pairs, shape, n_multipliers: int,
                      filters: bool) -> CandidateScores:
    scores = CandidateScores(bypass=np.full(shape, np.nan),
                                    steering=np.full(shape + (n_multipliers,), np.nan),
                                    kl=np.full(shape, np.nan), filtered=np.zeros(shape, bool))
    for index, (p, l) in enumerate(pairs):
        scores.bypass[p, l] = scored.bypass[index]
        if filters:
            scores.kl[p, l], scores.steering[p, l] = scored.kl[index], scored.steering[index]
            scores.filtered[p, l] = True
    return scores


def _judge_metrics(judged: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per prompt set, the judge's metrics under our names (`study.metrics`): the on-topic and
    degenerate rates, and the mean relevance and reply NLL of the completions that are not
    refusals (left out when every one is; an empty reply's NaN NLL is not counted)."""
    metrics = {}
    for cls, measures in judged.items():
        labels = np.asarray(measures["label"])
        metrics[f"{cls}_on_topic_compliance_rate"] = float(np.mean(labels == "on_topic"))
        metrics[f"{cls}_degenerate_rate"] = float(np.mean(labels == "degenerate"))
        for measure in ("relevance", "reply_nll"):
            values = measures[measure][~measures["refusal"]]
            values = values[np.isfinite(values)]
            if len(values):
                metrics[f"{cls}_mean_{measure}"] = float(values.mean())
    return metrics


def _tokens_before_stop(tokens: np.ndarray, stop_ids: Sequence[int]) -> np.ndarray:
    """Tokens per row up to and including its first stop token (all of them without one)."""
    stopped = np.isin(tokens, stop_ids)
    first = np.where(stopped.any(1), stopped.argmax(1) + 1, tokens.shape[1])
    return first


def _not_mirrored(config) -> list[str]:
    missing = ["report stage", "geometry analysis and plots (their captures are computed)"]
    if config.evaluate.judge_source:
        missing.append("safety judge (evaluate.judge_source)")
    if config.evaluate.mc_files:
        missing.append("multiple choice (evaluate.mc_files)")
    if config.runtime.mesh:
        missing.append("device mesh (runtime.mesh): the twin runs on one device")
    return missing


@torch.no_grad()
def run_twin(config, *, torch_options: dict[str, str] | None = None,
             stages: Sequence[str] = MIRRORED_STAGES, select_sample: int = 0) -> TwinResult:
    """Runs the twin's `stages` (a prefix of MIRRORED_STAGES: each needs the ones before) and
    times each; loading the model counts in the first, as it does in ours. `torch_options`:
    `attention` and `device` of the transformers model (default CPU, sdpa).

    `select_sample` > 0 scores only that many of each method's eligible candidates (evenly
    spread over them) in select, and the stage's seconds add, per method and mode, the mean time
    of a scored candidate times the candidates not scored (the published loop does the same work
    for each); the work counts record both, and the ranking and the components chosen come
    from the scored candidates."""
    if tuple(stages) != MIRRORED_STAGES[:len(stages)] or not stages:
        raise ValueError(f"stages must be a non-empty prefix of {MIRRORED_STAGES} (each stage "
                         f"uses the artefacts of the ones before), got {list(stages)}")
    start = time.perf_counter()
    twin = _Twin(config, torch_options or CPU, select_sample)
    results: dict[str, StageResult] = {}
    for stage in stages:
        twin.work = {}
        getattr(twin, stage)()
        seconds = time.perf_counter() - start
        if stage == "select" and select_sample:
            twin.work["seconds_measured"] = round(seconds, 3)
            twin.work["seconds_extrapolated"] = round(twin.select_extrapolated_s, 3)
            seconds += twin.select_extrapolated_s
        results[stage] = StageResult(seconds=seconds, work=twin.work)
        # Logged as it ends, so that a twin stopped part way still leaves its times.
        logging.info("PyTorch twin: stage %s took %.1f s (%s)", stage, seconds, twin.work)
        start = time.perf_counter()
    if "infer" in stages and "dim_folded" in config.infer.interventions:
        results["infer"].work["folding_max_abs_logit_difference"] = twin.folding_difference
    return TwinResult(
        stages=results, load_s=twin.load_s, prompts=twin.prompts, directions=twin.directions,
        selection=getattr(twin, "selection", {}), completions=getattr(twin, "completions", {}),
        metrics=getattr(twin, "metrics", {}), judged=getattr(twin, "judged", {}),
        not_mirrored=_not_mirrored(config))
