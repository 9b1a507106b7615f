"""Write a folded model (``folding``) as a Hugging Face checkpoint that runs without hooks."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.io.checkpoints import Source, save_hf_checkpoint
from refusal_jax.models.io.convert import params_to_hf
from refusal_jax.models.params import Params


def export_hf_checkpoint(
    directory: Source,
    params: Params,
    config: ModelConfig,
    *,
    hf_config: Mapping[str, Any],
    tokenizer: Any = None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write folded ``(params, config)`` as a Hugging Face safetensors directory.

    ``hf_config`` is the original checkpoint's config.json dict (``checkpoints.load_hf_config``);
    its ``tie_word_embeddings`` is set from ``config`` (folding the embedding unties it). Tensors
    are written as ``convert.params_to_hf`` gives them (float32).
    """
    state_dict = params_to_hf(config, params)
    exported_config = dict(hf_config, tie_word_embeddings=config.tie_embeddings)
    return save_hf_checkpoint(directory, exported_config, state_dict, tokenizer=tokenizer,
                              max_shard_bytes=max_shard_bytes, overwrite=overwrite)
