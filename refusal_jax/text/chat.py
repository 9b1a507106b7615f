"""Chat formatting: prompts in a model's own chat template, left-padded batches, the
post-instruction (EOI) tokens, the refusal-token set and decoding of completions.

Conventions (fixed here once):
- A prompt is one user turn, optionally preceded by a system turn, rendered by the tokenizer's
  Jinja `chat_template` with the generation prompt. The rendered text is tokenized with
  `add_special_tokens=False`, as transformers' `apply_chat_template` does: templates write their
  own BOS.
- The EOI tokens are the template tokens that follow the user's text (ChatML:
  `<|im_end|>\\n<|im_start|>assistant\\n`). They are derived from the template by rendering
  sentinel instructions, never hard-coded, and must be the same for every instruction.
- A `Batch` is left padded: `tokens` [B, T] int32 and `valid` [B, T] bool (False at padding),
  numpy arrays. Every row ends with the EOI tokens, so EOI position p = -n_eoi .. -1 is column
  T + p of every row.
- Control tokens typed inside an instruction (ChatML `<|im_start|>system`, Llama-3
  `<|eot_id|>`) are not escaped: the rendered text is tokenized whole, as transformers'
  `apply_chat_template` and the reference pipeline do, so such text becomes the control tokens
  and can forge a turn. This keeps the token ids of every prompt those of the reference;
  `ChatFormat.prompts` logs a warning naming each instruction that contains one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import jinja2
import numpy as np
from absl import logging

# Instructions used to locate the template text after the user's turn. Their endings differ
# (letter, '.', '?', '!', digit) so that an instruction-dependent tokenization of the boundary
# shows up as differing suffixes.
_SENTINEL_INSTRUCTIONS = (
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "hello",
    "Give me three reasons to learn Python!",
    "Add 17 and 25",
)

# Typical first words of a refusal. Their first tokens form the refusal-token set R of the
# refusal score (docs/method.md section 4).
REFUSAL_OPENINGS = (
    "I",
    "As",
    "Sorry",
    "I'm sorry",
    "I cannot",
    "I can't",
    "I apologize",
    "Unfortunately",
)

LengthBucket = int | Literal["pow2"]

_PREVIEW_CHARS = 60
_MAX_LISTED = 5


@dataclasses.dataclass(frozen=True)
class Batch:
    """A left-padded batch of prompts: tokens [B, T] int32, valid [B, T] bool."""

    tokens: np.ndarray
    valid: np.ndarray


def _token_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _preview(text: str) -> str:
    return repr(text if len(text) <= _PREVIEW_CHARS else text[:_PREVIEW_CHARS] + "...")


def _list_prompts(lines: list[str]) -> str:
    shown = "\n".join(f"  {line}" for line in lines[:_MAX_LISTED])
    if len(lines) > _MAX_LISTED:
        shown += f"\n  ... and {len(lines) - _MAX_LISTED} more"
    return shown


def _check_strings(name: str, texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise ValueError(f"{name} must be a sequence of strings, got a single string; "
                         "wrap it in a list")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} is empty; pass at least one string")
    bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
    if bad:
        raise ValueError(f"{name} must all be strings; entries {bad[:_MAX_LISTED]} are not")
    return texts


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def bucketed_length(length: int, length_bucket: LengthBucket) -> int:
    """``length`` rounded up to a multiple of ``length_bucket`` (an int), or with "pow2" to
    the next power of two."""
    if length_bucket == "pow2":
        return 1 << (length - 1).bit_length()
    multiple = _check_positive_int("length_bucket (an int or 'pow2')", length_bucket)
    return -(-length // multiple) * multiple


def pad_token_id(tokenizer: Any) -> int:
    """The id used for left padding: the tokenizer's pad token, else its eos, else 0."""
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)


def left_pad(token_lists: Sequence[Sequence[int]], *, length: int | None = None,
             rows: int | None = None, pad_id: int = 0) -> Batch:
    """Left-pads token lists into a [rows, length] `Batch` (defaults: one row each, the longest).

    Rows beyond `token_lists` (fillers that keep a batch shape fixed) are entirely padding; the
    forward pass keeps such rows finite, and callers ignore their outputs.
    """
    return _pad(token_lists, length, rows, pad_id, left=True)


def right_pad(token_lists: Sequence[Sequence[int]], *, length: int | None = None,
              rows: int | None = None, pad_id: int = 0) -> Batch:
    """`left_pad` with the padding after each row's tokens (for rows that continue a cache)."""
    return _pad(token_lists, length, rows, pad_id, left=False)


def _pad(token_lists: Sequence[Sequence[int]], length: int | None, rows: int | None,
         pad_id: int, *, left: bool) -> Batch:
    length = max(map(len, token_lists)) if length is None else length
    rows = len(token_lists) if rows is None else rows
    tokens = np.full((rows, length), pad_id, np.int32)
    valid = np.zeros((rows, length), bool)
    for row, ids in enumerate(token_lists):
        span = slice(length - len(ids), length) if left else slice(0, len(ids))
        tokens[row, span] = ids
        valid[row, span] = True
    return Batch(tokens=tokens, valid=valid)


