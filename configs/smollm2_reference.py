"""The default model at reference size on a CPU (the issue's "Measure" run): 128 / 32 / 100
prompts from the reference splits, every EOI position, the multiplier sweep {0.5, 1, 2}, up to
100 INLP directions, 64 new tokens. Four variants are generated together in one decode loop
(`runtime.generation_variants`; the base config's 1 suits a larger model, whose caches may
fill a device), as in configs/default.py: the layers below the first one they act at then run
once.

At this size no INLP candidate of the default model passes the selection filters (measured
2026-11-29, of 180: KL 135, steering 105, late layer 36, NaN 6; a candidate can fail several),
so the run takes the one with the lowest bypass score and records that in selection.json, as the
benchmark's PyTorch twin does."""

from refusal_jax.study.config import reference_config


def get_config():
    config = reference_config("default", dtype="float32")
    config.infer.max_new_tokens = 64
    config.runtime.batch_size = 32
    config.runtime.generation_batch_size = 50
    config.runtime.generation_variants = 4
    config.select.when_none_pass = "lowest_bypass"
    return config
