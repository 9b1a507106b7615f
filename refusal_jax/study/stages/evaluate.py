"""The evaluate stage: metrics of every variant, geometry and the tunable-k curve, written to
``metrics.json`` (the report stage turns it into ``results.json`` and ``report.md``).

Per variant (its intervention on each prompt set; ActAdd subtracts on harmful prompts and adds
on harmless ones), the metrics registered in ``refusal_jax.study.metrics`` and the geometry:
- refusal rates of the completions written by the infer stage (substring matching);
- KL(baseline || intervened) of the last-position distribution on harmless eval prompts;
- cross-entropy on the built-in text sample and on ``evaluate.cross_entropy_files``, under the
  variant's harmful-prompt intervention (for ActAdd, the refusal-suppressing subtraction, as
  in Arditi et al.'s table);
- the centroid-axis position of the intervened harmful (and harmless) eval activations at the
  source (EOI position, layer) of the component the variant acts at (the first DiM component;
  the first INLP component for the INLP variants): 0 = harmful centroid, 1 = harmless centroid
  of the baseline activations of the same prompts there. The geometry plots show each source
  with its variants (and the baseline); when both methods chose the same (position, layer),
  one set of plots shows all;
- what the completions say (``evaluation.outcomes``): each completion of both sets labelled
  refusal, on-topic compliance or off-topic-or-degenerate, from the substring metric, its
  relevance to the request (all-MiniLM-L6-v2, loaded once per stage), its repetition and its
  mean token NLL under the unsteered model (every variant's at once: each prompt runs once
  for all); counts and rates of the labels per set, written
  with every completion's label and measures to ``judged/<variant>.json``;
- the safety judge's unsafe rate on the harmful completions (``evaluate.judge_source``) and
  multiple-choice accuracy (``evaluate.mc_files``, under the harmful-prompt intervention), when
  configured.

A variant that runs the same intervention as an earlier one (``study.variants.first_equal``, e.g.
``inlp_reflection_a1`` and ``inlp_nullspace``) takes that one's metrics and labels, with its own
description.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from refusal_jax.evaluation import cross_entropy as ce
from refusal_jax.evaluation import multiple_choice as mc
from refusal_jax.evaluation.geometry import analyse_geometry
from refusal_jax.evaluation.judge import SafetyJudge
from refusal_jax.evaluation.k_curve import KCurve, KCurvePoint, k_values, plot_k_curve
from refusal_jax.evaluation.outcomes import fluency_of_answers
from refusal_jax.evaluation.relevance import TextEmbeddings
from refusal_jax.models.batching import (
    forward_after_prefix,
    forward_shared_prefix,
    shared_prefix_batches,
)
from refusal_jax.models.io.sentence_encoder import load_sentence_encoder
from refusal_jax.runtime import distributed
from refusal_jax.runtime.loading import load_study_model
from refusal_jax.runtime.progress import progress
from refusal_jax.selection.components import inlp_basis
from refusal_jax.study import artifacts
from refusal_jax.study.completions import complete_variants
from refusal_jax.study.data import CLASSES
from refusal_jax.study.metrics import VariantRun, variant_metrics
from refusal_jax.study.variants import Variant, build_variants, first_equal


@functools.partial(jax.jit, static_argnames=("config",))
def _logits_and_captures(params, prefix, tokens, valid, capture_positions, intervention, *,
                         config):
    """Last-position logits [B, V] and captures [B, P, L, D] of prompts that all start with the
    tokens ``prefix`` [N] followed by their own left-padded ``tokens`` [B, T]
    (``models.batching.forward_after_prefix``)."""
    _, out = forward_after_prefix(params, prefix, tokens, valid, config=config,
                                  intervention=intervention, capture_positions=capture_positions)
    return out.logits, out.captures


@functools.partial(jax.jit, static_argnames=("config",))
def _unsteered_below(params, prefix, tokens, valid, capture_positions, split, *, config):
    """The unsteered streams of prompts ``prefix`` [N] (N > 0) + ``tokens`` [B, T] at the block
    input of layer ``split``: the prefix's [N, D] and the rows' [B, T, D], and the rows'
    captures [B, P, L, D] of the layers below it (zero from it up)."""
    prefix_out, out = forward_after_prefix(params, prefix, tokens, valid, config=config,
                                           capture_positions=capture_positions, logits="none",
                                           stop_layer=split)
    return prefix_out.hidden[0], out.hidden, out.captures


@functools.partial(jax.jit, static_argnames=("config",))
def _logits_and_captures_from(params, prefix_stream, rows_stream, valid, capture_positions,
                              intervention, split, captures_below, *, config):
    """`_logits_and_captures` of prompts whose unsteered streams at layer ``split`` are given
    (`_unsteered_below`): the layers from ``split`` up, under ``intervention``."""
    out = forward_shared_prefix(params, prefix_stream, rows_stream, valid, config=config,
                                intervention=intervention, capture_positions=capture_positions,
                                logits="last", start_layer=split)
    return out.logits, captures_below + out.captures


def _first_layer(variant: Variant, intervention) -> int:
    """The lowest layer ``intervention`` acts at (the number of layers for one active at no
    layer), or 0 where the layers below it cannot be shared: a variant with its own weights or
    config, or an intervention that cannot tell (None included)."""
    if variant.params is not None or variant.config is not None or intervention is None:
        return 0
    first = getattr(intervention, "first_active_layer", None)
    return 0 if first is None else int(first())


def _forward_set(study, variant: Variant, intervention, instructions,
                 sources: list[tuple[int, int]], below: dict | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Last-position logits [n, V] and the activations [S, n, D] at each source (EOI position
    index, layer) of ``sources``, of a variant on a set; on a mesh, each batch's rows are split
    over ``batch``. ``below``: where the unsteered streams of this set are kept by (layer,
    batch, sources), so the layers below the first one a variant acts at run once for all variants
    that start there (their results equal the full forward's up to float rounding)."""
    model, runtime = study.model, study.config.runtime
    params = model.params if variant.params is None else variant.params
    config = model.config if variant.config is None else variant.config
    logits = np.zeros((len(instructions), model.config.vocab_size), np.float32)
    points = np.zeros((len(sources), len(instructions), model.config.d_model), np.float32)
    n_eoi = model.chat.n_eoi
    n_prefix, batches = shared_prefix_batches(model, instructions, batch_size=runtime.batch_size,
                                              length_bucket=runtime.length_bucket,
                                              keep_last=n_eoi)
    split = min(_first_layer(variant, intervention), config.n_layers) if below is not None else 0
    for batch, (rows, tokens, valid) in enumerate(batches):
        length = tokens.shape[1] - n_prefix
        positions = np.asarray([[length - n_eoi + p_index for p_index, _ in sources]] *
                               len(tokens), np.int32)
        placed, _ = study.placement.leading(
            (tokens[:, n_prefix:], valid[:, n_prefix:], positions), "batch")
        prefix = jnp.asarray(tokens[0, :n_prefix])
        if split and n_prefix:
            key = (split, batch, tuple(sources))
            if key not in below:
                below[key] = _unsteered_below(params, prefix, placed[0], placed[1], placed[2],
                                              jnp.asarray(split), config=config)
            prefix_stream, rows_stream, captures_below = below[key]
            out = _logits_and_captures_from(params, prefix_stream, rows_stream, placed[1],
                                            placed[2], intervention, jnp.asarray(split),
                                            captures_below, config=config)
        else:
            out = _logits_and_captures(params, prefix, *placed, intervention, config=config)
        batch_logits, captures = distributed.gather(out)
        logits[rows] = batch_logits[:len(rows)]
        captures = captures[:len(rows)]  # [rows, S, L, D]
        for index, (_, layer) in enumerate(sources):
            points[index, rows] = captures[:, index, layer]
    return logits, points


