"""Model sources of the pipeline: everything `load_model` accepts, plus tiny random models.

``model.source`` is passed to :func:`refusal_jax.models.loading.load_model` (``"default"``,
``"smollm2-135m-instruct"``, an HF directory, a hub id or a ``.gguf`` file), except
``"random:<name>"``, which builds a randomly initialised model of a preset shape in-process with
a small BPE tokenizer trained on the built-in prompt sets and a ChatML chat template. Random
models are for tests and smoke runs: they need no download and run in seconds.

With a mesh (``placement``), the weights are laid out by its sharding rules. Checkpoints (HF
directories, hub ids, ``.gguf`` files) are then read tensor by tensor straight into that layout
(``sharding.load_sharded_params``), so no host holds the whole model; the named sources
(``"default"``, its base model) are small and carry a LoRA adapter to merge, so they and random
models are built in memory first and then re-laid out.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.io.checkpoints import load_hf_config
from refusal_jax.models.io.tokenizer import load_tokenizer
from refusal_jax.models.loading import (
    BASE_MODEL,
    DEFAULT_MODEL,
    ORGANISM,
    ORGANISM_ADAPTER,
    Model,
    load_model,
)
from refusal_jax.models.params import Params, ParamSpec, map_specs, param_specs
from refusal_jax.runtime import sharding
from refusal_jax.runtime.distributed import Placement
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
                 chat=ChatFormat(tokenizer, system_prompt), hf_config={},
                 source=RANDOM_PREFIX + name)


def weights_identity(source: str) -> dict[str, str]:
    """What identifies the weights of ``source`` beyond its name, for the run's config hash.

    The named default model is a pinned GGUF plus the adapter committed in this repository,
    which a retraining replaces under the same name: its SHA-256 makes the artefacts of a run
    on an older adapter count as another config's, never to be resumed. Other sources are
    identified by their name.
    """
    if source not in (DEFAULT_MODEL, ORGANISM) or not ORGANISM_ADAPTER.is_file():
        return {}
    return {"adapter_sha256": hashlib.sha256(ORGANISM_ADAPTER.read_bytes()).hexdigest()}


def load_pipeline_model(source: str, *, dtype: str = "float32", system_prompt: str | None = None,
                        seed: int = 0, placement: Placement | None = None) -> Model:
    """The model named by ``source``, its weights laid out by ``placement`` (see the module
    docstring; default: one device)."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    jnp_dtype = jnp.dtype(dtype)
    placement = placement or Placement()
    if source.startswith(RANDOM_PREFIX):
        model = random_model(source[len(RANDOM_PREFIX):], seed=seed, dtype=jnp_dtype,
                             system_prompt=system_prompt)
    elif placement.mesh is not None and source not in (DEFAULT_MODEL, ORGANISM, BASE_MODEL):
        return _load_sharded(source, jnp_dtype, system_prompt, placement)
    else:
        model = load_model(source, dtype=jnp_dtype, system_prompt=system_prompt)
    return dataclasses.replace(model, params=placement.params(model.params, model.config))


def _load_sharded(source: str, dtype, system_prompt: str | None, placement: Placement) -> Model:
    """A checkpoint read straight into the placement's layout (as `load_model` otherwise)."""
    hf_config = load_hf_config(source)
    config = ModelConfig.from_hf_config(hf_config)
    tokenizer = load_tokenizer(source)
    if not config.eos_token_ids and tokenizer.eos_token_id is not None:
        config = dataclasses.replace(config, eos_token_ids=(tokenizer.eos_token_id,))
    params = sharding.load_sharded_params(source, config, placement.mesh, dtype=dtype,
                                          rules=placement.rules)
    return Model(config=config, params=params, tokenizer=tokenizer,
                 chat=ChatFormat(tokenizer, system_prompt), hf_config=hf_config,
                 source=str(source))
