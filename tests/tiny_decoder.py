"""A three-layer random decoder for tests of the intervention algebra: its config, a jitted
forward, random weights and one left-padded batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.core import forward
from refusal_jax.models.params import map_specs, param_specs

D, L = 32, 3
CONFIG = ModelConfig(family="llama", vocab_size=64, d_model=D, n_layers=L, n_heads=4,
                     n_kv_heads=2, head_dim=8, d_ff=48, max_context=64)
run_forward = jax.jit(forward, static_argnames=("config", "logits"))


@functools.cache
def params():
    """Random weights (numpy, so no compilation): N(0, 0.1^2), norms near 1."""
    rng = np.random.default_rng(0)

    def init(spec):
        identity = 1.0 if spec.is_norm else 0.0
        return jnp.asarray(identity + 0.1 * rng.normal(size=spec.shape), jnp.float32)

    return map_specs(init, param_specs(CONFIG))


def batch():
    """Left-padded batch [2, 7]: row 1 has 3 padding tokens."""
    tokens = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (2, 7)).astype(np.int32)
    valid = np.ones((2, 7), bool)
    valid[1, :3] = False
    return tokens, valid
