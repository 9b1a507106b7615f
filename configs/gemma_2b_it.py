"""Gemma-2B-it with the reference settings (docs/method.md): run on an accelerator."""

from refusal_jax.study.config import reference_config


def get_config():
    config = reference_config("google/gemma-2b-it")
    config.runtime.batch_size = 32
    config.runtime.generation_batch_size = 64
    config.runtime.candidate_chunk = 8
    return config
