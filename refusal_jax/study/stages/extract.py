"""The extract stage: the prompt sets, their EOI activations and baseline refusal scores, the
refusal-score filter, and the candidate directions of every (EOI position, layer).

Library calls: ``study.data`` (sampling, filter), ``evaluation.activations.capture`` (batched,
length-sorted capture; on a mesh each process encodes only its own rows) and
``directions.fit.fit_directions`` (DiM, INLP and LEACE). Writes ``prompts.json``,
``baseline_scores.json``, ``activations.npz`` (``[n, P, L, D]`` per train and val set) and
``directions.npz``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from absl import logging

from refusal_jax.directions.fit import fit_directions
from refusal_jax.evaluation.activations import capture
from refusal_jax.study import artifacts
from refusal_jax.study.data import refusal_filters, sample_sets

if TYPE_CHECKING:
    from refusal_jax.study.runner import Study


def run(study: Study) -> list[str]:
    """Samples, captures, filters and fits; returns the files written."""
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
    reference = config.reference
    directions = fit_directions(activations["harmful_train"], activations["harmless_train"],
                                config.directions, seed=config.seed,
                                reference_split=reference.inlp_split,
                                absolute_stop=reference.inlp_absolute_stop,
                                keep_failing=reference.inlp_keep_failing,
                                placement=study.placement)
    logging.info("extract: writing the prompts, activations and directions to %s", out)
    artifacts.write_json(out / "prompts.json", sets)
    artifacts.write_json(out / "baseline_scores.json",
                         {name: values.tolist() for name, values in scores.items()})
    artifacts.write_arrays(out / "activations.npz", activations)
    artifacts.write_arrays(out / "directions.npz", directions)
    return ["prompts.json", "baseline_scores.json", "activations.npz", "directions.npz"]
