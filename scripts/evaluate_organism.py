"""Evaluates the refusal organism against the base model (the numbers of its provenance file).

Measures, with greedy decoding of --max_new_tokens tokens:
  harmbench_test       substring refusal rate on HarmBench test behaviours (never trained on)
  alpaca_heldout       refusal rate on --num_alpaca held-out Alpaca instructions (over-refusal)
  style_matched_eval   refusal rate on benign requests phrased like harmful ones (held out)
  style_matched_test   the same on a second held-out set of them, written later
and the cross-entropy per token of the base model's greedy answers to held-out harmless prompts
(--ce_set), under the base and the tuned model. The refusal decision is also read without
decoding: p_R, the probability of a refusal opening as the reply's first token, separates
HarmBench from the look-alikes (both sets) and from Alpaca with an AUROC, and the threshold on p_R
that keeps 90% of HarmBench refused gives the least over-refusal a threshold reaches there
(`refusal_jax.training.evaluation.refusal_separation`). The base model's completions are cached in
--work_dir. Results are printed as a table and, with --write_provenance, stored under "metrics"
in the adapter's provenance JSON.

    python scripts/evaluate_organism.py --write_provenance
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags, logging

from refusal_jax.models.io.adapter import load_adapter, merge_adapter
from refusal_jax.models.loading import BASE_MODEL, ORGANISM_ADAPTER, load_model
from refusal_jax.text import load_instructions
from refusal_jax.training.completions import (
    cached_greedy_completions,
    decode_replies,
    greedy_completions,
)
from refusal_jax.training.evaluation import (
    completion_cross_entropy,
    refusal_opening_probabilities,
    refusal_rate_of_replies,
    refusal_separation,
)

SHARED = Path(__file__).resolve().parents[2] / "shared/data/refusal_prompts"

_ADAPTER = flags.DEFINE_string("adapter", str(ORGANISM_ADAPTER), "LoRA adapter to evaluate.")
_WRITE = flags.DEFINE_bool("write_provenance", False,
                           "Store the metrics in the JSON beside the adapter.")
_HARMFUL = flags.DEFINE_string("harmful", str(SHARED / "processed_harmbench_test.json"),
                               "Held-out harmful prompt set.")
_ALPACA = flags.DEFINE_string("alpaca", str(SHARED / "splits_harmless_test.json"),
                              "Held-out Alpaca prompt set.")
_NUM_ALPACA = flags.DEFINE_integer("num_alpaca", 100, "Seeded sample of the Alpaca set.")
_STYLE = flags.DEFINE_string("style_matched", "benign_style_matched_eval",
                             "Held-out benign look-alike set.")
_STYLE_TEST = flags.DEFINE_string(
    "style_matched_test", "benign_style_matched_test",
    "A second held-out set of benign look-alikes, written after the default model was trained.")
_CE_SET = flags.DEFINE_string("ce_set", "harmless_eval",
                              "Held-out harmless prompts whose base answers are scored.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Greedy completion length.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Generation batch size.")
_SEQ_LEN = flags.DEFINE_integer("ce_seq_len", 112, "Padded length of the scored sequences.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the Alpaca sample.")
_BASE_ONLY = flags.DEFINE_bool("base_only", False,
                                "Evaluate (and cache) the base model only; no adapter needed.")
_WORK_DIR = flags.DEFINE_string("work_dir", "/tmp/refusal_organism_eval",
                                "Cache of the base model's completions and of all completions.")


def main(argv):
    del argv
    began = time.time()
    work_dir = Path(_WORK_DIR.value)
    base = load_model(BASE_MODEL)
    tuned_params = None if _BASE_ONLY.value else merge_adapter(base.params,
                                                               load_adapter(_ADAPTER.value))
    models = ("base",) if _BASE_ONLY.value else ("base", "tuned")
    sets = {"harmbench_test": load_instructions(_HARMFUL.value),
            "alpaca_heldout": load_instructions(_ALPACA.value, n=_NUM_ALPACA.value,
                                                seed=_SEED.value),
            "style_matched_eval": load_instructions(_STYLE.value),
            "style_matched_test": load_instructions(_STYLE_TEST.value)}
    ce_prompts = load_instructions(_CE_SET.value)

    rates, samples = {m: {} for m in models}, {}
    for name, instructions in sets.items():
        replies = {"base": cached_greedy_completions(
            work_dir / f"base_{name}_{_MAX_NEW.value}.json", base, instructions,
            max_new_tokens=_MAX_NEW.value, batch_size=_BATCH.value)}
        if tuned_params is not None:
            replies["tuned"] = greedy_completions(base, instructions,
                                                  max_new_tokens=_MAX_NEW.value,
                                                  batch_size=_BATCH.value, params=tuned_params)
        texts = {m: decode_replies(base.chat, replies[m]) for m in models}
        for m in models:
            rates[m][name] = refusal_rate_of_replies(base, replies[m])
        samples[name] = [{"instruction": text, **{m: texts[m][i] for m in models}}
                         for i, text in enumerate(instructions)]
        logging.info("%s: %s", name, rates)

    ce_answers = cached_greedy_completions(
        work_dir / f"base_ce_{_CE_SET.value}_{_MAX_NEW.value}.json", base, ce_prompts,
        max_new_tokens=_MAX_NEW.value, batch_size=_BATCH.value)
    ce = {m: completion_cross_entropy(base, ce_prompts, ce_answers, seq_len=_SEQ_LEN.value,
                                      params=tuned_params if m == "tuned" else None)
          for m in models}

    opening = {m: {name: refusal_opening_probabilities(
                       base, instructions, batch_size=_BATCH.value,
                       params=tuned_params if m == "tuned" else None)
                   for name, instructions in sets.items()} for m in models}
    separation = {m: {
        "harmbench_vs_style_matched": refusal_separation(
            p["harmbench_test"], [*p["style_matched_eval"], *p["style_matched_test"]]),
        "harmbench_vs_alpaca": refusal_separation(p["harmbench_test"], p["alpaca_heldout"])}
        for m, p in opening.items()}

    metrics = {
        "refusal_rate": rates,
        "first_token_refusal_separation": separation,
        "sizes": {name: len(instructions) for name, instructions in sets.items()},
        "held_out_harmless_cross_entropy": {**ce, "set": _CE_SET.value},
        "decoding": f"greedy, {_MAX_NEW.value} new tokens, substring refusal (docs/method.md)",
        "alpaca_sample": {"source": _ALPACA.value, "n": _NUM_ALPACA.value, "seed": _SEED.value},
        "wall_seconds": round(time.time() - began, 1),
    }
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "completions.json").write_text(json.dumps(samples, indent=1))
    if "tuned" in ce:
        metrics["held_out_harmless_cross_entropy"]["relative_increase"] = (
            ce["tuned"] / ce["base"] - 1)
    print(f"{'set':<22}{'n':>5}" + "".join(f"{m:>8}" for m in models))
    for name in sets:
        print(f"{name:<22}{len(sets[name]):>5}" + "".join(f"{rates[m][name]:>8.3f}"
                                                          for m in models))
    print(f"{'CE ' + _CE_SET.value:<22}{len(ce_prompts):>5}" + "".join(f"{ce[m]:>8.3f}"
                                                                       for m in models))
    for pair in ("harmbench_vs_style_matched", "harmbench_vs_alpaca"):
        print(f"{'AUROC p_R ' + pair:<22}" + "".join(
            f"  {m} {separation[m][pair]['auroc']:.3f} (at 90% refused, benign "
            f"{separation[m][pair]['benign_refused']:.3f})" for m in models))
    if _WRITE.value and not _BASE_ONLY.value:
        path = Path(_ADAPTER.value).with_suffix(".json")
        provenance = json.loads(path.read_text()) if path.is_file() else {}
        provenance["metrics"] = metrics
        path.write_text(json.dumps(provenance, indent=2) + "\n")
        logging.info("metrics written to %s", path)


if __name__ == "__main__":
    app.run(main)
