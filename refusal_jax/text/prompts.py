"""Instruction sets for extracting, training and evaluating refusal directions.

A *prompt set* is a list of user instructions, each with an optional category. Sets come from
three kinds of source, all named by one string:

- a built-in set shipped with the package (``BUILTIN_SETS``; see ``refusal_jax/data/README.md``);
- a JSON file holding a list whose entries are either objects ``{"instruction": str,
  "category": str | null, ...}`` (other keys are ignored) or plain strings;
- a Hugging Face dataset ``"hf:org/name[:split[:column]]"`` (split defaults to ``train``, column
  to ``instruction``; a ``category`` column is used when present), read with the optional
  ``datasets`` package.

Sampling draws ``n`` entries without replacement with ``random.Random(seed).sample``, the same
draw as the reference pipeline's ``random.seed(seed); random.sample(data, n)``. Without ``n`` the
whole set is returned in file order.

``load_refusals`` returns the built-in refusal replies used as targets when safety-tuning a model
organism; every one contains a refusal substring of docs/method.md section 6.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BUILTIN_SETS: tuple[str, ...] = (
    "harmful_train",
    "harmful_val",
    "harmful_eval",
    "harmless_train",
    "harmless_val",
    "harmless_eval",
    "benign_style_matched_train",
    "benign_style_matched_val",
    "benign_style_matched_eval",
    "benign_style_matched_test",
    "harmful_tuning",
)

_REFUSALS_FILE = "refusals.json"
# The built-in sets and refusal replies, shipped as package data.
_DATA = importlib.resources.files("refusal_jax") / "data"
_GENERAL_REFUSAL = "general"
_HF_PREFIX = "hf:"


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One instruction and its category (None when the source gives none)."""

    instruction: str
    category: str | None = None


def load_instructions(
    source: str | os.PathLike[str], *, n: int | None = None, seed: int = 0
) -> list[str]:
    """Instructions of a prompt set, all of them or a seeded sample of ``n``."""
    return [prompt.instruction for prompt in load_prompts(source, n=n, seed=seed)]


def load_prompts(
    source: str | os.PathLike[str], *, n: int | None = None, seed: int = 0
) -> list[Prompt]:
    """Instructions with their categories, all of them or a seeded sample of ``n``."""
    name, prompts = _read_source(source)
    if not prompts:
        raise ValueError(f"prompt set {name} is empty; pass a set with at least one instruction")
    if n is None:
        return prompts
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer or None, got {n!r}")
    if n > len(prompts):
        raise ValueError(
            f"asked for {n} prompts but {name} has {len(prompts)}; pass a larger set or lower n"
        )
    return random.Random(seed).sample(prompts, n)


def load_refusals(*, category: str | None = None) -> list[str]:
    """Built-in refusal replies.

    ``category=None`` gives all of them; ``"general"`` only the topic-free ones; a harm category
    (``"cybercrime"``, ``"self-harm"``, ...) the general ones plus those written for it.
    """
    entries = _read_json(_DATA / _REFUSALS_FILE, _REFUSALS_FILE)
    refusals = [(entry["category"], entry["refusal"]) for entry in entries]
    if category is None:
        return [text for _, text in refusals]
    known = sorted({cat for cat, _ in refusals})
    if category not in known:
        raise ValueError(f"no refusals for category {category!r}; choose one of {known}")
    wanted = {_GENERAL_REFUSAL, category}
    return [text for cat, text in refusals if cat in wanted]


def _read_source(source: str | os.PathLike[str]) -> tuple[str, list[Prompt]]:
    """(name for messages, prompts) of a built-in name, ``hf:`` id or JSON path."""
    if isinstance(source, str) and source in BUILTIN_SETS:
        resource = _DATA / f"{source}.json"
        return source, _parse_entries(_read_json(resource, source), source)
    if isinstance(source, str) and source.startswith(_HF_PREFIX):
        return source, _read_hf(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a set name, a path or an hf: id, got {type(source)}")
    path = Path(source)
    if not path.exists():
        if isinstance(source, str) and not path.suffix and len(path.parts) == 1:
            raise ValueError(
                f"unknown prompt set {source!r}: choose one of {list(BUILTIN_SETS)}, "
                "or pass a path to a JSON file or an hf:org/name id"
            )
        raise FileNotFoundError(f"prompt file not found: {path}")
    return str(path), _parse_entries(_read_json(path, str(path)), str(path))


def _read_json(resource: Any, name: str) -> Any:
    try:
        return json.loads(resource.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{name} is not valid JSON: {err}") from err


def _parse_entries(entries: Any, name: str) -> list[Prompt]:
    if not isinstance(entries, list):
        raise ValueError(
            f"{name} must hold a JSON list of instructions, got {type(entries).__name__}"
        )
    return [_parse_entry(entry, index, name) for index, entry in enumerate(entries)]


def _parse_entry(entry: Any, index: int, name: str) -> Prompt:
    if isinstance(entry, str):
        instruction, category = entry, None
    elif isinstance(entry, dict):
        instruction, category = entry.get("instruction"), entry.get("category")
    else:
        instruction, category = None, None
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(
            f"{name} entry {index} is malformed: expected a non-empty string or an object with a "
            f"non-empty 'instruction' string, got {entry!r}"
        )
    if category is not None and not isinstance(category, str):
        raise ValueError(
            f"{name} entry {index} is malformed: 'category' must be a string or null, "
            f"got {category!r}"
        )
    return Prompt(instruction, category)


def _read_hf(source: str) -> list[Prompt]:
    """Rows of ``hf:org/name[:split[:column]]`` through the optional ``datasets`` package."""
    fields = source[len(_HF_PREFIX) :].split(":")
    if len(fields) > 3 or not all(fields):
        raise ValueError(
            f"malformed Hugging Face source {source!r}: use hf:org/name[:split[:column]]"
        )
    defaults = [None, "train", "instruction"]
    dataset_id, split, column = fields + defaults[len(fields) :]
    try:
        import datasets  # optional dependency, imported only for hf: sources
    except ImportError as err:
        raise ImportError(
            f"reading {source!r} needs the 'datasets' package: pip install datasets"
        ) from err
    try:
        table = datasets.load_dataset(dataset_id, split=split)
    except Exception as err:  # network, unknown id or split: re-raise with the fix
        raise RuntimeError(
            f"could not load Hugging Face dataset {dataset_id!r} (split {split!r}): {err}. "
            "Check the id and split, and that the Hub is reachable or the dataset is cached"
        ) from err
    if column not in table.column_names:
        raise ValueError(
            f"{source} has no column {column!r}; its columns are {table.column_names}"
        )
    categories: Sequence[Any] = (
        table["category"] if "category" in table.column_names else [None] * len(table)
    )
    entries = [
        {"instruction": text, "category": None if category is None else str(category)}
        for text, category in zip(table[column], categories)
    ]
    return _parse_entries(entries, source)


# The reference prompt sets (Arditi et al.'s processed splits), kept beside the repository, not
# in it (see ../shared/data/refusal_prompts/README.md).
REFERENCE_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "refusal_prompts"
