"""The study's stages and their artefacts in a work directory (see ``study.artifacts``).

Each stage is the ``run(study)`` of its module in ``study.stages``; this module holds the
:class:`Study` they share (config, work directory, devices, model) and runs them in order:

    extract/   prompts.json (the sampled, filtered sets), baseline_scores.json,
               activations.npz (EOI activations of the train sets), directions.npz
    select/    selection.json (chosen components, rankings, filter counts), scores.npz
    infer/     completions/<variant>.json, folding.json
    evaluate/  metrics.json (per-variant metrics), geometry plots
    report     results.json and report.md in the work directory

A stage runs unless its ``DONE.json`` names the current config hash, the current fingerprints
of its inputs and unchanged files (``study.artifacts``). Its inputs are the files it reads (the
model's checkpoint and adapter, the prompt files for ``extract``, the evaluation files and
judge for ``evaluate``; ``study.fingerprints``) and the completion records of the stages before
it, so new weights at the same path or an edited prompt file rerun the stages they affect and
every stage after them. It reads what earlier stages wrote, so any stage can be rerun alone once
its inputs exist. One run at a time holds a work directory (``study.workdir_lock``). The
report stage is cheap and always reruns, so notes added to ``notes.md`` in the work directory
(explanations of results, one paragraph per note) reach the report.

Devices: ``runtime.mesh`` (see ``study.config``) places the run on a mesh of every device of
every process (``runtime.placement``): the weights are loaded into their sharded layout, prompt
batches are split over ``data`` x ``fsdp`` (each process encoding only its own rows),
INLP's (position, layer) pairs over every device, and the KV cache of generation like the batch.
Results are gathered to every process and each artefact is written once, by process 0.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import logging

from refusal_jax.runtime import distributed
from refusal_jax.runtime.loading import load_study_model
from refusal_jax.runtime.placement import Placement
from refusal_jax.study import artifacts, fingerprints
from refusal_jax.study.config import STAGES, check_config
from refusal_jax.study.data import CLASSES, SPLITS
from refusal_jax.study.finite_weights import first_non_finite_weight
from refusal_jax.study.stages import evaluate, extract, infer, report, select
from refusal_jax.study.workdir_lock import workdir_lock

ALWAYS_RUN = frozenset({"report"})
# The groups of input files each stage reads (see `Study.input_files`).
STAGE_INPUT_FILES = {"extract": ("model", "prompts"), "select": ("model",), "infer": ("model",),
                     "evaluate": ("model", "evaluation"), "report": ()}
REPORT_FILES = ("results.json", "report.md")


class Study:
    """One run: the config, the work directory, and the model (loaded on first use)."""

    def __init__(self, config, workdir: str | Path, *, read_only: bool = False):
        check_config(config)
        self.config = config
        self.workdir = Path(workdir)
        self.digest = artifacts.bind_workdir(self.workdir, config.to_dict(), write=not read_only)
        self.fingerprint_cache = fingerprints.FingerprintCache(self.workdir)

    @functools.cached_property
    def input_files(self) -> dict[str, list[Path]]:
        """The files the stages read, by group: ``model`` (checkpoint, adapter), ``prompts``
        (the six prompt sets' files), ``evaluation`` (cross-entropy and multiple-choice files,
        the judge's checkpoint)."""
        data, evaluate_config = self.config.data, self.config.evaluate
        listed = (*evaluate_config.cross_entropy_files, *evaluate_config.mc_files,
                  *evaluate_config.mc_shot_files)
        judge = evaluate_config.judge_source
        return {
            "model": fingerprints.source_files(self.config.model.source),
            "prompts": fingerprints.prompt_files(str(data[f"{cls}_{split}"])
                                                 for cls in CLASSES for split in SPLITS),
            "evaluation": [Path(name) for name in listed if Path(name).is_file()]
                          + (fingerprints.source_files(judge) if judge else []),
        }

    def stage_inputs(self, stage: str) -> dict[str, str]:
        """Fingerprints of what ``stage`` reads: its input files (path -> SHA-256) and the
        completion records of the stages before it (``stage:<name>`` -> digest)."""
        files = [path for group in STAGE_INPUT_FILES[stage] for path in self.input_files[group]]
        inputs = fingerprints.fingerprint(files, self.fingerprint_cache)
        for earlier in STAGES[:STAGES.index(stage)]:
            inputs[f"stage:{earlier}"] = artifacts.record_digest(
                artifacts.stage_record(self.stage_dir(earlier)))
        if distributed.is_primary():
            self.fingerprint_cache.save()
        return inputs

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
        """The model of ``model.source``; ValueError naming the first weight holding NaN / inf."""
        settings = self.config.model
        model = load_study_model(settings.source, dtype=settings.dtype,
                                 system_prompt=settings.system_prompt or None,
                                 seed=self.config.seed, placement=self.placement)
        bad = first_non_finite_weight(model.params)
        if bad:
            raise ValueError(f"model {settings.source}: weight {bad} holds NaN or inf; the "
                             "checkpoint is damaged (reconvert or download it again)")
        return model

    def inputs_digest(self, stage: str) -> str:
        """A digest of the config hash and ``stage``'s current inputs: what a stage keys the
        partial results it resumes from (the infer stage's completions of each variant)."""
        text = json.dumps([self.digest, self.stage_inputs(stage)], sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def stage_done(self, stage: str) -> bool:
        """Whether ``stage`` finished for this config and its current inputs, its files intact
        (``artifacts.stage_done``)."""
        return artifacts.stage_done(self.stage_dir(stage), self.digest, self.stage_inputs(stage))

    def stage_dir(self, stage: str) -> Path:
        return self.workdir / stage

    def prompts(self) -> dict[str, list[str]]:
        return artifacts.read_json(self.stage_dir("extract") / "prompts.json")

    def directions(self) -> dict[str, np.ndarray]:
        return artifacts.read_arrays(self.stage_dir("extract") / "directions.npz")

    def selection(self) -> dict:
        return artifacts.read_json(self.stage_dir("select") / "selection.json")


def _stage_functions():
    """Each stage's ``run(study) -> files written``, by stage name."""
    return {"extract": extract.run, "select": select.run, "infer": infer.run,
            "evaluate": evaluate.run, "report": report.run}


def run_study(config, workdir: str | Path, stages: Sequence[str] = STAGES) -> Study:
    """Runs the requested stages in order, skipping those already done for this config and
    these inputs. Holds the work directory's lock (process 0) while it runs; a read-only work
    directory is accepted when every requested stage is done (the report as written)."""
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    workdir = Path(workdir)
    if workdir.is_dir() and not _writable(workdir):
        return _check_read_only(config, workdir, stages)
    workdir.mkdir(parents=True, exist_ok=True)
    lock = workdir_lock(workdir) if distributed.is_primary() else contextlib.nullcontext()
    with lock:
        study = Study(config, workdir)
        functions = _stage_functions()
        for stage in STAGES:
            if stage in stages:
                _run_stage(study, stage, functions[stage])
    return study


def _writable(workdir: Path) -> bool:
    return os.access(workdir, os.W_OK)


def _run_stage(study: Study, stage: str, function) -> None:
    stage_dir, inputs = study.stage_dir(stage), study.stage_inputs(stage)
    if stage not in ALWAYS_RUN and artifacts.stage_done(stage_dir, study.digest, inputs):
        logging.info("stage %s: done for config %s; skipped", stage, study.digest)
        return
    logging.info("stage %s: running", stage)
    start, cpu_start = time.perf_counter(), time.process_time()
    files = function(study)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    artifacts.mark_done(stage_dir, study.digest, files, {"wall": seconds, "cpu": cpu}, inputs)
    logging.info("stage %s: done in %.1fs (%.1fs of CPU time)", stage, seconds, cpu)


def _check_read_only(config, workdir: Path, stages: Sequence[str]) -> Study:
    """A read-only work directory: nothing can be written, so every requested stage must be
    done already (the report stage: its files written); PermissionError naming the first that
    is not."""
    study = Study(config, workdir, read_only=True)
    for stage in STAGES:
        if stage not in stages:
            continue
        if stage in ALWAYS_RUN:
            done = all((workdir / name).is_file() for name in REPORT_FILES)
        else:
            done = study.stage_done(stage)
        if not done:
            raise PermissionError(
                f"work directory {workdir} is read-only and stage {stage} is not done there "
                "for this config (nothing can be written); make the directory writable or "
                "copy it elsewhere and pass that as --workdir")
    logging.info("work directory %s is read-only; stages %s are done there, the report as "
                 "written at %s", workdir, ", ".join(stages), workdir / "report.md")
    return study
