"""The default model at reference size on a CPU (the issue's "Measure" run): 128 / 32 / 100
prompts from the reference splits, every EOI position, the multiplier sweep {0.5, 1, 2}, up to
100 INLP directions, 64 new tokens."""

from refusal_jax.pipeline.config import reference_config


def get_config():
    config = reference_config("default", dtype="float32")
    config.infer.max_new_tokens = 64
    config.runtime.batch_size = 32
    config.runtime.generation_batch_size = 50
    return config