def _corpora(study) -> dict[str, ce.ScoredTokens]:
    """The cross-entropy corpora, their rows cut to fit the model's context."""
    model, settings = study.model, study.config.evaluate
    context = model.config.max_context
    corpora = {"builtin": ce.builtin_corpus(model.tokenizer, window=min(ce.WINDOW, context))}
    for path in settings.cross_entropy_files:
        corpus = ce.load_corpus(path, chat=model.chat, window=min(ce.WINDOW, context),
                                max_length=min(ce.MAX_LENGTH, context))
        corpora[corpus.name] = corpus
    return {name: ce.truncate_corpus(corpus, settings.cross_entropy_max_tokens)
            for name, corpus in corpora.items()}


def _multiple_choice_sets(study) -> dict[str, tuple[list, list, int]]:
    """benchmark name -> (questions, shot pool, number of shots) from ``evaluate.mc_files``."""
    settings = study.config.evaluate
    pools = list(settings.mc_shot_files) or [""] * len(settings.mc_files)
    sets = {}
    for path, pool in zip(settings.mc_files, pools):
        questions = mc.load_questions(path)
        if len(questions) > settings.mc_n_questions:
            questions = mc.sample_questions(questions, settings.mc_n_questions,
                                            seed=study.config.seed)
        sets[Path(path).stem] = (questions, mc.load_questions(pool) if pool else [],
                                 settings.mc_n_shots)
    return sets


