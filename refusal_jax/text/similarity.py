"""How alike two instructions are, in the words they share.

The measures behind the built-in sets' guarantees (tests/test_data.py) and behind the organism
trainer's leak filter (``--exclude_similar``) are Jaccard similarities of word sets:

- *content words*: lower-case alphanumeric words, crudely singularised, without stopwords;
- *topic words*: content words without the words of the request frame ("give", "detailed",
  "step", "instruction", "write", ...), so that two requests on different subjects in the same
  frame do not look alike. "Generate instructions on how to commit tax fraud" and "Give detailed
  instructions for how to commit tax fraud" share every topic word (1.0, content words 0.57);
  "Give detailed instructions on how to pick a lock" and "Give detailed instructions for how to
  commit suicide" share none (0.0, content words 0.43).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

STOPWORDS = frozenset(
    "a an the and or but of to in on at for from by with about into over under as is are was "
    "were be been being do does did have has had i me my mine myself you your we our us they "
    "them their he him his she her it its this that these those what which who whom whose how "
    "why when where can could would should will shall may might must so if not no nor than too "
    "very s t just don m ve re ll d".split()
)

# Words of the request frame ("Give step-by-step instructions for ..."), not of its topic.
FRAME_WORDS = frozenset(
    "give step instruction write explain describe create generate tutorial guide detailed plan "
    "series message post list".split()
)


def words(text: str) -> list[str]:
    """Lower-case alphanumeric words with a crude plural strip ("attacks" -> "attack")."""
    found = re.findall(r"[a-z0-9]+", text.lower())
    return [w[:-1] if len(w) > 3 and w.endswith("s") else w for w in found]


def content_words(text: str) -> frozenset[str]:
    """The words of `text` that are not stopwords."""
    return frozenset(w for w in words(text) if w not in STOPWORDS)


def topic_words(text: str) -> frozenset[str]:
    """The content words of `text` outside the request frame (``FRAME_WORDS``)."""
    return content_words(text) - FRAME_WORDS


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a & b| / |a | b|; two empty sets count as identical."""
    return len(a & b) / len(a | b) if a | b else 1.0


def max_similarity(texts: Sequence[str], others: Sequence[str], *,
                   word_set: Callable[[str], frozenset[str]] = topic_words) -> list[float]:
    """For each of `texts`, its highest Jaccard similarity with any of `others`.

    `word_set` maps an instruction to the words compared (default: topic words). Only pairs
    sharing a word are compared (an inverted index), so thousands of prompts against thousands
    take a fraction of a second. 0.0 where nothing is shared or `others` is empty (so an
    instruction with no such words matches nothing).
    """
    other_sets = [word_set(text) for text in others]
    index: dict[str, list[int]] = {}
    for position, other in enumerate(other_sets):
        for word in other:
            index.setdefault(word, []).append(position)
    best = []
    for text in texts:
        mine = word_set(text)
        candidates = {position for word in mine for position in index.get(word, ())}
        best.append(max((jaccard(mine, other_sets[p]) for p in candidates), default=0.0))
    return best
