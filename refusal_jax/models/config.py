"""Static model configuration: one dataclass for every supported decoder family.

The config is hashable (it is a static argument of every jitted function). Family differences are
fields, not subclasses: the forward pass in `core.py` reads them, so adding a Llama-like family is
usually a new entry in `FAMILIES` and, at most, a new field.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

# HF `model_type` -> our family. Llama-like models (Llama-2/3, Yi, SmolLM2, Mistral) share one.
FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "yi": "llama",
    "qwen2": "qwen2",
    "gemma": "gemma",
    "gemma2": "gemma2",
}


# Sane bounds of an HF config's sizes, checked before anything is built from them (a crafted
# config of 1e10 layers must not allocate per-layer tables): (key, low, high).
HF_CONFIG_BOUNDS = (
    ("num_hidden_layers", 1, 1024),
    ("hidden_size", 1, 1 << 17),
    ("intermediate_size", 1, 1 << 20),
    ("num_attention_heads", 1, 4096),
    ("num_key_value_heads", 1, 4096),
    ("head_dim", 1, 4096),
    ("vocab_size", 1, 1 << 22),
    ("max_position_embeddings", 1, 1 << 24),
    ("sliding_window", 0, 1 << 24),
)
_REQUIRED_HF_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size",
                     "num_attention_heads", "vocab_size")


class UnsupportedModelError(ValueError):
    """Raised for an architecture refusal_jax does not implement."""


def check_hf_config(hf: Mapping[str, Any], origin: str = "HF config", *,
                    complete: bool = True) -> None:
    """Raises ValueError naming ``origin`` (e.g. the config file) when a size of the config is
    not an integer or outside ``HF_CONFIG_BOUNDS``, or (``complete``) missing."""
    if not isinstance(hf, Mapping):
        raise ValueError(f"{origin}: expected a JSON object, got {type(hf).__name__}")
    for key in _REQUIRED_HF_KEYS if complete else ():
        if key not in hf:
            raise ValueError(f"{origin}: {key} is missing; the config is not a complete model")
    for key, low, high in HF_CONFIG_BOUNDS:
        value = hf.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ValueError(f"{origin}: {key} = {shown} is not an integer in [{low}, {high}]; "
                             "the file is damaged or not a supported model")
    if (not hf.get("head_dim") and "hidden_size" in hf and "num_attention_heads" in hf
            and hf["hidden_size"] % hf["num_attention_heads"]):
        raise ValueError(f"{origin}: hidden_size = {hf['hidden_size']} is not a multiple of "
                         f"num_attention_heads = {hf['num_attention_heads']} and no head_dim "
                         "is given")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and family switches of a decoder-only chat model."""

    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_context: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Hashable rope scaling description, e.g. (("rope_type", "llama3"), ("factor", 8.0), ...).
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    tie_embeddings: bool = False
    qkv_bias: bool = False
    activation: str = "silu"  # "silu" or "gelu_tanh"
    norm_weight_offset: float = 0.0  # Gemma norms scale by (1 + w)
    scale_embeddings: bool = False  # Gemma multiplies embeddings by sqrt(d_model)
    post_norms: bool = False  # Gemma2 normalises attention and MLP outputs
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_scale: float | None = None  # attention scale; None means head_dim ** -0.5
    # Per-layer sliding window (0 = global attention), e.g. Gemma2 alternates local and global.
    sliding_windows: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.family not in set(FAMILIES.values()):
            raise UnsupportedModelError(
                f"unknown family {self.family!r}; supported: {sorted(set(FAMILIES.values()))}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        self.rope_inverse_frequencies()  # unsupported rope scaling fails here, not inside jit
        if self.sliding_windows and len(self.sliding_windows) != self.n_layers:
            raise ValueError(
                f"sliding_windows has {len(self.sliding_windows)} entries for "
                f"{self.n_layers} layers"
            )

    @property
    def attention_scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim**-0.5

    def layer_windows(self) -> np.ndarray:
        """Sliding window of each layer as an int32 array (0 = global attention)."""
        if not self.sliding_windows:
            return np.zeros(self.n_layers, np.int32)
        return np.asarray(self.sliding_windows, np.int32)

    def rope_inverse_frequencies(self) -> np.ndarray:
        """RoPE inverse frequencies (head_dim // 2,), with the config's scaling applied."""
        exponents = (
            np.arange(0, self.head_dim, 2, dtype=np.int64).astype(np.float32) / self.head_dim
        )
        inv_freq = 1.0 / (self.rope_theta**exponents)
        scaling = dict(self.rope_scaling)
        kind = scaling.get("rope_type", "default")
        if kind == "default":
            return inv_freq
        if kind == "linear":
            return inv_freq / scaling["factor"]
        if kind == "llama3":
            return llama3_inverse_frequencies(inv_freq, scaling)
        raise UnsupportedModelError(
            f"rope scaling {kind!r} is not implemented; supported: default, linear, llama3"
        )

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Builds the config from a Hugging Face `config.json` dict (its architecture checked
        first, then its sizes by `check_hf_config`)."""
        model_type = hf.get("model_type") if isinstance(hf, Mapping) else None
        if model_type not in FAMILIES:
            raise UnsupportedModelError(
                f"architecture {model_type!r} is not supported; supported model_type values: "
                f"{sorted(FAMILIES)}. Add a family in refusal_jax/models/config.py "
                "(see WORKSPACE.md)."
            )
        check_hf_config(hf)
        family = FAMILIES[model_type]
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope.update(hf.get("rope_scaling") or {})
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope = {k: v for k, v in rope.items() if v is not None}
        eos = hf.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        gemma = family in ("gemma", "gemma2")
        gemma2 = family == "gemma2"
        return cls(
            family=family,
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            d_ff=hf["intermediate_size"],
            max_context=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-6 if gemma else 1e-5),
            rope_theta=float(rope_theta),
            rope_scaling=tuple(sorted(rope.items()))
            if rope.get("rope_type", "default") != "default"
            else (),
            tie_embeddings=hf.get("tie_word_embeddings", gemma),
            qkv_bias=family == "qwen2",
            activation=_activation(hf, model_type),
            norm_weight_offset=1.0 if gemma else 0.0,
            scale_embeddings=gemma,
            post_norms=gemma2,
            attn_softcap=hf.get("attn_logit_softcapping", 50.0) if gemma2 else None,
            final_softcap=hf.get("final_logit_softcapping", 30.0) if gemma2 else None,
            query_scale=hf.get("query_pre_attn_scalar", 256) ** -0.5 if gemma2 else None,
            sliding_windows=_sliding_windows(hf, model_type),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
        )


def _activation(hf: Mapping[str, Any], model_type: str) -> str:
    # Gemma2 reads `hidden_activation`; the others read `hidden_act`. Gemma-1's released configs
    # say "gelu", which transformers maps to the tanh approximation, and so do we.
    if model_type == "gemma2":
        name = hf.get("hidden_activation", "gelu_pytorch_tanh")
    else:
        name = hf.get("hidden_act", "gelu_pytorch_tanh" if model_type == "gemma" else "silu")
    if model_type == "gemma" and name == "gelu":
        name = "gelu_pytorch_tanh"
    if name in ("silu", "swish"):
        return "silu"
    if name in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new"):
        return "gelu_tanh"
    raise UnsupportedModelError(f"MLP activation {name!r} is not supported (silu, gelu_tanh)")


def _sliding_windows(hf: Mapping[str, Any], model_type: str) -> tuple[int, ...]:
    window = hf.get("sliding_window", 4096 if model_type == "gemma2" else None)
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    if not window:
        return ()
    layer_types = hf.get("layer_types")
    n_layers = hf["num_hidden_layers"]
    if layer_types is None and model_type == "gemma2":
        layer_types = [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)
        ]
    if layer_types is None and model_type == "qwen2":
        first_sliding = hf.get("max_window_layers", n_layers)
        layer_types = [
            "sliding_attention" if i >= first_sliding else "full_attention"
            for i in range(n_layers)
        ]
    if layer_types is None:
        return (int(window),) * n_layers
    return tuple(int(window) if t == "sliding_attention" else 0 for t in layer_types)


def llama3_inverse_frequencies(inv_freq: np.ndarray, scaling: Mapping[str, Any]) -> np.ndarray:
    """Llama 3.1's rope scaling of the inverse frequencies (transformers' and llama.cpp's)."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)
