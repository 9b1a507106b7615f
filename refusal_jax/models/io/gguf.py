"""GGUF (llama.cpp) checkpoints -> a Hugging Face config dict and HF-named float tensors.

Supported GGUF architectures: llama (also SmolLM2, Mistral, Yi, which llama.cpp converts as
llama), qwen2, gemma, gemma2.

llama.cpp's convert_hf_to_gguf.py changes HF tensors in three ways, undone here:
  * names: `model.layers.3.self_attn.q_proj.weight` becomes `blk.3.attn_q.weight`; the table
    below is the inverse of gguf.TensorNameMap for these four families;
  * llama only: the rows of Q and K (weights and biases) are permuted per head from HF's
    rotate-half order to llama.cpp's interleaved rotary order (`LlamaModel.permute`); undone
    exactly as transformers' LlamaTensorProcessor does;
  * gemma and gemma2: every `*norm.weight` is stored as 1 + w (llama.cpp's RMSNorm has no
    offset); we subtract 1, as transformers' Gemma2TensorProcessor does (transformers' GGUF
    loader does not support gemma 1, whose conversion is the same).
Quantised tensors are dequantised with gguf.quants.dequantize, which returns float32.

Llama 3.1 / 3.2 files carry their "llama3" rope scaling as a tensor, `rope_freqs` (llama.cpp's
per-frequency divisors of the rotary inverse frequencies), not as metadata. It is read back into
the HF `rope_scaling` dict that produces the same frequencies (`_llama3_rope_scaling`), so the
config stays one transformers can load; files whose divisors follow no llama3 curve are refused.

Every error names the file. A file is checked before the reader allocates anything for it:
its header's tensor and metadata counts must fit in the file's size, and the sizes it declares
(layers, heads, widths) must lie in `models.config.HF_CONFIG_BOUNDS`.

GGUF stores float metadata as float32; the config dict holds the shortest decimal that rounds to
that float32 (rms_norm_eps 1e-05 rather than 9.999999747378752e-06), i.e. the value the HF
config had.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from numpy.typing import DTypeLike

from refusal_jax.models.config import check_hf_config, llama3_inverse_frequencies

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma", "gemma2")
_SUPPORTED_DESCRIPTION = "llama (incl. SmolLM2, Mistral, Yi), qwen2, gemma, gemma2"

_HF_CLASS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma2 has four norms per block; llama.cpp's `ffn_norm` is the norm *before* its MLP.
_GEMMA2_BLOCK_TENSORS = {
    **_BLOCK_TENSORS,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_NAME = re.compile(r"(\w+)\.(weight|bias)")

# llama.cpp's defaults for gemma2 metadata that a GGUF may omit (llama-model.cpp).
_GEMMA2_DEFAULTS = {
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "attention.sliding_window": 4096,
}
_DEFAULT_ROPE_THETA = 10000.0
_REQUIRED = object()  # _metadata's default: the key must be present.
_ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling, read into the config (not a weight)
# llama.cpp's default original context of llama3 rope scaling (convert_hf_to_gguf.py); any value
# gives the same frequencies, since the curve's parameters are fitted to the file's divisors.
_LLAMA3_ORIGINAL_CONTEXT = 8192


# The fewest bytes a tensor description (name length, dimension count, one dimension, type,
# offset) and a metadata entry (key length, type, a one-byte value) take in a GGUF header.
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8
_MIN_KV_BYTES = 8 + 4 + 1
_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata count
_READER_ERRORS = (ValueError, IndexError, KeyError, OverflowError, struct.error, OSError,
                  UnicodeDecodeError)


class GGUFError(ValueError):
    """A GGUF file that cannot be read as a supported model; the message names the file."""


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """A reader of the GGUF file at ``path``, after checking that its header's counts fit in
    the file (a crafted count must not make the reader allocate); GGUFError naming the file
    when the file is not a readable GGUF."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as stream:
        head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size or head[:4] != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (no GGUF header); it is truncated or "
                        "another format")
    _, version, n_tensors, n_kv = _HEADER.unpack(head)
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    needed = _HEADER.size + n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES
    if needed > size:
        raise GGUFError(f"{path}: the header declares {n_tensors} tensors and {n_kv} metadata "
                        f"entries, which need at least {needed} bytes, but the file has {size}; "
                        "it is truncated or damaged")
    try:
        return gguf.GGUFReader(path)
    except _READER_ERRORS as error:
        raise GGUFError(f"{path} cannot be read as GGUF ({type(error).__name__}: {error}); it "
                        "is truncated or damaged") from None


