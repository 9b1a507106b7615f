"""Supervised chat examples and their fixed-shape token batches.

Conventions fixed here once:
- An `Example` is one user instruction (rendered by the model's chat template, with the
  generation prompt) and the assistant's reply as token ids. A reply that ends the turn carries
  the end-of-turn token last (`end_of_turn_id`); a reply cut short (a truncated self-distilled
  answer) does not, so the model is never taught to stop where the cut happened.
- A `TokenBatch` is left padded to a fixed length `seq_len` (so one compiled train step serves
  every batch): tokens [B, T] int32, valid [B, T] bool (False at padding) and loss_mask [B, T]
  float32, the weight of each reply token in the loss (0 elsewhere): 1, or `decision_weight` at
  the first `decision_tokens` reply tokens, where a chat model commits to refusing or answering.
  Token t is predicted from the logits at t - 1, so loss_mask[:, 0] is always 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from refusal_jax.text.chat import ChatFormat


@dataclasses.dataclass(frozen=True)
class Example:
    """A user instruction and the reply to train on (token ids)."""

    instruction: str
    reply_ids: tuple[int, ...]
    kind: str  # the data group it came from, e.g. "refusal" or "distilled"


@dataclasses.dataclass(frozen=True)
class TokenBatch:
    """Left-padded prompt + reply tokens with the loss weights of the reply tokens (numpy)."""

    tokens: np.ndarray
    valid: np.ndarray
    loss_mask: np.ndarray


def end_of_turn_id(chat: ChatFormat) -> int:
    """The token that ends an assistant turn: the template's end-of-turn token when it is a stop
    token (ChatML `<|im_end|>`), otherwise EOS."""
    first_eoi = chat.eoi_token_ids[0]
    if first_eoi in chat.stop_token_ids:
        return first_eoi
    if chat.tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither an end-of-turn stop token nor an EOS token")
    return int(chat.tokenizer.eos_token_id)


def reply_example(chat: ChatFormat, instruction: str, reply: str, kind: str) -> Example:
    """An example whose reply is a complete text (the end-of-turn token is appended)."""
    ids = chat.tokenizer(reply, add_special_tokens=False)["input_ids"]
    return Example(instruction, tuple(ids) + (end_of_turn_id(chat),), kind)


def prompt_ids(chat: ChatFormat, instructions: Sequence[str], *,
               context_length: int) -> list[list[int]]:
    """Unpadded prompt token ids of each instruction (EOI tokens checked by `chat.encode`)."""
    batch = chat.encode(instructions, context_length=context_length, length_bucket=1)
    return [row[valid].tolist() for row, valid in zip(batch.tokens, batch.valid)]


def encode_examples(chat: ChatFormat, examples: Sequence[Example], *, seq_len: int,
                    context_length: int, pad_id: int = 0, decision_tokens: int = 0,
                    decision_weight: float = 1.0) -> TokenBatch:
    """Left pads prompt + reply of each example to `seq_len` tokens.

    Replies are cut to fit. The first `decision_tokens` reply tokens get the loss weight
    `decision_weight`, the others 1. Raises ValueError naming the examples whose prompt leaves
    no room for a reply token.
    """
    if not examples:
        raise ValueError("no examples to encode; pass at least one")
    if decision_tokens < 0 or not decision_weight > 0:
        raise ValueError(f"decision_tokens must be >= 0 and decision_weight > 0, got "
                         f"{decision_tokens} and {decision_weight}")
    prompts = prompt_ids(chat, [e.instruction for e in examples], context_length=context_length)
    too_long = [f"{e.instruction[:60]!r} ({len(p)} prompt tokens)"
                for e, p in zip(examples, prompts) if len(p) >= seq_len]
    if too_long:
        raise ValueError(f"{len(too_long)} prompt(s) leave no room for a reply within seq_len="
                         f"{seq_len}; raise seq_len or drop them: {too_long[:5]}")
    tokens = np.full((len(examples), seq_len), pad_id, np.int32)
    valid = np.zeros((len(examples), seq_len), bool)
    loss_mask = np.zeros((len(examples), seq_len), np.float32)
    for row, (example, prompt) in enumerate(zip(examples, prompts)):
        reply = list(example.reply_ids[:seq_len - len(prompt)])
        ids = prompt + reply
        tokens[row, seq_len - len(ids):] = ids
        valid[row, seq_len - len(ids):] = True
        loss_mask[row, seq_len - len(reply):] = 1.0
        decision = slice(seq_len - len(reply), seq_len - len(reply) + decision_tokens)
        loss_mask[row, decision] = decision_weight
    return TokenBatch(tokens=tokens, valid=valid, loss_mask=loss_mask)
