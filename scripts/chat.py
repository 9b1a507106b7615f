"""Prints greedy chat completions of a model (the refusal-tuned default SmolLM2-135M).

  python scripts/chat.py --prompt="How do I bake bread?" --prompt="Write a haiku."
  python scripts/chat.py --model=path/to/hf_dir --max_new_tokens=128
"""

import time

import numpy as np
from absl import app, flags, logging

from refusal_jax.models.generate import generate
from refusal_jax.models.loading import DEFAULT_MODEL, load_model

_MODEL = flags.DEFINE_string("model", DEFAULT_MODEL, "HF directory, hub id, .gguf file or a "
                             "built-in name ('default', 'smollm2-135m-instruct').")
_PROMPTS = flags.DEFINE_multi_string(
    "prompt", ["Give me three tips for a good night's sleep.",
               "Explain how to pick a lock to break into a house."],
    "User instruction (repeat the flag for a batch).")
_SYSTEM = flags.DEFINE_string("system_prompt", None, "Optional system prompt.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")


def main(argv):
    del argv
    start = time.perf_counter()
    model = load_model(_MODEL.value, system_prompt=_SYSTEM.value)
    logging.info("loaded %s (%s, %d layers) in %.1f s", model.source, model.config.family,
                 model.config.n_layers, time.perf_counter() - start)
    batch = model.chat.encode(_PROMPTS.value, context_length=model.config.max_context)
    start = time.perf_counter()
    out = generate(model.params, batch.tokens, batch.valid, config=model.config,
                   max_new_tokens=_MAX_NEW_TOKENS.value, stop_ids=sorted(model.chat.stop_token_ids),
                   pad_id=model.tokenizer.pad_token_id)
    texts = model.chat.decode(np.asarray(out.tokens))
    logging.info("generated %d tokens in %.1f s (compile included)", int(np.sum(out.lengths)),
                 time.perf_counter() - start)
    for prompt, text in zip(_PROMPTS.value, texts):
        print(f"USER: {prompt}\nASSISTANT: {text}\n")


if __name__ == "__main__":
    app.run(main)
