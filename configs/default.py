"""The default model (SmolLM2-135M-Instruct with the refusal adapter, `load_model("default")`)
with fast settings, so that the whole study runs in minutes on a laptop CPU: small prompt sets,
the last two EOI positions, one ActAdd multiplier, at most 4 INLP directions per pair, short
completions. Reference-size settings: configs/smollm2_reference.py."""

from refusal_jax.pipeline.config import base_config


def get_config():
    config = base_config()
    config.model.source = "default"
    config.data.n_train = 32
    config.data.n_val = 8
    config.data.n_eval = 16
    config.directions.inlp_max_directions = 4
    config.select.positions = (-2, -1)
    config.select.multipliers = (1.0,)
    config.infer.max_new_tokens = 32
    config.evaluate.cross_entropy_max_tokens = 1024
    config.runtime.batch_size = 16
    config.runtime.generation_batch_size = 16
    return config
