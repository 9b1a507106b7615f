"""How far the study's variants agree token for token: what drafting a variant's completion from
a sibling's (draft and verify across variants) could accept.

For each ordered pair (draft source, target) of a finished run's variants, the acceptance is the
share of the target's completion tokens that lie before the first token where the two
completions of the same prompt differ (both classes of eval prompts together): the longest
prefix a verifying forward of the source's completion under the target's intervention would
accept. Completions are re-tokenized from their text, as the run wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CLASSES = ("harmful", "harmless")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def acceptance(workdir: Path, tokenizer: Any) -> dict[str, Any]:
    """{"acceptance": {target: {source: share}}, "best": (source, target, share) of the pair
    that agrees most, "mean": the mean share over all ordered pairs} of the run in
    ``workdir``; empty when it wrote no completions."""
    folder = Path(workdir) / "infer" / "completions"
    tokens = {}
    for path in sorted(folder.glob("*.json")):
        run = json.loads(path.read_text())
        tokens[run["name"]] = [tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
                               for cls in CLASSES for row in run[cls]]
    if len(tokens) < 2:
        return {}
    table: dict[str, dict[str, float]] = {}
    for target, target_rows in tokens.items():
        total = max(sum(map(len, target_rows)), 1)
        table[target] = {
            source: round(sum(_common_prefix(a, b) for a, b in zip(source_rows, target_rows))
                          / total, 4)
            for source, source_rows in tokens.items() if source != target}
    pairs = [(source, target, share) for target, row in table.items()
             for source, share in row.items()]
    return {"acceptance": table, "best": max(pairs, key=lambda pair: pair[2]),
            "mean": round(sum(share for *_, share in pairs) / len(pairs), 4)}
