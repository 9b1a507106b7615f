"""A tiny random Llama with a ChatML tokenizer: every stage in seconds (tests, smoke runs)."""

from refusal_jax.study.config import base_config


def get_config():
    config = base_config()
    config.model.source = "random:llama-tiny"
    config.data.n_train = 16
    config.data.n_val = 8
    config.data.n_eval = 4
    config.data.filter_train = False  # a random model refuses nothing
    config.data.filter_val = False
    config.directions.inlp_max_directions = 4
    config.select.multipliers = (1.0,)
    # A random model neither refuses nor is steered: keep every candidate alive so the
    # later stages have components to use.
    config.select.min_steering_score = -1e9
    config.select.kl_threshold = 1e9
    config.infer.max_new_tokens = 4
    config.evaluate.cross_entropy_max_tokens = 64
    config.runtime.batch_size = 8
    config.runtime.generation_batch_size = 4
    config.runtime.length_bucket = 64  # one padded length for every prompt: fewest compiles
    return config
