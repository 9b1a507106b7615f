"""How well a model's activations separate harmful requests from benign look-alikes, layer by layer.

A logistic probe (`refusal_jax.training.evaluation.probe_separation`) is fitted at every --layers
layer on the residual stream at the last post-instruction token of --harmful requests against
--look_alikes and --ordinary ones (the refusal organism's training sets), and scored on the
held-out --eval_harmful against --eval_benign: the AUROC, and the share of the held-out benign
requests above the threshold that keeps 90% of the harmful ones above it. With several
--look_alike_fractions the probe is refitted on nested seeded subsets of the look-alikes, a
learning curve that says whether more look-alikes would separate better.

On the released model (the default, no adapter) this measures how well a linear read-out of its
representation separates the classes with this data, to set against the tuned model's refusals;
with --adapter it probes the tuned model. Layer i is the residual stream entering decoder layer i,
so layer 0 holds the embedding of the chat template's last token, the same for every prompt
(AUROC 0.5). Training prompts that paraphrase a held-out one (topic-word Jaccard
>= --exclude_similar) are left out, as in the organism's training.

    python scripts/probe_lookalikes.py --look_alike_fractions=0,0.25,0.5,1 --output=probe.json
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from absl import app, flags, logging

from refusal_jax.evaluation.activations import capture
from refusal_jax.models.io.adapter import load_adapter, merge_adapter
from refusal_jax.models.loading import BASE_MODEL, load_model
from refusal_jax.text import load_prompts
from refusal_jax.text.prompts import REFERENCE_DATA_DIR
from refusal_jax.training.completions import LENGTH_BUCKET
from refusal_jax.training.evaluation import probe_separation
from refusal_jax.training.mixture import ORGANISM_HARMFUL_SOURCES, drop_similar

_ADAPTER = flags.DEFINE_string("adapter", "", "LoRA adapter to merge (empty: the released model).")
_HARMFUL = flags.DEFINE_list("harmful", list(ORGANISM_HARMFUL_SOURCES),
                             "Harmful training requests (the organism's --harmful).")
_LOOK_ALIKES = flags.DEFINE_string("look_alikes", "benign_style_matched_train",
                                   "Benign look-alike training requests.")
_ORDINARY = flags.DEFINE_string(
    "ordinary", str(REFERENCE_DATA_DIR / "splits_harmless_train.json"),
    "Ordinary benign training requests.")
_NUM_ORDINARY = flags.DEFINE_integer("num_ordinary", 300, "Seeded sample of --ordinary.")
_EVAL_HARMFUL = flags.DEFINE_list("eval_harmful",
                                  [str(REFERENCE_DATA_DIR / "processed_harmbench_test.json")],
                                  "Held-out harmful requests.")
_EVAL_BENIGN = flags.DEFINE_list("eval_benign",
                                 ["benign_style_matched_eval", "benign_style_matched_test"],
                                 "Held-out benign look-alikes.")
_EXCLUDE_SIMILAR = flags.DEFINE_float("exclude_similar", 0.5,
                                      "Topic-word Jaccard at which a training prompt counts as a "
                                      "paraphrase of a held-out one and is left out.")
_LAYERS = flags.DEFINE_list("layers", [], "Layers probed (empty: every layer).")
_FRACTIONS = flags.DEFINE_list("look_alike_fractions", ["1"],
                               "Fractions of the look-alikes the probe is fitted with.")
_C = flags.DEFINE_float("inverse_regularization", 0.1, "C of the L2 logistic regression.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the samples.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Prompts per forward pass.")
_OUTPUT = flags.DEFINE_string("output", "", "Write the results to this JSON file too.")


def _load(sources: list[str], n: int | None = None):
    return [prompt for source in sources for prompt in load_prompts(source, n=n, seed=_SEED.value)]


def main(argv):
    del argv
    try:
        fractions = [float(f) for f in _FRACTIONS.value]
    except ValueError:
        fractions = []
    if not fractions or any(not 0.0 <= f <= 1.0 for f in fractions):
        raise app.UsageError("--look_alike_fractions must be numbers in [0, 1], got "
                             f"{_FRACTIONS.value}")
    held_out = {name: [p.instruction for p in _load(sources)] for name, sources in
                (("harmful", _EVAL_HARMFUL.value), ("benign", _EVAL_BENIGN.value))}
    excluded = held_out["harmful"] + held_out["benign"]
    train = {}
    for name, prompts in (("harmful", _load(_HARMFUL.value)),
                        ("look_alikes", _load([_LOOK_ALIKES.value])),
                        ("ordinary", _load([_ORDINARY.value], n=_NUM_ORDINARY.value))):
        kept, dropped = drop_similar(prompts, excluded, threshold=_EXCLUDE_SIMILAR.value)
        train[name] = [p.instruction for p in kept]
        logging.info("%s: %d training prompts (%d paraphrases of held-out ones left out)", name,
                     len(train[name]), dropped)

    model = load_model(BASE_MODEL)
    if _ADAPTER.value:
        model = dataclasses.replace(
            model, params=merge_adapter(model.params, load_adapter(_ADAPTER.value)))
    layers = ([int(layer) for layer in _LAYERS.value] if _LAYERS.value
              else list(range(model.config.n_layers)))
    if any(not 0 <= layer < model.config.n_layers for layer in layers):
        raise app.UsageError(f"--layers must lie in [0, {model.config.n_layers}) for this model, "
                             f"got {_LAYERS.value}")
    activations = {}
    for name, texts in [*train.items(), *(("eval_" + k, v) for k, v in held_out.items())]:
        captured, _ = capture(model, texts, batch_size=_BATCH.value,
                              length_bucket=LENGTH_BUCKET, name=name)
        activations[name] = captured[:, -1][:, layers]  # last post-instruction token

    order = np.random.default_rng(_SEED.value).permutation(len(train["look_alikes"]))
    results = []
    print("| layer | look-alikes | AUROC | look-alikes refused at 90% harmful |")
    print("| --- | --- | --- | --- |")
    for column, layer in enumerate(layers):
        for fraction in fractions:
            subset = order[:round(fraction * len(order))]
            benign = np.concatenate([activations["look_alikes"][subset, column],
                                     activations["ordinary"][:, column]])
            separation = probe_separation(
                activations["harmful"][:, column], benign, activations["eval_harmful"][:, column],
                activations["eval_benign"][:, column], inverse_regularization=_C.value)
            results.append({"layer": layer, "look_alikes": len(subset), **separation})
            print(f"| {layer} | {len(subset)} | {separation['auroc']:.4f} | "
                  f"{separation['benign_refused']:.3f} |", flush=True)
    if _OUTPUT.value:
        Path(_OUTPUT.value).write_text(json.dumps({
            "adapter": _ADAPTER.value or None, "train_sizes": {k: len(v) for k, v in train.items()},
            "held_out_sizes": {k: len(v) for k, v in held_out.items()},
            "inverse_regularization": _C.value, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    app.run(main)