def read_gguf_config(reader: gguf.GGUFReader) -> dict[str, Any]:
    """The HF config dict (as in a hub config.json) described by a GGUF file's metadata;
    GGUFError naming the file when a value is missing, unsupported or out of bounds."""
    try:
        return _read_gguf_config(reader)
    except GGUFError:
        raise
    except _READER_ERRORS as error:
        raise GGUFError(f"{_file_name(reader)}: {error}") from None


def _file_name(reader: gguf.GGUFReader) -> str:
    return str(getattr(reader.data, "filename", None) or "GGUF file")


def _read_gguf_config(reader: gguf.GGUFReader) -> dict[str, Any]:
    arch = _metadata(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported architectures: "
            f"{_SUPPORTED_DESCRIPTION}."
        )
    rope_scaling = _metadata(reader, f"{arch}.rope.scaling.type", default="none")
    if rope_scaling != "none":
        raise ValueError(
            f"GGUF rope scaling {rope_scaling!r} is not supported; load the model's "
            "Hugging Face safetensors checkpoint instead."
        )

    def arch_value(key: str, default: Any = _REQUIRED) -> Any:
        return _metadata(reader, f"{arch}.{key}", default=default)

    hidden_size = arch_value("embedding_length")
    num_heads = arch_value("attention.head_count")
    num_kv_heads = arch_value("attention.head_count_kv", default=num_heads)
    if not isinstance(num_kv_heads, int):
        raise ValueError(f"per-layer attention.head_count_kv {num_kv_heads} is not supported.")
    valid_heads = isinstance(num_heads, int) and num_heads > 0  # else refused below
    head_dim = arch_value(
        "attention.key_length",
        default=arch_value("rope.dimension_count",
                           default=hidden_size // num_heads if valid_heads else None),
    )
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(
            "GGUF file has no token_embd.weight tensor; the file is not a complete model."
        )
    config: dict[str, Any] = {
        "architectures": [_HF_CLASS[arch]],
        "model_type": arch,
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),  # GGUF shapes list [D, V].
        "hidden_size": hidden_size,
        "intermediate_size": arch_value("feed_forward_length"),
        "num_hidden_layers": arch_value("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": arch_value("context_length"),
        "rms_norm_eps": _shortest_float32(arch_value("attention.layer_norm_rms_epsilon")),
        "rope_theta": _shortest_float32(arch_value("rope.freq_base", default=_DEFAULT_ROPE_THETA)),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    check_hf_config(config, f"{_file_name(reader)} (GGUF metadata, HF names)")
    for gguf_key, hf_key in (
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("padding", "pad_token_id"),
    ):
        token_id = _metadata(reader, f"tokenizer.ggml.{gguf_key}_token_id", default=None)
        if token_id is not None:
            config[hf_key] = token_id

    if _ROPE_FREQS in tensors:
        if arch != "llama":
            raise ValueError(
                f"GGUF tensor {_ROPE_FREQS} is supported for llama only, not {arch!r}; "
                "load the model's Hugging Face safetensors checkpoint instead."
            )
        scaling = _llama3_rope_scaling(
            gguf.quants.dequantize(tensors[_ROPE_FREQS].data, tensors[_ROPE_FREQS].tensor_type),
            rope_theta=config["rope_theta"], head_dim=head_dim,
            original_context=arch_value("rope.scaling.original_context_length",
                                        default=_LLAMA3_ORIGINAL_CONTEXT))
        if scaling is not None:
            config["rope_scaling"] = scaling
    if arch in ("llama", "qwen2"):
        config["hidden_act"] = "silu"
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = False
    if arch in ("gemma", "gemma2"):
        # Hub Gemma configs have both keys; transformers' Gemma reads the first, Gemma2 the second.
        config["hidden_act"] = config["hidden_activation"] = "gelu_pytorch_tanh"
    if arch == "gemma2":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            config[key] = _shortest_float32(arch_value(key, default=_GEMMA2_DEFAULTS[key]))
        config["sliding_window"] = arch_value(
            "attention.sliding_window", default=_GEMMA2_DEFAULTS["attention.sliding_window"]
        )
        # llama.cpp scales queries by 1/sqrt(hidden / heads) for the 46-layer (27B) model and by
        # 1/sqrt(head_dim) otherwise; HF stores the same choice as query_pre_attn_scalar.
        is_27b = config["num_hidden_layers"] == 46
        config["query_pre_attn_scalar"] = hidden_size // num_heads if is_27b else head_dim
    return config


def iter_gguf_tensors(
    reader: gguf.GGUFReader, config: dict[str, Any], dtype: DTypeLike | None = np.float32
) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) for every tensor of `reader`, one at a time, in file order.

    `config` is `read_gguf_config(reader)`. Arrays are fresh (not views of the memory-mapped
    file) and have `dtype` (None: the dequantised float32). Unknown tensor names are reported
    all together before anything is read.
    """
    arch = config["model_type"]
    hf_names = {tensor.name: _hf_tensor_name(tensor.name, arch) for tensor in reader.tensors
                if tensor.name != _ROPE_FREQS}  # read into config["rope_scaling"]
    unknown = sorted(name for name, hf_name in hf_names.items() if hf_name is None)
    if unknown:
        raise GGUFError(f"{_file_name(reader)}: tensors with no Hugging Face {arch} "
                        f"equivalent: {unknown[:20]}{' ...' if len(unknown) > 20 else ''}.")
    return _dequantised_tensors(
        reader, hf_names, config, np.dtype(np.float32 if dtype is None else dtype)
    )


def _dequantised_tensors(
    reader: gguf.GGUFReader,
    hf_names: dict[str, str | None],
    config: dict[str, Any],
    dtype: np.dtype,
) -> Iterator[tuple[str, np.ndarray]]:
    arch = config["model_type"]
    for tensor in reader.tensors:
        if tensor.name not in hf_names:
            continue
        try:
            weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except _READER_ERRORS + (NotImplementedError,) as error:
            raise GGUFError(f"{_file_name(reader)}: tensor {tensor.name} cannot be read "
                            f"({type(error).__name__}: {error})") from None
        if arch == "llama" and ".attn_q." in tensor.name:
            weights = _undo_rotary_permutation(weights, config["num_attention_heads"])
        elif arch == "llama" and ".attn_k." in tensor.name:
            weights = _undo_rotary_permutation(weights, config["num_key_value_heads"])
        elif arch in ("gemma", "gemma2") and tensor.name.endswith("norm.weight"):
            weights = weights - 1
        yield hf_names[tensor.name], np.array(weights, dtype=dtype)


def _llama3_rope_scaling(divisors: np.ndarray, *, rope_theta: float, head_dim: int,
                         original_context: int) -> dict[str, Any] | None:
    """The HF "llama3" rope_scaling whose inverse frequencies are llama.cpp's `rope_freqs`
    (None when every divisor is 1: no scaling).

    llama.cpp divides the inverse frequency `f_i` by `d_i`: 1 at short wavelengths, `factor` at
    long ones and, between, `1 / ((1 - s_i) / factor + s_i)` with `s_i` linear in `f_i`
    (`s = (original_context * f / (2 pi) - low) / (high - low)`). The line through the smoothed
    divisors gives (low, high) for the chosen original context; the result is checked by
    recomputing every frequency. `factor` is read as the largest divisor, so a curve on which no
    frequency is fully scaled is not recognised. Raises ValueError when fewer than two divisors
    are smoothed (the line is undetermined) or the divisors follow no such curve.
    """
    divisors = np.asarray(divisors, np.float64).reshape(-1)
    inverse = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if divisors.shape != inverse.shape or not (divisors >= 1.0 - 1e-6).all():
        raise ValueError(f"GGUF {_ROPE_FREQS} holds {divisors.size} divisors; expected "
                         f"head_dim / 2 = {inverse.size}, all >= 1. The file is not a llama3 "
                         "rope scaling; load the model's Hugging Face safetensors checkpoint "
                         "instead.")
    factor = float(divisors.max())
    if factor <= 1.0 + 1e-6:
        return None
    smoothed = (divisors > 1.0 + 1e-6) & (divisors < factor * (1.0 - 1e-6))
    if smoothed.sum() < 2:
        raise ValueError(f"GGUF {_ROPE_FREQS} smooths {smoothed.sum()} frequencies; reading it as "
                         "llama3 rope scaling needs at least 2. Load the model's Hugging Face "
                         "safetensors checkpoint instead.")
    share = (1.0 / divisors[smoothed] - 1.0 / factor) / (1.0 - 1.0 / factor)  # s_i
    slope, intercept = np.polyfit(inverse[smoothed], share, 1)
    span = original_context / (2 * math.pi * slope)  # high - low
    scaling = {"rope_type": "llama3", "factor": float(f"{factor:.6g}"),
               "low_freq_factor": float(f"{-intercept * span:.6g}"),
               "high_freq_factor": float(f"{(1.0 - intercept) * span:.6g}"),
               "original_max_position_embeddings": int(original_context)}
    expected = inverse.astype(np.float32) / divisors.astype(np.float32)
    found = llama3_inverse_frequencies(inverse.astype(np.float32), scaling)
    if not np.allclose(found, expected, rtol=1e-5, atol=0.0):
        raise ValueError(f"GGUF {_ROPE_FREQS} does not follow llama3 rope scaling with its "
                         f"largest divisor as the factor (closest: {scaling}); load the "
                         "model's Hugging Face safetensors checkpoint instead.")
    return scaling


def _undo_rotary_permutation(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `LlamaModel.permute` on the rows of Q or K (weight or bias).

    llama.cpp views the rows of each head as [2, head_dim/2] and transposes them to
    [head_dim/2, 2]; we view them as [head_dim/2, 2] and transpose back.
    """
    half_head_dim = weights.shape[0] // num_heads // 2
    rows = weights.reshape(num_heads, half_head_dim, 2, *weights.shape[1:])
    return rows.swapaxes(1, 2).reshape(weights.shape)


def _hf_tensor_name(gguf_name: str, arch: str) -> str | None:
    block_tensors = _GEMMA2_BLOCK_TENSORS if arch == "gemma2" else _BLOCK_TENSORS
    if match := _BLOCK_NAME.fullmatch(gguf_name):
        layer, part, suffix = match.groups()
        if part in block_tensors:
            return f"model.layers.{layer}.{block_tensors[part]}.{suffix}"
    elif match := _GLOBAL_NAME.fullmatch(gguf_name):
        part, suffix = match.groups()
        if part in _GLOBAL_TENSORS:
            return f"{_GLOBAL_TENSORS[part]}.{suffix}"
    return None


def _metadata(reader: gguf.GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(
                f"GGUF metadata key {key!r} is missing; the file is not a complete model."
            )
        return default
    value = field.contents()
    return value.item() if isinstance(value, np.generic) else value


def _shortest_float32(value: float) -> float:
    return float(str(np.float32(value)))
