"""The study's stages and their artefacts in a work directory (see ``study.artifacts``).

    extract/   prompts.json (the sampled, filtered sets), baseline_scores.json,
               activations.npz (EOI activations of the train sets), directions.npz
    select/    selection.json (chosen components, rankings, filter counts), scores.npz
    infer/     completions/<variant>.json, folding.json
    evaluate/  metrics.json (per-variant metrics), geometry plots
    report     results.json and report.md in the work directory

A stage runs only when its ``DONE.json`` does not name the current config hash; it reads what
earlier stages wrote, so any stage can be rerun alone once its inputs exist. The report stage
is cheap and always reruns, so notes added to ``notes.md`` in the work directory (explanations
of results, one paragraph per note) reach the report.

Devices: ``runtime.mesh`` (see ``study.config``) places the run on a mesh of every device of
every process (``distributed.Placement``): the weights are loaded into their sharded layout,
prompt batches are split over ``data`` x ``fsdp`` (each process encoding only its own rows),
INLP's (position, layer) pairs over every device, and the KV cache of generation like the batch.
Results are gathered to every process and each artefact is written once, by process 0.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import logging

from refusal_jax.evaluation.activations import capture
from refusal_jax.runtime.distributed import Placement
from refusal_jax.runtime.loading import load_pipeline_model, weights_identity
from refusal_jax.study import artifacts
from refusal_jax.study.config import STAGES, check_config
from refusal_jax.study.data import refusal_filters, sample_sets
from refusal_jax.study.stages.extract import fit_directions
from refusal_jax.study.stages.infer import complete_variants
from refusal_jax.study.stages.select import run_selection
from refusal_jax.study.variants import build_variants, folding_agreement

ALWAYS_RUN = frozenset({"report"})
# The folded model must reproduce the hooked global ablation to this many logits units.
FOLDING_TOLERANCE = 1e-3


class Study:
    """One run: the config, the work directory, and the model (loaded on first use)."""

    def __init__(self, config, workdir: str | Path):
        check_config(config)
        self.config = config
        self.workdir = Path(workdir)
        hashed, identity = config.to_dict(), weights_identity(config.model.source)
        if identity:  # sources identified by their name alone keep the config's own hash
            hashed["weights"] = identity
        self.digest = artifacts.bind_workdir(self.workdir, hashed)

    @functools.cached_property
    def placement(self) -> Placement:
        """The devices of the run (``runtime.mesh``); checks that the batch sizes split evenly."""
        runtime = self.config.runtime
        placement = Placement.from_config(runtime.mesh, runtime.sharding_rules)
        for name, axis in (("batch_size", "batch"), ("generation_batch_size", "batch"),
                           ("candidate_chunk", "candidates")):
            multiple = placement.multiple(axis)
            if runtime[name] % multiple:
                raise ValueError(
                    f"runtime.{name}={runtime[name]} must be a multiple of {multiple}, the number "
                    f"of devices the {axis} axis is split over on the {placement.describe()}; "
                    f"change runtime.{name} or runtime.mesh")
        logging.info("devices: %s", placement.describe())
        return placement

    @functools.cached_property
    def model(self):
        model = self.config.model
        return load_pipeline_model(model.source, dtype=model.dtype,
                                   system_prompt=model.system_prompt or None,
                                   seed=self.config.seed, placement=self.placement)

    def stage_dir(self, stage: str) -> Path:
        return self.workdir / stage

    def prompts(self) -> dict[str, list[str]]:
        return artifacts.read_json(self.stage_dir("extract") / "prompts.json")

    def directions(self) -> dict[str, np.ndarray]:
        return artifacts.read_arrays(self.stage_dir("extract") / "directions.npz")

    def selection(self) -> dict:
        return artifacts.read_json(self.stage_dir("select") / "selection.json")


def run_extract(study: Study) -> list[str]:
    config, model, out = study.config, study.model, study.stage_dir("extract")
    sets = sample_sets(config.data, config.seed).sets
    runtime = dict(batch_size=config.runtime.batch_size,
                   length_bucket=config.runtime.length_bucket, placement=study.placement)
    activations, scores = {}, {}
    for name in ("harmful_train", "harmless_train", "harmful_val", "harmless_val"):
        activations[name], scores[name] = capture(model, sets[name], name=name, **runtime)
    for name, keep in refusal_filters(scores, config.data).items():
        logging.info("filter %s: kept %d of %d prompts", name, keep.sum(), keep.size)
        sets[name] = [text for text, kept in zip(sets[name], keep) if kept]
        activations[name], scores[name] = activations[name][keep], scores[name][keep]
    directions = fit_directions(activations["harmful_train"], activations["harmless_train"],
                                config.directions, seed=config.seed, placement=study.placement)
    artifacts.write_json(out / "prompts.json", sets)
    artifacts.write_json(out / "baseline_scores.json",
                         {name: values.tolist() for name, values in scores.items()})
    artifacts.write_arrays(out / "activations.npz", activations)
    artifacts.write_arrays(out / "directions.npz", directions)
    return ["prompts.json", "baseline_scores.json", "activations.npz", "directions.npz"]


def run_select(study: Study) -> list[str]:
    out = study.stage_dir("select")
    summary, arrays = run_selection(study.model, study.prompts(), study.directions(),
                                    study.config, placement=study.placement)
    artifacts.write_arrays(out / "scores.npz", arrays)
    artifacts.write_json(out / "selection.json", summary)
    return ["scores.npz", "selection.json"]


def run_infer(study: Study) -> list[str]:
    config, model, out = study.config, study.model, study.stage_dir("infer")
    prompts, directions = study.prompts(), study.directions()
    variants = build_variants(model, directions, study.selection(), config)
    files, pending = [], []
    for variant in variants:
        if variant.name == "dim_folded":
            _check_folding(study, variant, directions, prompts)
            files.append("folding.json")
        relative = _completions_file(variant)
        path = out / relative
        files.append(relative)
        if path.exists() and artifacts.read_json(path).get("config_hash") == study.digest:
            logging.info("completions of %s exist; skipped", variant.name)
        else:
            pending.append(variant)
    for variant, completions in complete_variants(model, pending, prompts, config.infer,
                                                  config.runtime, placement=study.placement):
        artifacts.write_json(out / _completions_file(variant),
                             {"config_hash": study.digest, "name": variant.name,
                              "description": variant.description, **completions})
    return files


def _completions_file(variant) -> str:
    return f"completions/{variant.name}.json"


def _check_folding(study: Study, variant, directions, prompts) -> None:
    model, out = study.model, study.stage_dir("infer")
    best = study.selection()["dim"]["components"][0]
    direction = directions["dim"][best["position_index"], best["layer"]]
    batch = model.chat.encode(prompts["harmless_eval"][:study.config.runtime.batch_size],
                              context_length=model.config.max_context,
                              length_bucket=study.config.runtime.length_bucket)
    difference = folding_agreement(model, variant, direction, batch)
    artifacts.write_json(out / "folding.json", {"max_abs_logit_difference": difference,
                                                "tolerance": FOLDING_TOLERANCE})
    if not difference <= FOLDING_TOLERANCE:
        raise RuntimeError(f"the weight-folded model disagrees with the hooked global ablation "
                           f"by {difference:.3g} logits (tolerance {FOLDING_TOLERANCE}); this is "
                           "a bug in folding or in the ablation, not a setting")
    logging.info("folded model matches the hooked ablation: max |logit diff| %.2e", difference)


def _stage_functions():
    from refusal_jax.study.stages.evaluate import run_evaluate
    from refusal_jax.study.stages.report import run_report

    return {"extract": run_extract, "select": run_select, "infer": run_infer,
            "evaluate": run_evaluate, "report": run_report}


def run_study(config, workdir: str | Path, stages: Sequence[str] = STAGES) -> Study:
    """Runs the requested stages in order, skipping those already done for this config."""
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    study = Study(config, workdir)
    functions = _stage_functions()
    for stage in STAGES:
        if stage not in stages:
            continue
        stage_dir = study.stage_dir(stage)
        if stage not in ALWAYS_RUN and artifacts.stage_done(stage_dir, study.digest):
            logging.info("stage %s: done for config %s; skipped", stage, study.digest)
            continue
        logging.info("stage %s: running", stage)
        start, cpu_start = time.perf_counter(), time.process_time()
        files = functions[stage](study)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        artifacts.mark_done(stage_dir, study.digest, files, {"wall": seconds, "cpu": cpu})
        logging.info("stage %s: done in %.1fs (%.1fs of CPU time)", stage, seconds, cpu)
    return study