class ChatFormat:
    """A tokenizer's chat template applied to single-turn instructions.

    Args:
      tokenizer: a transformers tokenizer.
      system_prompt: optional system turn placed before every instruction. None means the
        template's own default (SmolLM2's template, for one, inserts its own system turn).
      chat_template: Jinja template overriding `tokenizer.chat_template` (for tokenizers that
        ship without one).
      context_length: the model's context length, the default limit of `encode`.

    Raises ValueError when there is no template, when it rejects the system prompt, or when the
    tokens after the instruction cannot be derived or depend on the instruction.
    """

    def __init__(self, tokenizer: Any, system_prompt: str | None = None, *,
                 chat_template: str | None = None, context_length: int | None = None):
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat_template; pass chat_template= with the "
                             "model's Jinja chat template")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ValueError(f"system_prompt must be a string or None, got {system_prompt!r}")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self._chat_template = chat_template
        self.context_length = context_length  # the model's; encode's default limit
        self.eoi_token_ids: tuple[int, ...] = self._derive_eoi_token_ids()

    @property
    def n_eoi(self) -> int:
        """Number of post-instruction (EOI) tokens."""
        return len(self.eoi_token_ids)

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """Tokens that end a completion: EOS, and the end-of-turn token that opens the EOI
        suffix when it is a special token (ChatML `<|im_end|>`, Gemma `<end_of_turn>`,
        Llama-3 `<|eot_id|>`)."""
        stops = set()
        if self.tokenizer.eos_token_id is not None:
            stops.add(int(self.tokenizer.eos_token_id))
        end_of_turn = self.tokenizer.added_tokens_decoder.get(self.eoi_token_ids[0])
        if end_of_turn is not None and end_of_turn.special:
            stops.add(self.eoi_token_ids[0])
        return frozenset(stops)

    def _render(self, instruction: str) -> str:
        messages = [] if self.system_prompt is None else [
            {"role": "system", "content": self.system_prompt}]
        messages.append({"role": "user", "content": instruction})
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self._chat_template, add_generation_prompt=True,
                tokenize=False)
        except jinja2.TemplateError as error:
            what = " with a system prompt" if self.system_prompt is not None else ""
            raise ValueError(f"the chat template failed to render a user turn{what}: {error}"
                             ) from error

    def _derive_eoi_token_ids(self) -> tuple[int, ...]:
        suffixes = {}
        for sentinel in _SENTINEL_INSTRUCTIONS:
            text = self._render(sentinel)
            start = text.rfind(sentinel)
            if start < 0:
                raise ValueError(f"the chat template does not copy the instruction verbatim "
                                 f"(rendered {text!r}); the EOI tokens cannot be derived")
            head, full = _token_ids(self.tokenizer, [text[:start + len(sentinel)], text])
            if full[:len(head)] != head:
                raise ValueError(f"the tokenizer merges the end of the instruction {sentinel!r} "
                                 f"with the template text after it (rendered {text!r}), so the "
                                 f"post-instruction tokens are not well defined")
            if len(full) == len(head):
                raise ValueError(f"the chat template adds no tokens after the instruction "
                                 f"(rendered {text!r}); EOI positions need a generation prompt")
            suffixes[sentinel] = tuple(full[len(head):])
        if len(set(suffixes.values())) > 1:
            listing = "\n".join(
                f"  {sentinel!r} -> {self.tokenizer.convert_ids_to_tokens(list(ids))}"
                for sentinel, ids in suffixes.items())
            raise ValueError("the chat template makes the post-instruction tokens depend on the "
                             "instruction, so EOI positions are not comparable across "
                             f"prompts:\n{listing}")
        return suffixes[_SENTINEL_INSTRUCTIONS[0]]

    def prompts(self, instructions: Sequence[str]) -> list[str]:
        """Each instruction as a user turn, followed by the generation prompt (control tokens
        in an instruction stay control tokens; see the module docstring)."""
        instructions = _check_strings("instructions", instructions)
        self._warn_control_tokens(instructions)
        return [self._render(text) for text in instructions]

    def _warn_control_tokens(self, instructions: list[str]) -> None:
        special = [token.content for token in self.tokenizer.added_tokens_decoder.values()
                   if token.special]
        for row, text in enumerate(instructions):
            found = [token for token in special if token in text]
            if found:
                logging.warning("instruction %d contains the control token(s) %s, which are "
                                "tokenized as control tokens (not escaped): %s", row, found,
                                _preview(text))

    def encode(self, instructions: Sequence[str], *, max_length: int | None = None,
               context_length: int | None = None, length_bucket: LengthBucket = 16) -> Batch:
        """Tokenizes and left pads the prompts of `instructions`.

        Args:
          instructions: user instructions.
          max_length: optional cap on a prompt's length in tokens (at most `context_length`).
          context_length: the model's context length; default: the one this ChatFormat was
            built with (`load_model` passes the model's).
          length_bucket: the padded length T is the longest prompt rounded up to a multiple of
            this int (1: no rounding) or, with "pow2", to the next power of two, and never more
            than the length limit; jitted callers then see few distinct shapes.

        Raises ValueError naming the prompts longer than the limit, and the prompts whose last
        tokens are not the EOI tokens (their text merged with the template's).
        """
        instructions = _check_strings("instructions", instructions)
        if context_length is None:
            context_length = self.context_length
        if context_length is None:
            raise ValueError("encode needs context_length=: this ChatFormat was built without "
                             "the model's context length (pass context_length= to either)")
        limit = _check_positive_int("context_length", context_length)
        if max_length is not None:
            limit = min(limit, _check_positive_int("max_length", max_length))
        token_lists = _token_ids(self.tokenizer, self.prompts(instructions))

        too_long = [f"#{row}: {len(ids)} tokens, {_preview(instructions[row])}"
                    for row, ids in enumerate(token_lists) if len(ids) > limit]
        if too_long:
            raise ValueError(f"{len(too_long)} prompt(s) exceed the limit of {limit} tokens "
                             f"(context_length={context_length}, max_length={max_length}); "
                             f"shorten or drop them:\n{_list_prompts(too_long)}")

        length = min(bucketed_length(max(map(len, token_lists)), length_bucket), limit)
        batch = left_pad(token_lists, length=length, pad_id=pad_token_id(self.tokenizer))
        tokens = batch.tokens

        eoi_ok = np.all(tokens[:, length - self.n_eoi:] == np.asarray(self.eoi_token_ids), axis=1)
        merged = [f"#{row}: {_preview(instructions[row])}" for row in np.flatnonzero(~eoi_ok)]
        if merged:
            raise ValueError(f"{len(merged)} prompt(s) do not end with the EOI tokens "
                             f"{self.tokenizer.convert_ids_to_tokens(list(self.eoi_token_ids))}; "
                             f"their end merges with the template text (strip trailing "
                             f"whitespace or punctuation):\n{_list_prompts(merged)}")
        return batch

    def eoi_positions(self, batch: Batch) -> np.ndarray:
        """Column indices [B, n_eoi] int32 of the EOI tokens (for `capture_positions`)."""
        length = batch.tokens.shape[1]
        row = np.arange(length - self.n_eoi, length, dtype=np.int32)
        return np.broadcast_to(row, (batch.tokens.shape[0], self.n_eoi)).copy()

    def decode(self, generated: np.ndarray) -> list[str]:
        """Texts of generated tokens [B, N], each cut before its first stop token."""
        generated = np.asarray(generated)
        if generated.ndim != 2 or not np.issubdtype(generated.dtype, np.integer):
            raise ValueError(f"generated must be integer token ids of shape [B, N], got "
                             f"{generated.dtype} {generated.shape}")
        stops = self.stop_token_ids
        texts = []
        for row in generated.tolist():
            end = next((i for i, token in enumerate(row) if token in stops), len(row))
            texts.append(self.tokenizer.decode(row[:end], skip_special_tokens=True))
        return texts


