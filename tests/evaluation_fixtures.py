"""Shared fixtures of the evaluation tests: a tiny BPE tokenizer whose ids fit the 128-token
vocabulary of the tiny random models of tests/hf_reference.py, with a chat template."""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from refusal_jax.evaluation.cross_entropy import builtin_text

TINY_VOCAB = 128
SPECIAL_TOKENS = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<|user|>' + m['content'] + '<|end|>' }}"
    "{% else %}{{ '<|assistant|>' + m['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def tiny_tokenizer(training_text: str | None = None) -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE over printable ASCII with at most `TINY_VOCAB` ids; like Llama's,
    it puts a BOS `<s>` before a text tokenized with special tokens. Its few merges are learnt
    from `training_text` (default: the built-in prose sample)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    tokenizer.train_from_iterator([training_text or builtin_text()], trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=list(string.printable), show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", chat_template=CHAT_TEMPLATE)
    fast.padding_side = "left"
    assert len(fast) <= TINY_VOCAB, len(fast)
    return fast
