"""The default model (SmolLM2-135M-Instruct with the refusal adapter, `load_model("default")`)
with settings that run the whole study (both methods, every intervention, geometry, the tunable-k
curve) in minutes on a laptop CPU. Reference-size settings: configs/smollm2_reference.py.

Smaller than the reference (docs/method.md): 32 train / 8 val / 32 eval prompts per class
(128 / 32 / 100), candidates at the last two EOI positions only (all six), at most 4 INLP
directions per (position, layer) (100), completions of 48 new tokens (512), cross-entropy on the
first 1024 tokens of the built-in text. 48 tokens give the offline judge replies long enough to
read; 32 eval prompts per class (95% intervals of about +-0.17 on a rate near 0.5) are as many as
keep the whole job within ten minutes on an idle 2-core CPU: at 50 per class it took 14 minutes,
most of it generation and the judge's fluency pass (docs/benchmarks.md). The variants are
generated four at a time in one decode loop (`runtime.generation_variants`).
`inlp_reflection_a1` is left out of the interventions: P_a with a = 1 is the nullspace
projection, so it would repeat the `inlp_nullspace` row.

Different from the reference because the model is small: `select.kl_threshold = 0.5` (0.1).
Ablating a candidate that induces refusal on harmless prompts (steering score >= 0, layer < 24)
moves the harmless next-token distribution by a KL of at least 0.19 for INLP's nullspace
projection and 0.10 for DiM's ablation (measured with two adapters; 0.21 and 0.11 with the
other), so with 0.1 no INLP candidate survives the filters; 0.5 keeps several per method and
still discards the ablations that wreck the distribution (KL up to 8).
"""

from refusal_jax.study.config import INTERVENTIONS, base_config


def get_config():
    config = base_config()
    config.model.source = "default"
    config.data.n_train = 32
    config.data.n_val = 8
    config.data.n_eval = 32
    config.directions.inlp_max_directions = 4
    config.select.positions = (-2, -1)
    config.select.kl_threshold = 0.5
    config.infer.max_new_tokens = 48
    config.infer.interventions = tuple(name for name in INTERVENTIONS
                                       if name != "inlp_reflection_a1")
    config.evaluate.cross_entropy_max_tokens = 1024
    config.runtime.batch_size = 16
    config.runtime.generation_batch_size = 32
    config.runtime.generation_variants = 4
    return config