def _judge(study):
    source = study.config.evaluate.judge_source
    if not source:
        return None
    judge_model = load_study_model(source, dtype=study.config.model.dtype)
    return SafetyJudge.from_model(judge_model,
                                  prompt_style=study.config.evaluate.judge_prompt_style,
                                  batch_size=study.config.runtime.batch_size)


def _variant_metrics(study, variant: Variant, corpora, base_harmless_logits,
                     sources: list[tuple[int, int]], embeddings, *, completions: dict,
                     judge=None, mc_sets=None, geometry: bool = True,
                     judged_file: Path | None = None, names: Sequence[str] | None = None,
                     reply_nll: dict[str, np.ndarray] | None = None,
                     below: dict[str, dict] | None = None
                     ) -> tuple[dict, np.ndarray | None, np.ndarray]:
    """The registered metrics of one variant (``study.metrics``; only ``names`` when given),
    and its intervened activations (harmful, harmless) [S, n, D] at the ``sources``; the
    harmful ones only with ``geometry`` (they cost a forward pass of the harmful set).
    ``completions``: the variant's, as the infer stage writes them; ``judged_file``: where to
    write every completion's three-way label and measures; ``reply_nll``: the completions' NLLs
    per prompt set when already scored; ``below``: per prompt set, the unsteered streams kept
    for `_forward_set`."""
    below = below or {}
    model, prompts = study.model, study.prompts()
    harmful_points = None
    if geometry:
        _, harmful_points = _forward_set(study, variant, variant.harmful,
                                         prompts["harmful_eval"], sources, below.get("harmful"))
    harmless_logits, harmless_points = _forward_set(study, variant, variant.harmless,
                                                    prompts["harmless_eval"], sources,
                                                    below.get("harmless"))
    run = VariantRun(
        study=study, variant=variant,
        params=model.params if variant.params is None else variant.params,
        config=model.config if variant.config is None else variant.config,
        completions=completions, harmless_logits=harmless_logits,
        base_harmless_logits=base_harmless_logits, corpora=corpora, judge=judge,
        mc_sets=mc_sets or {}, embeddings=embeddings, reply_nll=reply_nll)
    metrics = variant_metrics(run, names)
    if judged_file is not None:
        artifacts.write_json(judged_file, {"variant": variant.name, **run.judged})
    return metrics, harmful_points, harmless_points


_K_CURVE_METRICS = ("harmful_refusal_rate", "harmless_refusal_rate", "cross_entropy", "kl")


def _k_curve(study, directions, selection, corpora, base_harmless_logits, baseline_metrics,
             evaluated: dict[str, dict], sources, embeddings, below: dict[str, dict]
             ) -> dict | None:
    """Refusal rates and cross-entropy of the k-curve variant keeping its first k directions.

    The last point keeps every direction: it is the variant itself, taken from ``evaluated``
    (the metrics of the variants of the table) when it is there. ``baseline_metrics``: the
    baseline's, among them (`check_config` requires it when there is a curve)."""
    name = study.config.evaluate.k_curve_intervention
    if not name:
        return None
    n_directions = max(c["k"] for c in selection["inlp"]["components"])
    ks = k_values(n_directions)
    reused = {n_directions: evaluated[name]} if name in evaluated else {}
    variants = {k: build_variants(study.model, directions, selection, study.config,
                                  names=[name], inlp_k=k)[0] for k in ks if k not in reused}
    k_of = {id(variant): k for k, variant in variants.items()}
    completions = {k_of[id(variant)]: texts for variant, texts in complete_variants(
        study.model, list(variants.values()), study.prompts(), study.config.infer,
        study.config.runtime, placement=study.placement)}
    points = []
    for k in progress(ks, len(ks), f"k-curve of {name}", every_seconds=0):
        if k in reused:
            metrics = reused[k]
        else:
            metrics, _, _ = _variant_metrics(study, variants[k], corpora, base_harmless_logits,
                                             sources, embeddings, completions=completions[k],
                                             geometry=False, names=_K_CURVE_METRICS,
                                             below=below)
        points.append({"k": k, "harmful_refusal_rate": metrics["harmful_refusal_rate"],
                       "harmless_refusal_rate": metrics["harmless_refusal_rate"],
                       "cross_entropy": metrics["cross_entropy"]["builtin"],
                       "kl": metrics["kl"]})
    curve = KCurve(intervention=name, points=[KCurvePoint(**point) for point in points],
                   baseline_harmful_refusal_rate=baseline_metrics["harmful_refusal_rate"],
                   baseline_cross_entropy=baseline_metrics["cross_entropy"]["builtin"])
    plot = plot_k_curve(study.stage_dir("evaluate") / "k_curve.png", curve)
    curve.plot = os.path.relpath(plot, study.workdir)
    return dataclasses.asdict(curve)


