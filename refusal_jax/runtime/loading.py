"""Loading a model for a study: `load_study_model` takes any ``model.source`` and a placement.

``model.source`` is passed to :func:`refusal_jax.models.loading.load_model` (``"default"``,
``"smollm2-135m-instruct"``, an HF directory, a hub id or a ``.gguf`` file), except
``"random:<name>"``, a randomly initialised model of a preset shape
(`refusal_jax.runtime.random_models`).

With a mesh (``placement``), the weights are laid out by its sharding rules. Checkpoints (HF
directories, hub ids, ``.gguf`` files) are then read tensor by tensor straight into that layout
(`refusal_jax.runtime.sharded_loading`), so no host holds the whole model; the named sources
(``"default"``, its base model) are small and carry a LoRA adapter to merge, so they and random
models are built in memory first and then re-laid out.
"""

from __future__ import annotations

import dataclasses

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.io.checkpoints import load_hf_config
from refusal_jax.models.io.tokenizer import load_tokenizer
from refusal_jax.models.loading import (
    BASE_MODEL,
    DEFAULT_MODEL,
    ORGANISM,
    Model,
    load_model,
)
from refusal_jax.runtime.placement import Placement
from refusal_jax.runtime.precision import DtypePolicy
from refusal_jax.runtime.random_models import RANDOM_PREFIX, random_model
from refusal_jax.runtime.sharded_loading import load_sharded_params
from refusal_jax.text.chat import ChatFormat


def load_study_model(source: str, *, dtype: str = "float32", system_prompt: str | None = None,
                     seed: int = 0, placement: Placement | None = None) -> Model:
    """The model named by ``source`` with weights of ``dtype`` ("float32" or "bfloat16"), laid
    out by ``placement`` (see the module docstring; default: one device)."""
    jnp_dtype = DtypePolicy(params=dtype).params_dtype
    placement = placement or Placement()
    if source.startswith(RANDOM_PREFIX):
        model = random_model(source[len(RANDOM_PREFIX):], seed=seed, dtype=jnp_dtype,
                             system_prompt=system_prompt)
    elif placement.mesh is not None and source not in (DEFAULT_MODEL, ORGANISM, BASE_MODEL):
        return _load_onto_mesh(source, jnp_dtype, system_prompt, placement)
    else:
        model = load_model(source, dtype=jnp_dtype, system_prompt=system_prompt)
    return dataclasses.replace(model, params=placement.params(model.params, model.config))


def _load_onto_mesh(source: str, dtype, system_prompt: str | None, placement: Placement
                    ) -> Model:
    """A checkpoint read straight into the placement's layout (as `load_model` otherwise)."""
    hf_config = load_hf_config(source)
    config = ModelConfig.from_hf_config(hf_config)
    tokenizer = load_tokenizer(source)
    if not config.eos_token_ids and tokenizer.eos_token_id is not None:
        config = dataclasses.replace(config, eos_token_ids=(tokenizer.eos_token_id,))
    params = load_sharded_params(source, config, placement.mesh, dtype=dtype,
                                 rules=placement.rules)
    return Model(config=config, params=params, tokenizer=tokenizer,
                 chat=ChatFormat(tokenizer, system_prompt, context_length=config.max_context),
                 hf_config=hf_config,
                 source=str(source))
