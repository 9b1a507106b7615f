"""Token-level cross-entropy (and perplexity) of a model, with or without an intervention, on
general text and on instruction data (docs/method.md section 6, "Capability").

Conventions (fixed here once):
- A `ScoredTokens` holds left-padded rows: `tokens` [N, T] int32, `valid` [N, T] bool (False at
  padding) and `targets` [N, T] bool, True where a token is scored. Token t of a row is
  predicted from the logits at t - 1, so `targets[:, 0]` is always False. The cross-entropy is
  the mean over all target tokens of the corpus of -log p(token | the tokens before it), in nats
  (perplexity = exp of it), as transformers' causal-LM loss computes it for one batch.
- Text (a .txt file, or the built-in sample of general prose `general_text.txt`) is tokenized as
  one stream without special tokens and cut into windows of `window - len(prefix)` tokens, each
  preceded by `prefix`, the special tokens the tokenizer itself puts at the start of a text (a
  BOS for Llama-style tokenizers, none for ChatML ones). Every token after a window's first is
  scored.
- Instruction data (a JSON list of Alpaca-style {"instruction", "input"?, "output"}) is scored
  on the output only, given the instruction in the model's chat template: the row is the
  tokenized chat prompt (`ChatFormat.prompts`) followed by the tokenized output, as a model
  would have generated it. A non-empty "input" is appended to the instruction after a blank
  line, as in Alpaca's own prompts.
- Rows are sorted by length and batched; each batch is padded to a multiple of
  `length_bucket` tokens (and the last batch with empty rows to `batch_size`, or to the
  corpus's row count when that is smaller; on a mesh, rounded up to a multiple of the ways the
  rows are split), so a corpus compiles the scoring function a few
  times at most. The intervention is an array argument:
  scoring the same corpus under a new direction, basis or coefficient does not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.core import forward
from refusal_jax.models.params import Params
from refusal_jax.runtime import distributed
from refusal_jax.runtime.placement import Placement
from refusal_jax.text.chat import ChatFormat, left_pad, pad_token_id

BUILTIN_TEXT_FILE = "general_text.txt"
BUILTIN_CORPUS_NAME = "builtin"
WINDOW = 256  # tokens per window of a text corpus
MAX_LENGTH = 512  # tokens per row of an instruction corpus (prompt and output)


@dataclasses.dataclass(frozen=True)
class ScoredTokens:
    """Rows to score (see the module docstring). `name` labels the corpus in reports."""

    tokens: np.ndarray
    valid: np.ndarray
    targets: np.ndarray
    name: str

    def __post_init__(self):
        shape = np.shape(self.tokens)
        if len(shape) != 2 or np.shape(self.valid) != shape or np.shape(self.targets) != shape:
            raise ValueError(f"tokens, valid and targets must share one [N, T] shape, got "
                             f"{np.shape(self.tokens)}, {np.shape(self.valid)}, "
                             f"{np.shape(self.targets)}")
        if np.any(np.asarray(self.targets)[:, 0]):
            raise ValueError("targets[:, 0] must be False: the first token has no context")
        if np.any(np.asarray(self.targets) & ~np.asarray(self.valid)):
            raise ValueError("targets must lie on valid (non-padding) tokens")
        if not np.any(self.targets):
            raise ValueError(f"corpus {self.name!r} has no token to score")

    @property
    def n_targets(self) -> int:
        return int(np.sum(self.targets))


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
    """Mean token cross-entropy in nats over `n_tokens` scored tokens."""

    nats: float
    n_tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats)


def _scored_tokens(rows: list[tuple[list[int], list[bool]]], tokenizer: Any,
                   name: str) -> ScoredTokens:
    batch = left_pad([ids for ids, _ in rows], pad_id=pad_token_id(tokenizer))
    targets = left_pad([scored for _, scored in rows]).tokens.astype(bool)
    return ScoredTokens(tokens=batch.tokens, valid=batch.valid, targets=targets, name=name)


def builtin_text() -> str:
    """The built-in sample of general prose (written for this project), as one string."""
    return importlib.resources.files(__package__).joinpath(BUILTIN_TEXT_FILE).read_text("utf-8")


def text_corpus(tokenizer: Any, text: str, *, window: int = WINDOW,
                name: str = "text") -> ScoredTokens:
    """Windows of `text` for next-token scoring (see the module docstring)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text of corpus {name!r} is empty; give some text to score")
    prefix = list(tokenizer("", add_special_tokens=True)["input_ids"])
    if isinstance(window, bool) or not isinstance(window, int) or window < len(prefix) + 2:
        raise ValueError(f"window must be an int of at least {len(prefix) + 2} tokens (the "
                         f"tokenizer's {len(prefix)} start token(s) plus two), got {window!r}")
    stream = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    step = window - len(prefix)
    rows = []
    for start in range(0, len(stream), step):
        ids = prefix + stream[start:start + step]
        if len(ids) >= 2:
            rows.append((ids, [False] + [True] * (len(ids) - 1)))
    if not rows:
        raise ValueError(f"text of corpus {name!r} tokenizes to fewer than two tokens")
    return _scored_tokens(rows, tokenizer, name)


