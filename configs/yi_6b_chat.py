"""Yi-6B-chat with the reference settings (docs/method.md): run on an accelerator."""

from refusal_jax.study.config import reference_config


def get_config():
    config = reference_config("01-ai/Yi-6B-Chat")
    config.runtime.batch_size = 32
    config.runtime.generation_batch_size = 64
    config.runtime.candidate_chunk = 8
    return config