def _fluency(study, completions: dict[str, dict]) -> dict[str, dict[str, np.ndarray]]:
    """Every variant's completions' NLLs under the unsteered model, per prompt set (NaN for
    refusals), scored together: each prompt runs once for all variants. ``completions``:
    variant name -> what the infer stage wrote for it."""
    model, runtime = study.model, study.config.runtime
    scored: dict[str, dict[str, np.ndarray]] = {name: {} for name in completions}
    first = next(iter(completions))
    for prompt_set in CLASSES:
        requests = [row["instruction"] for row in completions[first][prompt_set]]
        for name, texts in completions.items():
            if [row["instruction"] for row in texts[prompt_set]] != requests:
                raise ValueError(f"{study.stage_dir('infer')}/completions/{name}.json answers "
                                 f"other {prompt_set} prompts than {first}.json; "
                                 "rerun the infer stage (delete its folder)")
        replies = [[row["completion"] for row in texts[prompt_set]]
                   for texts in completions.values()]
        logging.info("fluency of the %s completions of %d variants", prompt_set, len(replies))
        for name, nll in zip(completions, fluency_of_answers(
                requests, replies, params=model.params, chat=model.chat, config=model.config,
                batch_size=runtime.batch_size, placement=study.placement)):
            scored[name][prompt_set] = nll
    return scored


def _geometry(study, directions, sources: dict[str, dict], baseline_points, moved
              ) -> tuple[dict | None, dict | None, dict[str, tuple]]:
    """Geometry at the source of each method's first component: (summary at the DiM source,
    summary at the INLP source or None when both methods chose the same (position, layer),
    centroid-axis positions of every variant at its own source). ``moved``: name -> (source
    method, intervened harmful [S, n, D], harmless [S, m, D]), S indexing ``sources``."""
    out, config = study.stage_dir("evaluate"), study.config
    basis, _ = inlp_basis(directions, config.directions)
    methods = list(sources)
    same = (sources["dim"]["position_index"], sources["dim"]["layer"]) == (
        sources["inlp"]["position_index"], sources["inlp"]["layer"])
    groups = {"dim": {}, "inlp": {}}
    for name, (source, harmful, harmless) in moved.items():
        for method in (methods if name == "baseline" else [source]):  # the baseline: in both
            groups["dim" if same else method].setdefault(name, (harmful[methods.index(method)],
                                                                harmless[methods.index(method)]))
    summaries, positions = {}, {}
    for method in (["dim"] if same else methods):
        if not groups[method]:  # e.g. infer.interventions without the baseline or any DiM one
            continue
        source, index = sources[method], methods.index(method)
        p_index, layer = source["position_index"], source["layer"]
        folder = out if method == "dim" else out / "inlp_source"
        folder.mkdir(parents=True, exist_ok=True)
        result = analyse_geometry(
            baseline_points[0][index], baseline_points[1][index], groups[method],
            dim_direction=directions["dim"][p_index, layer], inlp_basis=basis[p_index, layer],
            position=source["position"], layer=layer, out_dir=folder, workdir=study.workdir)
        summaries[method] = dataclasses.asdict(result.summary)
        for name, position in result.positions.items():
            positions.setdefault(name, position)
    return summaries.get("dim"), summaries.get("inlp"), positions


