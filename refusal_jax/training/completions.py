"""Greedy completions of many instructions in fixed-size batches, with an on-disk cache.

Prompts are sorted by length and cut into batches of `batch_size` (the last one padded by
repeating its final prompt), and each batch is padded to a multiple of 32 tokens, so the jitted
`generate` compiles for a handful of shapes. Completions are token ids cut after the first stop
token (kept, since it is part of the answer) or at `max_new_tokens`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import logging

from refusal_jax.models.generate import generate
from refusal_jax.models.loading import Model
from refusal_jax.models.params import Params
from refusal_jax.text.chat import ChatFormat

LENGTH_BUCKET = 32  # padded prompt lengths: few compiled shapes


def greedy_completions(model: Model, instructions: Sequence[str], *, max_new_tokens: int,
                       batch_size: int = 32, params: Params | None = None) -> list[list[int]]:
    """Greedy reply token ids of each instruction (in input order).

    `params` overrides `model.params` (e.g. with an adapter merged in).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    instructions = list(instructions)
    params = model.params if params is None else params
    stops = sorted(model.chat.stop_token_ids)
    lengths = [len(ids) for ids in model.chat.tokenizer(
        model.chat.prompts(instructions), add_special_tokens=False)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    replies: list[list[int] | None] = [None] * len(instructions)
    for start in range(0, len(order), batch_size):
        rows = list(order[start:start + batch_size])
        chunk = [instructions[i] for i in rows]
        chunk += [chunk[-1]] * (batch_size - len(chunk))
        batch = model.chat.encode(chunk, context_length=model.config.max_context,
                                  length_bucket=LENGTH_BUCKET)
        out = generate(params, batch.tokens, batch.valid, config=model.config,
                       max_new_tokens=max_new_tokens, stop_ids=stops)
        tokens, counts = np.asarray(out.tokens), np.asarray(out.lengths)
        for i, row in enumerate(rows):
            replies[row] = tokens[i, :counts[i]].tolist()
        logging.info("completions: %d / %d", min(start + batch_size, len(order)), len(order))
    return replies


def cached_greedy_completions(path: str | os.PathLike[str], model: Model,
                              instructions: Sequence[str], *, max_new_tokens: int,
                              batch_size: int = 32) -> list[list[int]]:
    """`greedy_completions` of the base model, per instruction: those that `path` holds for the
    same model source and max_new_tokens are read from it, the others computed and added."""
    path = Path(path)
    settings = {"source": model.source, "max_new_tokens": max_new_tokens}
    known: dict[str, list[int]] = {}
    if path.is_file():
        cached = json.loads(path.read_text())
        request = cached.get("request", {})
        if {key: request.get(key) for key in settings} == settings:
            known = dict(zip(request["instructions"], cached["completions"]))
        else:
            logging.info("cache %s holds another model or length; recomputing", path)
    missing = list(dict.fromkeys(text for text in instructions if text not in known))
    if missing:
        known.update(zip(missing, greedy_completions(model, missing,
                                                     max_new_tokens=max_new_tokens,
                                                     batch_size=batch_size)))
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(".tmp")
        staging.write_text(json.dumps({"request": {**settings, "instructions": list(known)},
                                       "completions": list(known.values())}))
        staging.replace(path)
    return [known[text] for text in instructions]


def decode_replies(chat: ChatFormat, replies: Sequence[Sequence[int]]) -> list[str]:
    """Texts of reply token ids of any lengths (each cut at its first stop token)."""
    stop = min(chat.stop_token_ids)
    padded = np.full((len(replies), max(1, max(map(len, replies), default=0))), stop, np.int32)
    for row, reply in enumerate(replies):
        padded[row, :len(reply)] = reply
    return chat.decode(padded)
