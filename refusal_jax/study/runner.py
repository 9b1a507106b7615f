"""The study's stages and their artefacts in a work directory (see ``study.artifacts``).

Each stage is the ``run(study)`` of its module in ``study.stages``; this module holds the
:class:`Study` they share (config, work directory, devices, model) and runs them in order:

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
every process (``runtime.placement``): the weights are loaded into their sharded layout, prompt
batches are split over ``data`` x ``fsdp`` (each process encoding only its own rows),
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

from refusal_jax.runtime.loading import load_study_model, weights_identity
from refusal_jax.runtime.placement import Placement
from refusal_jax.study import artifacts
from refusal_jax.study.config import STAGES, check_config
from refusal_jax.study.stages import evaluate, extract, infer, report, select

ALWAYS_RUN = frozenset({"report"})


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
        return load_study_model(model.source, dtype=model.dtype,
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


def _stage_functions():
    """Each stage's ``run(study) -> files written``, by stage name."""
    return {"extract": extract.run, "select": select.run, "infer": infer.run,
            "evaluate": evaluate.run, "report": report.run}


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
