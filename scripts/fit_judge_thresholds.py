"""Fits the thresholds of the three-way completion judge (refusal_jax.evaluation.outcomes) on the
labelled set tests/data/judge_labels.jsonl and reports its agreement with the labels.

  python scripts/fit_judge_thresholds.py            # fit on the train split, report held out
  python scripts/fit_judge_thresholds.py --measure  # (re)compute the measures stored per row

Each row of the set: id, variant, prompt_set, prompt, completion, label (read by a person under
docs/judge_guideline.md), split ("train" or "heldout"), and the measures of
`outcomes.MEASURES` plus "released_relevance" (cosine of the reply and the released model's
greedy answer to the same prompt, the alternative definition of relevance), which `--measure`
computes with the default model (fluency), the released model (its answers) and
all-MiniLM-L6-v2. The fit is a grid search on the train split: among the rules of highest
accuracy, the first in the grid's order, which runs from the loosest degeneration thresholds
to the strictest and from the lowest relevance threshold up (so ties go to the rule that calls
the fewest replies degenerate). The result must equal `outcomes.FITTED`
(tests/test_outcomes.py checks it).
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from refusal_jax.evaluation import outcomes  # noqa: E402

LABELLED_SET = Path(__file__).resolve().parents[1] / "tests/data/judge_labels.jsonl"
GRID = {
    "max_repeated_ngram": [round(0.6 - 0.05 * i, 2) for i in range(12)],  # 0.6 .. 0.05
    "max_reply_nll": [round(6.0 - 0.25 * i, 2) for i in range(21)],  # 6.0 .. 1.0 nats
    "min_relevance": [round(0.025 * i, 3) for i in range(25)],  # 0.0 .. 0.6
}


def read_rows(path: Path = LABELLED_SET) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def measures_of(rows: list[dict]) -> dict[str, np.ndarray]:
    """The stored measures as arrays (a missing NLL, of a refusal or an empty reply: NaN)."""
    return {name: np.asarray([np.nan if row[name] is None else row[name] for row in rows],
                             float) for name in outcomes.MEASURES}


def accuracy(rows: list[dict], thresholds: outcomes.Thresholds) -> float:
    predicted = outcomes.label_completions(measures_of(rows), thresholds)
    return float(np.mean([p == row["label"] for p, row in zip(predicted, rows)]))


def fit_thresholds(rows: list[dict]) -> outcomes.Thresholds:
    """The first rule of highest accuracy on `rows` in the grid's order (module docstring)."""
    best, best_accuracy = None, -1.0
    for values in itertools.product(*GRID.values()):
        thresholds = outcomes.Thresholds(**dict(zip(GRID, values)))
        score = accuracy(rows, thresholds)
        if score > best_accuracy:
            best, best_accuracy = thresholds, score
    return best


def confusion(rows: list[dict], thresholds: outcomes.Thresholds) -> np.ndarray:
    """Counts [true label, judged label] in the order of `outcomes.LABELS`."""
    predicted = outcomes.label_completions(measures_of(rows), thresholds)
    matrix = np.zeros((len(outcomes.LABELS),) * 2, int)
    for p, row in zip(predicted, rows):
        matrix[outcomes.LABELS.index(row["label"]), outcomes.LABELS.index(p)] += 1
    return matrix


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting one half."""
    diff = positive[:, None] - negative[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def compute_measures(rows: list[dict]) -> None:
    """Adds the measures to every row in place (loads the default and released models)."""
    from refusal_jax.evaluation.relevance import TextEmbeddings
    from refusal_jax.models.generate import generate
    from refusal_jax.models.io.sentence_encoder import load_sentence_encoder
    from refusal_jax.models.loading import BASE_MODEL, DEFAULT_MODEL, load_model

    embeddings, model = TextEmbeddings(load_sentence_encoder()), load_model(DEFAULT_MODEL)
    prompts = [row["prompt"] for row in rows]
    replies = [row["completion"] for row in rows]
    measures = outcomes.measure_completions(prompts, replies, embeddings=embeddings,
                                            params=model.params, chat=model.chat,
                                            config=model.config)
    released = load_model(BASE_MODEL)
    unique = sorted(set(prompts))
    answers = []
    for start in range(0, len(unique), 16):
        batch = released.chat.encode(unique[start:start + 16],
                                     context_length=released.config.max_context)
        out = generate(released.params, batch.tokens, batch.valid, config=released.config,
                       max_new_tokens=48, stop_ids=sorted(released.chat.stop_token_ids))
        answers += released.chat.decode(np.asarray(out.tokens))
    answer_of = dict(zip(unique, answers))
    reference = embeddings([answer_of[p] for p in prompts])
    own = embeddings(replies)
    for index, row in enumerate(rows):
        for name in outcomes.MEASURES:
            value = measures[name][index].item()
            row[name] = (None if isinstance(value, float) and not np.isfinite(value) else
                         round(value, 6) if isinstance(value, float) else value)
        row["released_relevance"] = round(float(own[index] @ reference[index]), 6)
        row["released_answer"] = answer_of[row["prompt"]]


def report(rows: list[dict]) -> None:
    train = [row for row in rows if row["split"] == "train"]
    heldout = [row for row in rows if row["split"] == "heldout"]
    fitted = fit_thresholds(train)
    print(f"{len(rows)} labelled completions: {len(train)} train, {len(heldout)} held out")
    print(f"labels: {outcomes.label_counts([row['label'] for row in rows])}")
    print(f"fitted on train: {fitted}")
    print(f"agreement: train {accuracy(train, fitted):.3f}, held out "
          f"{accuracy(heldout, fitted):.3f}")
    print(f"held-out confusion (rows: label, columns: judge; {outcomes.LABELS}):")
    print(confusion(heldout, fitted))
    answered = [row for row in rows if row["label"] != "refusal"]
    for name in ("relevance", "released_relevance"):
        on = np.asarray([row[name] for row in answered if row["label"] == "on_topic"])
        off = np.asarray([row[name] for row in answered if row["label"] == "degenerate"])
        print(f"{name}: AUC on topic vs degenerate {auc(on, off):.3f} "
              f"({len(on)} vs {len(off)} non-refusals)")
    if fitted != outcomes.FITTED:
        print(f"outcomes.FITTED = {outcomes.FITTED} differs: update it to the fitted thresholds")


def main(argv: list[str]) -> None:
    rows = read_rows()
    if "--measure" in argv:
        compute_measures(rows)
        LABELLED_SET.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n"
                                        for row in rows))
    report(rows)


if __name__ == "__main__":
    main(sys.argv[1:])
