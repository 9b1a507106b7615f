"""Randomly initialised chat models of preset shapes, for tests and smoke runs.

A random model needs no download and runs in seconds: a small BPE tokenizer trained on the
built-in prompt sets, a ChatML chat template and numpy-drawn weights. A study names one as
``model.source = "random:<name>"`` (`RANDOM_PREFIX`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.loading import Model
from refusal_jax.models.params import Params, ParamSpec, map_specs, param_specs
from refusal_jax.text import BUILTIN_SETS, load_instructions, load_refusals
from refusal_jax.text.chat import ChatFormat

RANDOM_PREFIX = "random:"
# name -> ModelConfig keyword arguments (vocab_size comes from the tokenizer).
RANDOM_MODELS = {
    "llama-tiny": dict(family="llama", d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
                       head_dim=16, d_ff=128, max_context=2048),
}
CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_TINY_VOCAB_SIZE = 512
_RANDOM_WEIGHT_SCALE = 0.2


@functools.lru_cache(maxsize=1)
def tiny_chatml_tokenizer():
    """A byte-level BPE tokenizer (vocabulary 512) trained on the built-in prompts and refusals,
    with a ChatML chat template; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [text for name in BUILTIN_SETS for text in load_instructions(name)]
    corpus += load_refusals() + ["assistant\n"] * 50  # so the generation prompt is short
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB_SIZE, special_tokens=list(CHATML_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)


def _numpy_init(config: ModelConfig, seed: int, dtype) -> Params:
    """Random weights drawn with numpy (no per-leaf compilation): normal(0, 0.2) matrices,
    norm scales 1 + normal(0, 0.1)."""
    rng = np.random.default_rng(seed)

    def init(spec: ParamSpec) -> jax.Array:
        noise = rng.standard_normal(spec.shape).astype(np.float32)
        value = 1.0 + 0.1 * noise if spec.is_norm else _RANDOM_WEIGHT_SCALE * noise
        return jnp.asarray(value, dtype)

    return map_specs(init, param_specs(config))


def random_model(name: str, *, seed: int = 0, dtype=jnp.float32,
                 system_prompt: str | None = None) -> Model:
    """A randomly initialised chat model of preset ``name`` (see ``RANDOM_MODELS``)."""
    if name not in RANDOM_MODELS:
        raise ValueError(f"unknown random model {name!r}; choose one of {sorted(RANDOM_MODELS)}")
    tokenizer = tiny_chatml_tokenizer()
    config = ModelConfig(vocab_size=len(tokenizer), eos_token_ids=(tokenizer.eos_token_id,),
                         **RANDOM_MODELS[name])
    params = _numpy_init(config, seed, dtype)
    return Model(config=config, params=params, tokenizer=tokenizer,
                 chat=ChatFormat(tokenizer, system_prompt, context_length=config.max_context),
                 hf_config={},
                 source=RANDOM_PREFIX + name)