def refusal_token_ids(tokenizer: Any, openings: Sequence[str] = REFUSAL_OPENINGS, *,
                      chat_template: str | None = None) -> tuple[int, ...]:
    """The refusal-token set R: first tokens of refusal openings at the start of a reply.

    Each opening is appended to a rendered prompt (so it is tokenized where a reply starts,
    after the generation prompt) both directly and after one space: SentencePiece models write
    '▁I' after Llama-2's '[/INST]', ChatML models write 'I' after '<|im_start|>assistant\\n'.
    The first token after the prompt is kept when it is a whole word of the opening (so 'I' of
    "I'm sorry" is kept, but not a subword such as 'Un' of 'Unfortunately', which would count
    unrelated words); forms that merge with the prompt's last token are skipped. Returned
    de-duplicated, in the order found.
    """
    openings = _check_strings("openings", openings)
    prompt = ChatFormat(tokenizer, chat_template=chat_template).prompts(
        [_SENTINEL_INSTRUCTIONS[0]])[0]
    texts = [prompt + space + opening for opening in openings for space in ("", " ")]
    prompt_ids, *replies = _token_ids(tokenizer, [prompt, *texts])
    found: dict[int, None] = {}
    for text, ids in zip(texts, replies):
        opening = text[len(prompt):].lstrip(" ")
        if ids[:len(prompt_ids)] != prompt_ids or len(ids) == len(prompt_ids):
            continue
        first = ids[len(prompt_ids)]
        word = tokenizer.decode([first]).strip()
        if word and opening.startswith(word) and not opening[len(word):len(word) + 1].isalnum():
            found[first] = None
    if not found:
        raise ValueError(f"no refusal opening among {openings} starts with a whole-word token "
                         f"in this tokenizer; pass openings= that do")
    return tuple(found)