def _take_results(first: Variant, variant: Variant, metrics: dict, moved: dict, out: Path
                  ) -> None:
    """Gives ``variant``, which runs the same intervention as ``first``, that one's metrics
    (with its own description), intervened activations and judged labels."""
    metrics[variant.name] = {**copy.deepcopy(metrics[first.name]),
                             "description": variant.description}
    moved[variant.name] = moved[first.name]
    judged = artifacts.read_json(out / f"judged/{first.name}.json")
    artifacts.write_json(out / f"judged/{variant.name}.json", {**judged, "variant": variant.name})
    logging.info("%s runs the same intervention as %s: its results are copied", variant.name,
                 first.name)


def run(study) -> list[str]:
    config, model, out = study.config, study.model, study.stage_dir("evaluate")
    prompts, directions, selection = study.prompts(), study.directions(), study.selection()
    variants = build_variants(model, directions, selection, config)
    # Each variant's activations are read at the (position, layer) of the component it acts
    # at: the first DiM component, or the first INLP one for the INLP variants.
    sources = {method: selection[method]["components"][0] for method in ("dim", "inlp")}
    capture_at = [(c["position_index"], c["layer"]) for c in sources.values()]
    corpora = _corpora(study)
    (baseline,) = build_variants(model, directions, selection, config, names=["baseline"])
    _, base_harmful = _forward_set(study, baseline, baseline.harmful, prompts["harmful_eval"],
                                   capture_at)
    base_harmless_logits, base_harmless = _forward_set(study, baseline, baseline.harmless,
                                                       prompts["harmless_eval"], capture_at)
    judge, mc_sets = _judge(study), _multiple_choice_sets(study)
    completions = {variant.name: artifacts.read_json(
        study.stage_dir("infer") / f"completions/{variant.name}.json") for variant in variants}
    embeddings = TextEmbeddings(load_sentence_encoder())
    # Every request and completion the variants' metrics will ask for, embedded at once.
    embeddings.add([text for texts in completions.values() for prompt_set in CLASSES
                    for row in texts[prompt_set] for text in (row["instruction"],
                                                              row["completion"])])
    # A variant running the same intervention as an earlier one takes its results (below).
    firsts = first_equal(variants)
    fluency = _fluency(study, {variant.name: completions[variant.name]
                               for index, variant in enumerate(variants)
                               if firsts[index] == index}) if variants else {}
    below: dict[str, dict] = {"harmful": {}, "harmless": {}}  # see _forward_set
    metrics, moved = {}, {}
    for index, variant in progress(enumerate(variants), len(variants), "evaluate variants",
                                   every_seconds=0):
        first = variants[firsts[index]]
        if first is not variant:
            _take_results(first, variant, metrics, moved, out)
            continue
        metrics[variant.name], harmful_points, harmless_points = _variant_metrics(
            study, variant, corpora, base_harmless_logits, capture_at, embeddings,
            completions=completions[variant.name], judge=judge,
            mc_sets=mc_sets, judged_file=out / f"judged/{variant.name}.json",
            reply_nll=fluency[variant.name], below=below)
        moved[variant.name] = (variant.source, harmful_points, harmless_points)
        logging.info("%s: harmful refusal %.2f, harmless refusal %.2f, KL %.4f",
                     variant.name, metrics[variant.name]["harmful_refusal_rate"],
                     metrics[variant.name]["harmless_refusal_rate"], metrics[variant.name]["kl"])
    geometry, inlp_geometry, positions = _geometry(study, directions, sources,
                                                   (base_harmful, base_harmless), moved)
    for name in metrics:
        harmful_position, harmless_position = positions[name]
        metrics[name]["centroid_axis_position"] = harmful_position
        metrics[name]["centroid_axis_position_harmless"] = harmless_position
    k_curve = _k_curve(study, directions, selection, corpora, base_harmless_logits,
                       metrics.get("baseline"), metrics, capture_at, embeddings, below)
    artifacts.write_json(out / "metrics.json", {
        "interventions": metrics, "geometry": geometry, "inlp_geometry": inlp_geometry,
        "k_curve": k_curve})
    plots = [plot for view in (geometry, inlp_geometry) if view for plot in view["plots"]]
    files = (["metrics.json"] + [f"judged/{name}.json" for name in metrics]
             + [os.path.relpath(study.workdir / plot, out) for plot in plots])
    return files + (["k_curve.png"] if k_curve else [])
