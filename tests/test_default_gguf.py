"""The real SmolLM2-135M-Instruct GGUF: our runtime against transformers' own GGUF load."""

import functools

import jax
import numpy as np
import pytest
import torch
import transformers

from refusal_jax.models.core import forward
from refusal_jax.models.generate import generate
from refusal_jax.models.io.checkpoints import default_gguf_path
from refusal_jax.models.loading import BASE_MODEL, load_model

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about autumn leaves.",
    "Explain in two sentences how a bicycle gear works.",
    "List three uses of baking soda.",
]


@functools.lru_cache(maxsize=None)
def _models():
    try:
        path = default_gguf_path()
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    ours = load_model(BASE_MODEL)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return ours, theirs


def test_logits_match_transformers_gguf_load_on_chat_prompts():
    ours, theirs = _models()
    batch = ours.chat.encode(PROMPTS, context_length=ours.config.max_context)
    logits = jax.jit(forward, static_argnames=("config", "logits"))(
        ours.params, batch.tokens, batch.valid, config=ours.config).logits
    mask = torch.tensor(batch.valid, dtype=torch.long)
    with torch.no_grad():
        expected = theirs(input_ids=torch.tensor(batch.tokens, dtype=torch.long),
                          attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
                          ).logits.numpy()
    diff = np.abs(np.asarray(logits) - expected)[batch.valid]
    assert diff.max() <= 1e-3, f"max |diff| {diff.max():.2e}"


def test_greedy_generation_matches_transformers_token_for_token():
    ours, theirs = _models()
    batch = ours.chat.encode(PROMPTS, context_length=ours.config.max_context)
    out = generate(ours.params, batch.tokens, batch.valid, config=ours.config, max_new_tokens=32,
                   stop_ids=sorted(ours.chat.stop_token_ids), pad_id=ours.tokenizer.pad_token_id)
    with torch.no_grad():
        expected = theirs.generate(
            input_ids=torch.tensor(batch.tokens, dtype=torch.long),
            attention_mask=torch.tensor(batch.valid, dtype=torch.long), max_new_tokens=32,
            do_sample=False, eos_token_id=sorted(ours.chat.stop_token_ids),
            pad_token_id=ours.tokenizer.pad_token_id)[:, batch.tokens.shape[1]:].numpy()
    ours_tokens = np.asarray(out.tokens)[:, :expected.shape[1]]
    np.testing.assert_array_equal(ours_tokens, expected)