def builtin_corpus(tokenizer: Any, *, window: int = WINDOW) -> ScoredTokens:
    """The built-in general-text sample as a corpus named `BUILTIN_CORPUS_NAME`."""
    return text_corpus(tokenizer, builtin_text(), window=window, name=BUILTIN_CORPUS_NAME)


def _instruction_text(entry: Any, index: int) -> tuple[str, str]:
    if not isinstance(entry, Mapping):
        raise ValueError(f"entry {index} is a {type(entry).__name__}; each entry must be an "
                         'object {"instruction": ..., "output": ...}')
    for key in ("instruction", "output"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise ValueError(f"entry {index} lacks a non-empty string {key!r} (keys: "
                             f"{sorted(entry)})")
    extra = entry.get("input") or ""
    if not isinstance(extra, str):
        raise ValueError(f"entry {index} has a non-string 'input'")
    instruction = entry["instruction"]
    if extra.strip():
        instruction = f"{instruction}\n\n{extra}"
    return instruction, entry["output"]


def instruction_corpus(chat: ChatFormat, pairs: Sequence[Mapping[str, str]], *,
                       max_length: int = MAX_LENGTH, name: str = "instructions"
                       ) -> ScoredTokens:
    """Outputs scored given their chat-formatted instructions (see the module docstring).

    Rows longer than `max_length` keep their first `max_length` tokens (the output is cut).
    Raises ValueError for a malformed entry or a prompt that leaves no room for its output.
    """
    if isinstance(pairs, (str, Mapping)) or not len(pairs):
        raise ValueError(f"corpus {name!r} needs a non-empty list of "
                         '{"instruction": ..., "output": ...} objects')
    texts = [_instruction_text(entry, index) for index, entry in enumerate(pairs)]
    tokenizer = chat.tokenizer
    prompts = chat.prompts([instruction for instruction, _ in texts])
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    output_ids = tokenizer([output for _, output in texts], add_special_tokens=False)["input_ids"]
    rows = []
    for index, (prompt, output) in enumerate(zip(prompt_ids, output_ids)):
        if len(prompt) >= max_length:
            raise ValueError(f"entry {index}: its chat prompt has {len(prompt)} tokens, leaving "
                             f"no room for the output within max_length={max_length}; raise "
                             "max_length or drop the entry")
        ids = (list(prompt) + list(output))[:max_length]
        rows.append((ids, [False] * len(prompt) + [True] * (len(ids) - len(prompt))))
    return _scored_tokens(rows, tokenizer, name)


def load_corpus(path: str | os.PathLike, *, chat: ChatFormat, window: int = WINDOW,
                max_length: int = MAX_LENGTH) -> ScoredTokens:
    """A corpus from a file: .txt (general text) or .json (Alpaca-style list), named by its stem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no corpus file at {path}; give a .txt or .json file")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return text_corpus(chat.tokenizer, path.read_text("utf-8"), window=window, name=path.stem)
    if suffix == ".json":
        try:
            entries = json.loads(path.read_text("utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        if not isinstance(entries, list):
            raise ValueError(f"{path} must hold a JSON list of "
                             '{"instruction": ..., "output": ...} objects')
        try:
            return instruction_corpus(chat, entries, max_length=max_length, name=path.stem)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error
    raise ValueError(f"unsupported corpus file {path}: expected .txt (text) or .json (list of "
                     '{"instruction", "output"})')


@functools.partial(jax.jit, static_argnames="config")
def _nll_sum(params: Params, tokens: jax.Array, valid: jax.Array, targets: jax.Array,
             intervention: Any, *, config: ModelConfig) -> jax.Array:
    """Sum of -log p(token) over the target tokens of a batch (float32 scalar)."""
    logits = forward(params, tokens, valid, config=config, intervention=intervention).logits
    logits = logits[:, :-1]  # position t - 1 predicts token t
    target_logit = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    return jnp.sum(jnp.where(targets[:, 1:], nll, 0.0))


def _batches(corpus: ScoredTokens, batch_size: int, length_bucket: int):
    lengths = corpus.valid.sum(axis=1)
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        length = int(min(-(-lengths[rows].max() // length_bucket) * length_bucket,
                         corpus.tokens.shape[1]))
        tokens = np.zeros((batch_size, length), np.int32)
        valid = np.zeros((batch_size, length), bool)
        targets = np.zeros((batch_size, length), bool)
        tokens[:len(rows)] = corpus.tokens[rows, -length:]
        valid[:len(rows)] = corpus.valid[rows, -length:]
        targets[:len(rows)] = corpus.targets[rows, -length:]
        yield tokens, valid, targets


def cross_entropy(params: Params, corpus: ScoredTokens, *, config: ModelConfig,
                  intervention: Any = None, batch_size: int = 4,
                  length_bucket: int = 64, placement: Placement | None = None) -> CrossEntropy:
    """Mean token cross-entropy (nats) of the model, optionally intervened, on `corpus`.

    Batches are summed in float64 on the host; the result is token-weighted over the corpus.
    With a `placement`, each batch's rows are split over its ``batch`` axes: the batch size is
    rounded up to a multiple of the number of ways they are split, with empty rows, which score
    nothing.
    """
    for name, value in (("batch_size", batch_size), ("length_bucket", length_bucket)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if corpus.tokens.shape[1] > config.max_context:
        raise ValueError(f"corpus {corpus.name!r} has rows of {corpus.tokens.shape[1]} tokens, "
                         f"more than the model's context of {config.max_context}; use a "
                         "smaller window / max_length")
    # A corpus smaller than a batch is one batch of its own rows: filler rows cost a forward.
    batch_size = min(batch_size, corpus.tokens.shape[0])
    placement = placement or Placement()
    batch_size = placement.round_up(batch_size, "batch")
    total = 0.0
    for batch in _batches(corpus, batch_size, length_bucket):
        # No padding: batch_size is a multiple of the split (padding repeats a scored row).
        batch, _ = placement.leading(batch, "batch")
        total += float(distributed.gather(_nll_sum(params, *batch, intervention, config=config)))
    nats = total / corpus.n_targets
    if not math.isfinite(nats):
        raise ValueError(f"the cross-entropy on corpus {corpus.name!r} is {nats}; the model or "
                         "intervention produced non-finite logits")
    return CrossEntropy(nats=nats, n_tokens=corpus.n_targets)


def truncate_corpus(corpus: ScoredTokens, max_tokens: int) -> ScoredTokens:
    """The first rows of the corpus holding at most ``max_tokens`` scored tokens (at least one)."""
    counts = np.cumsum(corpus.targets.sum(axis=1))
    rows = max(1, int(np.searchsorted(counts, max_tokens, side="right")))
    return dataclasses.replace(corpus, tokens=corpus.tokens[:rows], valid=corpus.valid[:rows],
                               targets=corpus.targets[:rows])
