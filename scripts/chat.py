"""Prints greedy chat completions of a model (the refusal-tuned default SmolLM2-135M).

  python scripts/chat.py --prompt="How do I bake bread?" --prompt="Write a haiku."
  python scripts/chat.py --model=path/to/hf_dir --max_new_tokens=128

The default model is read from the weights cache after its first load (see
refusal_jax.models.io.weights_cache).
"""

import time

from absl import app, flags, logging

import refusal_jax as rj

_MODEL = flags.DEFINE_string("model", rj.DEFAULT_MODEL, "HF directory, hub id, .gguf file or a "
                             "built-in name ('default', 'smollm2-135m-instruct').")
_PROMPTS = flags.DEFINE_multi_string(
    "prompt", ["Give me three tips for a good night's sleep.",
               "Explain how to pick a lock to break into a house."],
    "User instruction (repeat the flag for a batch).")
_SYSTEM = flags.DEFINE_string("system_prompt", None, "Optional system prompt.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    model = rj.load_model(_MODEL.value, system_prompt=_SYSTEM.value)
    start = time.perf_counter()
    completions = rj.generate(model, _PROMPTS.value, max_new_tokens=_MAX_NEW_TOKENS.value)
    logging.info("generated %d tokens in %.1f s (compile included)",
                 sum(len(tokens) for tokens in completions.tokens), time.perf_counter() - start)
    for prompt, text in zip(completions.prompts, completions.texts):
        print(f"USER: {prompt}\nASSISTANT: {text}\n")


if __name__ == "__main__":
    app.run(main)
