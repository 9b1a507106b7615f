"""Built-in prompt sets and refusal replies, and the loader for any instruction source."""

from refusal_jax.text.prompts import (
    BUILTIN_SETS,
    Prompt,
    load_instructions,
    load_prompts,
    load_refusals,
)

__all__ = ["BUILTIN_SETS", "Prompt", "load_instructions", "load_prompts", "load_refusals"]
