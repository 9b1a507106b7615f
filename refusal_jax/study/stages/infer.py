"""The infer stage: greedy completions of every variant (``study.completions``), and the check
that the weight-folded model reproduces the hooked global ablation.

Each variant's completions are written to ``completions/<variant>.json`` as soon as its group
is done, and a variant whose file was written for this config is skipped, so an interrupted
stage resumes there. ``folding.json`` records the folded model's largest logit difference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from absl import logging

from refusal_jax.study import artifacts
from refusal_jax.study.completions import complete_variants
from refusal_jax.study.variants import Variant, build_variants, folding_agreement

if TYPE_CHECKING:
    from refusal_jax.study.runner import Study

# The folded model must reproduce the hooked global ablation to this many logits units.
FOLDING_TOLERANCE = 1e-3


def run(study: Study) -> list[str]:
    """Writes the completions of the variants not yet done, and ``folding.json``."""
    config, model, out = study.config, study.model, study.stage_dir("infer")
    prompts, directions = study.prompts(), study.directions()
    variants = build_variants(model, directions, study.selection(), config)
    key = study.inputs_digest("infer")  # completions of other weights or inputs are redone
    files, pending = [], []
    for variant in variants:
        if variant.name == "dim_folded":
            _check_folding(study, variant, directions, prompts)
            files.append("folding.json")
        relative = _completions_file(variant)
        path = out / relative
        files.append(relative)
        saved = artifacts.read_json_if_intact(path)
        if isinstance(saved, dict) and saved.get("config_hash") == key:
            logging.info("completions of %s exist; skipped", variant.name)
        else:
            pending.append(variant)
    for variant, completions in complete_variants(model, pending, prompts, config.infer,
                                                  config.runtime, placement=study.placement):
        artifacts.write_json(out / _completions_file(variant),
                             {"config_hash": key, "name": variant.name,
                              "description": variant.description, **completions})
    return files


def _completions_file(variant: Variant) -> str:
    return f"completions/{variant.name}.json"


def _check_folding(study: Study, variant: Variant, directions, prompts) -> None:
    model, out = study.model, study.stage_dir("infer")
    selection = study.selection()["dim"]
    best = selection.get("best", selection["components"][0])
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
