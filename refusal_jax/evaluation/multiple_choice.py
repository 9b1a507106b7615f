"""Multiple-choice accuracy (MMLU, ARC-Challenge, TruthfulQA MC1) by the log-likelihood of the
answer letter, k-shot, from local dataset files (docs/method.md section 6, "Capability").

Conventions (fixed here once):
- Files in the published layouts (a JSON list, or JSON Lines, of records; or CSV):
    MMLU, Hugging Face `cais/mmlu`:   {"question", "subject", "choices": [..], "answer": 0-3}
    MMLU, original CSV (Hendrycks):   no header; question, A, B, C, D, answer letter; the
                                      subject is the file name without `_test`/`_dev`/`_val`
    ARC, Hugging Face `allenai/ai2_arc`: {"question", "choices": {"text": [..], "label": [..]},
                                      "answerKey"}
    ARC, original JSONL:              {"question": {"stem", "choices": [{"text", "label"}]},
                                      "answerKey"}
    TruthfulQA MC1 (`truthful_qa`, multiple_choice): {"question", "mc1_targets": {"choices",
                                      "labels"}} with exactly one label 1
  Other formats (parquet, ...) can be converted with `datasets`' `to_json`.
- Prompt (the format of Hendrycks et al.'s MMLU evaluation): a header line, then k solved
  examples and the question, each as the question, its choices "A. ...", and "Answer:"
  followed, for the examples, by " <letter>" and a blank line. Shots come from a separate pool
  (MMLU's dev split): the first k of the pool with the question's subject, then other pool
  questions in order; the question itself is never its own shot.
- Score: the next-token log-probability after "Answer:" of each choice's letter token (" A",
  " B", ... as the tokenizer writes them after "Answer:"); the prediction is the best letter
  among the question's choices. With `chat` given, the whole k-shot text is one user turn of the
  model's chat template and the letters are read as the first token of the reply.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refusal_jax.evaluation.kl import last_position_logits
from refusal_jax.models.config import ModelConfig
from refusal_jax.models.params import Params
from refusal_jax.runtime import distributed
from refusal_jax.runtime.placement import Placement
from refusal_jax.text.chat import ChatFormat, left_pad, pad_token_id

LETTERS = string.ascii_uppercase
_SPLIT_SUFFIXES = ("_test", "_dev", "_val", "_validation", "_train")


@dataclasses.dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    subject: str | None = None

    def __post_init__(self):
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError("a question must be a non-empty string")
        if not 2 <= len(self.choices) <= len(LETTERS):
            raise ValueError(f"a question needs 2 to {len(LETTERS)} choices, got "
                             f"{len(self.choices)}: {self.question[:60]!r}")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer index {self.answer} outside the {len(self.choices)} "
                             f"choices of {self.question[:60]!r}")


def _letter_index(label: Any, labels: Sequence[str]) -> int:
    if str(label) not in labels:
        raise ValueError(f"answer {label!r} is not one of the choice labels {list(labels)}")
    return list(labels).index(str(label))


def _from_record(record: Any, subject: str | None) -> Question:
    if not isinstance(record, Mapping):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    if "mc1_targets" in record:  # TruthfulQA MC1
        targets = record["mc1_targets"]
        labels = list(targets["labels"])
        if labels.count(1) != 1:
            raise ValueError(f"mc1_targets must have exactly one label 1, got {labels}")
        return Question(record["question"], tuple(targets["choices"]), labels.index(1),
                        record.get("subject", subject))
    if isinstance(record.get("question"), Mapping):  # ARC, original JSONL
        stem = record["question"]
        labels = [str(choice["label"]) for choice in stem["choices"]]
        return Question(stem["stem"], tuple(choice["text"] for choice in stem["choices"]),
                        _letter_index(record["answerKey"], labels), subject)
    if isinstance(record.get("choices"), Mapping):  # ARC, Hugging Face
        labels = [str(label) for label in record["choices"]["label"]]
        return Question(record["question"], tuple(record["choices"]["text"]),
                        _letter_index(record["answerKey"], labels), subject)
    if isinstance(record.get("choices"), list):  # MMLU, Hugging Face
        answer = record["answer"]
        if isinstance(answer, str):
            answer = _letter_index(answer, LETTERS[:len(record["choices"])])
        return Question(record["question"], tuple(record["choices"]), int(answer),
                        record.get("subject") or subject)
    raise ValueError(f"unrecognised record layout with keys {sorted(record)}; expected MMLU, "
                     "ARC or TruthfulQA MC1 (see refusal_jax.evaluation.multiple_choice)")


def _subject_from_name(path: Path) -> str:
    stem = path.stem
    for suffix in _SPLIT_SUFFIXES:
        stem = stem.removesuffix(suffix)
    return stem.replace("_", " ")


def load_questions(path: str | os.PathLike) -> list[Question]:
    """Questions from a .json / .jsonl / .csv file in one of the layouts of the module
    docstring. Raises FileNotFoundError or ValueError naming the file and the record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no dataset file at {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as file:
                rows = [row for row in csv.reader(file) if row]
            if rows and [cell.strip().lower() for cell in rows[0]] == [
                    "question", "a", "b", "c", "d", "answer"]:
                rows = rows[1:]
            subject = _subject_from_name(path)
            questions = []
            for number, row in enumerate(rows):
                if len(row) != 6:
                    raise ValueError(f"row {number}: expected 6 columns (question, A, B, C, D, "
                                     f"answer), got {len(row)}")
                questions.append(Question(row[0], tuple(row[1:5]),
                                          _letter_index(row[5].strip(), "ABCD"), subject))
        elif suffix in (".json", ".jsonl"):
            text = path.read_text("utf-8")
            if suffix == ".jsonl":
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                records = json.loads(text)
            if not isinstance(records, list):
                raise ValueError("expected a JSON list of records")
            questions = []
            for number, record in enumerate(records):
                try:
                    questions.append(_from_record(record, None))
                except (KeyError, TypeError, ValueError) as error:
                    raise ValueError(f"record {number}: {error!s}") from error
        else:
            raise ValueError("unsupported file type; use .json, .jsonl or .csv (convert other "
                             "formats with the datasets library's to_json)")
    except (json.JSONDecodeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from error
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return questions


def sample_questions(questions: Sequence[Question], n: int, *, seed: int = 0) -> list[Question]:
    """`n` questions drawn without replacement (seeded), or all of them when n >= len."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    order = np.random.default_rng(seed).permutation(len(questions))[:n]
    return [questions[i] for i in order]


def _block(question: Question, answer: bool) -> str:
    lines = [question.question.strip()]
    lines += [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(question.choices)]
    lines.append(f"Answer: {LETTERS[question.answer]}" if answer else "Answer:")
    return "\n".join(lines)


def select_shots(question: Question, pool: Sequence[Question], n_shots: int) -> list[Question]:
    """The first `n_shots` pool questions with the question's subject, then any others."""
    candidates = [q for q in pool if q is not question and q.question != question.question]
    same = [q for q in candidates if q.subject == question.subject]
    other = [q for q in candidates if q.subject != question.subject]
    shots = (same + other)[:n_shots]
    if len(shots) < n_shots:
        raise ValueError(f"the shot pool has only {len(shots)} usable questions for "
                         f"{n_shots}-shot prompts; give a larger pool or fewer shots")
    return shots


def format_prompt(question: Question, shots: Sequence[Question]) -> str:
    """The k-shot prompt, ending with "Answer:" (see the module docstring)."""
    about = f" about {question.subject}" if question.subject else ""
    header = f"The following are multiple choice questions (with answers){about}."
    blocks = [_block(shot, answer=True) for shot in shots] + [_block(question, answer=False)]
    return header + "\n\n" + "\n\n".join(blocks)


def letter_token_ids(tokenizer: Any, n_letters: int, *, chat: ChatFormat | None = None
                     ) -> list[int]:
    """Token ids of the answer letters A.. as the model would write them after the prompt."""
    sample = "Which letter?\nA. one\nB. two\nAnswer:"
    if chat is None:
        prefix, letters = sample, [" " + letter for letter in LETTERS[:n_letters]]
    else:
        prefix, letters = chat.prompts([sample])[0], list(LETTERS[:n_letters])
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    ids = []
    for letter in letters:
        full = tokenizer(prefix + letter, add_special_tokens=False)["input_ids"]
        if (full[:len(prefix_ids)] != prefix_ids or len(full) != len(prefix_ids) + 1
                or tokenizer.decode(full[-1:]).strip() != letter.strip()):
            raise ValueError(f"the answer letter {letter.strip()!r} is not one token after the "
                             "prompt in this tokenizer; log-likelihood scoring by letter needs "
                             "single-token letters")
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise ValueError("two answer letters share a token in this tokenizer")
    return ids


@dataclasses.dataclass(frozen=True)
class MultipleChoiceResult:
    """accuracy over n questions; predictions and answers are choice indices [n]."""

    accuracy: float
    predictions: np.ndarray
    answers: np.ndarray

    @property
    def n(self) -> int:
        return len(self.answers)


def evaluate_multiple_choice(params: Params, questions: Sequence[Question], *,
                             config: ModelConfig, tokenizer: Any,
                             shot_pool: Sequence[Question] = (), n_shots: int = 5,
                             chat: ChatFormat | None = None, intervention: Any = None,
                             batch_size: int = 8, length_bucket: int = 64,
                             placement: Placement | None = None) -> MultipleChoiceResult:
    """Accuracy of the model (optionally intervened) on `questions`, `n_shots`-shot.

    The intervention is an array argument of one jitted forward, so evaluating many
    interventions does not recompile (for a given batch shape). With a `placement`, each
    batch's rows are split over its ``batch`` axes (`batch_size` is rounded up to a multiple).
    """
    if not questions:
        raise ValueError("no questions to evaluate")
    if isinstance(n_shots, bool) or not isinstance(n_shots, int) or n_shots < 0:
        raise ValueError(f"n_shots must be a non-negative integer, got {n_shots!r}")
    for name, value in (("batch_size", batch_size), ("length_bucket", length_bucket)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    texts = [format_prompt(q, select_shots(q, shot_pool, n_shots)) for q in questions]
    if chat is not None:
        texts = chat.prompts(texts)
    n_letters = max(len(q.choices) for q in questions)
    letters = np.asarray(letter_token_ids(tokenizer, n_letters, chat=chat))
    token_lists = [tokenizer(text, add_special_tokens=chat is None)["input_ids"] for text in texts]
    longest = max(map(len, token_lists))
    if longest > config.max_context:
        raise ValueError(f"a {n_shots}-shot prompt has {longest} tokens, more than the model's "
                         f"context of {config.max_context}; use fewer shots")
    pad_id = pad_token_id(tokenizer)
    placement = placement or Placement()
    batch_size = placement.round_up(batch_size, "batch")
    scores = np.zeros((len(questions), n_letters), np.float64)
    for start in range(0, len(questions), batch_size):
        chunk = token_lists[start:start + batch_size]
        length = min(-(-max(map(len, chunk)) // length_bucket) * length_bucket,
                     config.max_context)
        batch = left_pad(chunk, length=length, rows=batch_size, pad_id=pad_id)
        (tokens, valid), _ = placement.leading((batch.tokens, batch.valid), "batch")
        logits = distributed.gather(last_position_logits(params, tokens, valid, config=config,
                                                         intervention=intervention))
        scores[start:start + len(chunk)] = logits[:len(chunk)][:, letters]
    n_choices = np.array([len(q.choices) for q in questions])
    scores[np.arange(n_letters)[None, :] >= n_choices[:, None]] = -np.inf
    predictions = np.argmax(scores, axis=1)
    answers = np.array([q.answer for q in questions])
    return MultipleChoiceResult(accuracy=float(np.mean(predictions == answers)),
                                predictions=predictions, answers=answers)
