"""The transformers tokenizer of a model source (HF directory, hub id or GGUF file).

Sources are those of refusal_jax.models.io.checkpoints. Every tokenizer returned pads on the left
(the forward derives positions from left padding) and has a pad token: its own, else its eos.

A GGUF's tokenizer is built from its `tokenizer.*` metadata the way transformers'
`AutoTokenizer.from_pretrained(directory, gguf_file=...)` builds it, but without torch: that path
reads the file with transformers.integrations.gguf.reader, which imports torch. We read the
metadata with the `gguf` package instead and hand it to the same, torch-free, converter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

from refusal_jax.models.io.checkpoints import TOKENIZER_PATTERNS, Source, locate_source
from refusal_jax.models.io.gguf import open_gguf

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# tokenizer attribute -> the GGUF key holding its token id (transformers' get_gguf_tokenizer).
_SPECIAL_TOKEN_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def load_tokenizer(source: Source, *, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of `source`, padding on the left, with a pad token."""
    local = locate_source(source, gguf_file=gguf_file, patterns=TOKENIZER_PATTERNS)
    if local.gguf_path is not None:
        tokenizer = _gguf_tokenizer(local.gguf_path)
    elif any((local.directory / name).is_file() for name in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(local.directory)
    else:
        raise FileNotFoundError(
            f"{local.directory} has no tokenizer files (expected one of {list(_TOKENIZER_FILES)}); "
            "save one there with tokenizer.save_pretrained, or load a GGUF with gguf_file=."
        )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"the tokenizer of {str(source)!r} has neither a pad nor an eos token; set "
                "pad_token or eos_token in its tokenizer_config.json."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _gguf_tokenizer(gguf_path: Path) -> PreTrainedTokenizerFast:
    """The tokenizer a GGUF file's metadata describes, without importing torch.

    Mirrors transformers' `get_gguf_tokenizer` (metadata -> tokenizer dict and tokenizer config)
    and `TokenizersBackend.__init__(gguf_file=...)` (convert_gguf_tokenizer, then the config as
    keyword arguments): same vocabulary, merges, added tokens, bos/eos/unk/pad tokens,
    add_bos_token/add_eos_token and chat template.
    """
    metadata = _tokenizer_metadata(gguf_path)
    if "tokenizer.ggml.tokens" not in metadata:
        raise ValueError(
            f"{gguf_path} has no tokenizer.ggml.tokens metadata, so it holds no tokenizer; load "
            "the tokenizer from the model's Hugging Face directory or hub id instead."
        )
    tokenizer_dict = _renamed(metadata, GGUF_TOKENIZER_MAPPING["tokenizer"])
    tokenizer_config = _renamed(metadata, GGUF_TOKENIZER_MAPPING["tokenizer_config"])
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary whose file does not say otherwise.
        tokenizer_config.setdefault("add_bos_token", True)
    elif tokenizer_dict.get("tokenizer_type") == "gemma4":
        # As transformers: the reference tokenizer adds none, Gemma 4's chat template writes <bos>.
        tokenizer_config["add_bos_token"] = False
    tokens = tokenizer_dict["tokens"]
    for name, key in _SPECIAL_TOKEN_IDS.items():
        tokenizer_config[name] = tokens[metadata[key]] if key in metadata else None
    backend, extra_kwargs = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        name_or_path=str(gguf_path.parent),
        **tokenizer_config,
        **extra_kwargs,
    )


def _tokenizer_metadata(gguf_path: Path) -> dict[str, Any]:
    """`general.architecture` and every `tokenizer.*` value of the file, as Python values."""
    reader = open_gguf(gguf_path)
    metadata = {}
    for name, field in reader.fields.items():
        if name == "general.architecture" or name.startswith("tokenizer."):
            value = field.contents()
            metadata[name] = value.item() if isinstance(value, np.generic) else value
    return metadata


def _renamed(metadata: dict[str, Any], renames: dict[str, str]) -> dict[str, Any]:
    """The `tokenizer.{key}` values present in `metadata`, under transformers' names."""
    return {
        name: metadata[f"tokenizer.{key}"]
        for key, name in renames.items()
        if f"tokenizer.{key}" in metadata
    }
