"""The transformers tokenizer of a model source (HF directory, hub id or GGUF file).

Sources are those of refusal_jax.models.checkpoints. Every tokenizer returned pads on the left
(the forward derives positions from left padding) and has a pad token: its own, else its eos.
"""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from refusal_jax.models.checkpoints import TOKENIZER_PATTERNS, Source, locate_source

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(source: Source, *, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of `source`, padding on the left, with a pad token."""
    local = locate_source(source, gguf_file=gguf_file, patterns=TOKENIZER_PATTERNS)
    if local.gguf_path is not None:
        tokenizer = AutoTokenizer.from_pretrained(local.directory, gguf_file=local.gguf_path.name)
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
