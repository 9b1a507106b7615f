"""Pure-functional decoder models: configs, parameter trees, forward pass, generation, loading."""

from refusal_jax.models.config import FAMILIES, ModelConfig, UnsupportedModelError
from refusal_jax.models.core import ForwardOutput, KVCache, forward
from refusal_jax.models.generate import Generation, Sampling, generate, generate_each
from refusal_jax.models.params import LayerParams, Params, abstract_params, init_params

__all__ = [
    "FAMILIES", "ForwardOutput", "Generation", "KVCache", "LayerParams", "ModelConfig", "Params",
    "Sampling", "UnsupportedModelError", "abstract_params", "forward", "generate", "generate_each",
    "init_params",
]
