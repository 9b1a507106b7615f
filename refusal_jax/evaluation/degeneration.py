"""Degeneration of a completion: how much of it repeats itself, on lowercased words.

Words are the runs of letters, digits and apostrophes of the lowercased text (punctuation and
spacing are ignored, so "Sure! Sure!" is two repeated words). For a completion of n words:
- `repeated_ngram_fraction(text, n=3)`: the fraction of its word n-grams that occurred earlier in
  it, (count - distinct) / count; 0 for fewer than n words. A looping reply tends to 1.
- `longest_repeated_span(text)`: the largest m such that some m consecutive words occur at two
  different start positions (the occurrences may overlap, as in "a b a b a").
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"[\w']+")
NGRAM = 3


def words(text: str) -> list[str]:
    """The lowercased words of `text` (see the module docstring)."""
    return _WORD.findall(text.lower())


def repeated_ngram_fraction(text: str, n: int = NGRAM) -> float:
    """Fraction of the word n-grams of `text` that repeat an earlier one (0 below n words)."""
    tokens = words(text)
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def longest_repeated_span(text: str) -> int:
    """Length in words of the longest word span occurring at two start positions of `text`."""
    tokens = words(text)
    longest = 0
    # For each shift, the longest run of consecutive i where word i equals word i + shift.
    for shift in range(1, len(tokens)):
        run = 0
        for i in range(len(tokens) - shift):
            run = run + 1 if tokens[i] == tokens[i + shift] else 0
            longest = max(longest, run)
    return longest


def degeneration_measures(texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Per completion: "repeated_ngram_fraction" and "longest_repeated_span" arrays [N]."""
    return {"repeated_ngram_fraction": np.asarray([repeated_ngram_fraction(t) for t in texts],
                                                  np.float64),
            "longest_repeated_span": np.asarray([longest_repeated_span(t) for t in texts],
                                                np.int64)}
