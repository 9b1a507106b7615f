"""The safety-tuning data mixture: harmful requests paired with refusals, benign requests paired
with the base model's own greedy answers, drawn in batches of fixed composition.

- Refusal replies come from `refusal_jax.text.load_refusals`: a prompt with a known harm
  category gets one of that category's replies or a general one; any other prompt a general one.
- Evaluation sets are kept out twice: `exclude_instructions` drops their exact instructions,
  `drop_similar` their paraphrases (requests sharing most topic words with one of them).
- A self-distilled answer that itself contains a refusal substring is dropped, so that benign
  requests are never taught to be refused.
- `batch_indices(group_sizes, per_batch, step, seed)` gives the examples of training step `step`
  directly (random access, so a resumed run sees exactly the batches it would have seen): each
  group is read as a stream of epochs, each epoch a fresh seeded permutation.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from refusal_jax.evaluation.refusal import is_refusal
from refusal_jax.text import Prompt, load_refusals
from refusal_jax.text.chat import ChatFormat
from refusal_jax.text.prompts import REFERENCE_DATA_DIR
from refusal_jax.text.similarity import max_similarity
from refusal_jax.training.completions import decode_replies
from refusal_jax.training.examples import Example, reply_example

# The harmful requests the refusal organism is tuned to refuse: the reference training split,
# AdvBench and MaliciousInstruct (beside the repository) and the built-in written sets.
ORGANISM_HARMFUL_SOURCES = (
    str(REFERENCE_DATA_DIR / "splits_harmful_train.json"), "harmful_train", "harmful_tuning",
    str(REFERENCE_DATA_DIR / "processed_advbench.json"),
    str(REFERENCE_DATA_DIR / "processed_malicious_instruct.json"))


def normalized(text: str) -> str:
    """Case- and whitespace-insensitive form used to deduplicate and exclude instructions."""
    return " ".join(text.lower().split())


def exclude_instructions(prompts: Sequence[Prompt], excluded: Sequence[str]) -> list[Prompt]:
    """`prompts` without duplicates and without any instruction in `excluded` (normalised)."""
    seen = {normalized(text) for text in excluded}
    kept = []
    for prompt in prompts:
        key = normalized(prompt.instruction)
        if key not in seen:
            seen.add(key)
            kept.append(prompt)
    return kept


def drop_similar(prompts: Sequence[Prompt], excluded: Sequence[str], *,
                 threshold: float) -> tuple[list[Prompt], int]:
    """`prompts` without those whose topic-word Jaccard similarity
    (`refusal_jax.text.similarity`) with some instruction of `excluded` reaches `threshold`,
    and how many were dropped. A threshold above 1 drops nothing."""
    if not 0.0 < threshold:
        raise ValueError(f"the similarity threshold must be > 0, got {threshold}")
    similarity = max_similarity([p.instruction for p in prompts], excluded)
    kept = [prompt for prompt, value in zip(prompts, similarity) if value < threshold]
    return kept, len(prompts) - len(kept)


def refusal_examples(chat: ChatFormat, prompts: Sequence[Prompt], *, seed: int,
                     kind: str = "refusal") -> list[Example]:
    """Each harmful prompt paired with a seeded choice among the refusals fitting its category."""
    general = load_refusals(category="general")
    rng = np.random.default_rng(seed)
    examples = []
    for prompt in prompts:
        choices = general
        if prompt.category is not None:
            try:
                choices = load_refusals(category=prompt.category)
            except ValueError:  # a benchmark category the built-in refusals do not cover
                choices = general
        reply = choices[rng.integers(len(choices))]
        examples.append(reply_example(chat, prompt.instruction, reply, kind))
    return examples


def distilled_examples(chat: ChatFormat, instructions: Sequence[str],
                       completions: Sequence[Sequence[int]], *, kind: str) -> list[Example]:
    """Benign instructions paired with the base model's greedy answers, minus refusing ones."""
    if len(instructions) != len(completions):
        raise ValueError(f"{len(instructions)} instructions but {len(completions)} completions")
    texts = decode_replies(chat, completions)
    return [Example(text, tuple(ids), kind)
            for text, ids, answer in zip(instructions, completions, texts)
            if ids and not is_refusal(answer)]


def batch_indices(group_sizes: Mapping[str, int], per_batch: Mapping[str, int], step: int,
                  seed: int) -> dict[str, np.ndarray]:
    """Indices into each group of the examples of training step `step` (`per_batch[g]` of g)."""
    if set(per_batch) - set(group_sizes):
        raise ValueError(f"per_batch names groups {sorted(set(per_batch) - set(group_sizes))} "
                         f"that are not in {sorted(group_sizes)}")
    indices = {}
    for name, count in per_batch.items():
        size = group_sizes[name]
        if size < 1:
            raise ValueError(f"group {name!r} is empty")
        group_seed = zlib.crc32(name.encode())  # stable across Python processes
        rows = []
        for position in range(step * count, (step + 1) * count):
            epoch, index = divmod(position, size)
            order = np.random.default_rng([seed, group_seed, epoch]).permutation(size)
            rows.append(order[index])
        indices[name] = np.asarray(rows, np.int64)
    return indices
