"""Prompt sets of a study: sources, seeded samples, and the refusal-score filter.

Six sets: harmful / harmless x train / val / eval, each named by a source that
:func:`refusal_jax.text.load_instructions` reads (a built-in set name, a JSON file of
``[{"instruction": ...}]``, or ``hf:org/name[:split[:column]]``). Each split is a seeded sample
(``random.Random(seed).sample``, as the reference): ``n_train``, ``n_val`` and ``n_eval`` prompts
per class. When two splits of a class name the same source, they are drawn from one sample of
the summed size and cut in order, so they never share a prompt.

Filtering (docs/method.md section 1, as the reference does): with the baseline refusal score
``s`` of each prompt, the harmful prompts kept are those with ``s > 0`` (the model refuses them)
and the harmless ones those with ``s < 0``. The sets shrink; the eval sets are never filtered.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from refusal_jax.text import BUILTIN_SETS, load_instructions

SPLITS = ("train", "val", "eval")
CLASSES = ("harmful", "harmless")


@dataclasses.dataclass(frozen=True)
class PromptSets:
    """Instructions of each (class, split); keys like ``"harmful_train"``."""

    sets: dict[str, list[str]]

    def __getitem__(self, name: str) -> list[str]:
        return self.sets[name]


def _check_source(source: str, key: str) -> None:
    """Clear errors for a missing or empty prompt file, before sampling."""
    if source in BUILTIN_SETS or source.startswith("hf:"):
        return
    path = Path(os.path.expanduser(source))
    if not path.exists():
        raise FileNotFoundError(
            f"data.{key}: prompt file {path} not found; pass a built-in set "
            f"({', '.join(BUILTIN_SETS)}), a JSON file of [{{\"instruction\": ...}}] or an "
            "hf:org/name id")
    if path.stat().st_size == 0 or not path.read_text(encoding="utf-8").strip():
        raise ValueError(f"data.{key}: prompt file {path} is empty; it must hold a JSON list of "
                         "instructions")


def sample_sets(data_config, seed: int) -> PromptSets:
    """Seeded samples of the six sets (see the module docstring)."""
    sizes = {"train": data_config.n_train, "val": data_config.n_val, "eval": data_config.n_eval}
    sets: dict[str, list[str]] = {}
    for cls in CLASSES:
        groups: dict[str, list[str]] = {}  # source -> splits drawn from it, in SPLITS order
        for split in SPLITS:
            key = f"{cls}_{split}"
            source = str(data_config[key])
            _check_source(source, key)
            groups.setdefault(source, []).append(split)
        for source, splits in groups.items():
            wanted = sum(sizes[split] for split in splits)
            try:
                drawn = load_instructions(source, n=wanted, seed=seed)
            except ValueError as error:
                if "asked for" not in str(error):
                    raise
                names = " + ".join(f"{cls}_{split} ({sizes[split]})" for split in splits)
                raise ValueError(
                    f"too few prompts in {source} for {names} = {wanted}: {error}. Lower "
                    "data.n_train / n_val / n_eval or pass a larger set") from error
            start = 0
            for split in splits:
                sets[f"{cls}_{split}"] = drawn[start:start + sizes[split]]
                start += sizes[split]
    return PromptSets(sets)


def refusal_filter(scores: np.ndarray, *, harmful: bool, name: str) -> np.ndarray:
    """Which prompts to keep: harmful ones with score > 0, harmless ones with score < 0.

    Raises ValueError when none is kept (e.g. a model that refuses nothing).
    """
    scores = np.asarray(scores)
    keep = scores > 0 if harmful else scores < 0
    if not keep.any():
        what = ("the model refuses none of them (no baseline refusal score > 0): the model "
                "is not refusal-tuned, or its refusal tokens are not the ones scored"
                if harmful else "the model refuses all of them (no score < 0)")
        flag = "filter_train" if name.endswith("train") else "filter_val"
        raise ValueError(f"no {name} prompt survives the refusal-score filter: {what}. Use a "
                         f"model that refuses, or set data.{flag}=False")
    return keep


def refusal_filters(scores: Mapping[str, np.ndarray], data_config) -> dict[str, np.ndarray]:
    """``refusal_filter`` of each train / val set whose split ``data.filter_train`` /
    ``data.filter_val`` filters: set name -> which of its prompts to keep."""
    return {f"{cls}_{split}": refusal_filter(scores[f"{cls}_{split}"], harmful=cls == "harmful",
                                             name=f"{cls}_{split}")
            for split in ("train", "val") if data_config[f"filter_{split}"] for cls in CLASSES}
