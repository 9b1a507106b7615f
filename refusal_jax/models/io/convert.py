"""Declarative mapping between Hugging Face state dicts and our `Params`.

`weight_map(config)` is the single table: one `WeightRule` per parameter leaf, naming the HF key
(with `{i}` for the layer index) and whether the matrix is transposed. Loading and export both
read it, so a new family is a new table entry, not new code. Loading collects every missing,
unexpected, mis-shaped and non-float (e.g. int32) tensor and reports them together in one
error (the first `MAX_LISTED_PROBLEMS` of them, and the count).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.params import LayerParams, Params, param_specs


@dataclasses.dataclass(frozen=True)
class WeightRule:
    """Where one parameter leaf lives in a Hugging Face checkpoint."""

    path: str  # "embed", "layers.q_proj", ...
    hf_key: str  # "model.layers.{i}.self_attn.q_proj.weight"; {i} marks a stacked layer weight
    transpose: bool = False  # HF nn.Linear stores (out, in); we store (in, out)

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_key


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the model config."""


def weight_map(config: ModelConfig) -> list[WeightRule]:
    """The conversion table for `config`'s family (only the leaves this config has)."""
    attn = "model.layers.{i}.self_attn."
    block = "model.layers.{i}."
    rules = [
        WeightRule("embed", "model.embed_tokens.weight"),
        WeightRule("final_norm", "model.norm.weight"),
        WeightRule("lm_head", "lm_head.weight", transpose=True),
        WeightRule("layers.attn_norm", block + "input_layernorm.weight"),
        WeightRule("layers.q_proj", attn + "q_proj.weight", transpose=True),
        WeightRule("layers.k_proj", attn + "k_proj.weight", transpose=True),
        WeightRule("layers.v_proj", attn + "v_proj.weight", transpose=True),
        WeightRule("layers.o_proj", attn + "o_proj.weight", transpose=True),
        WeightRule("layers.q_bias", attn + "q_proj.bias"),
        WeightRule("layers.k_bias", attn + "k_proj.bias"),
        WeightRule("layers.v_bias", attn + "v_proj.bias"),
        WeightRule("layers.gate_proj", block + "mlp.gate_proj.weight", transpose=True),
        WeightRule("layers.up_proj", block + "mlp.up_proj.weight", transpose=True),
        WeightRule("layers.down_proj", block + "mlp.down_proj.weight", transpose=True),
    ]
    if config.post_norms:  # Gemma2 renames: its post_attention_layernorm is a post-norm
        rules += [
            WeightRule("layers.post_attn_norm", block + "post_attention_layernorm.weight"),
            WeightRule("layers.mlp_norm", block + "pre_feedforward_layernorm.weight"),
            WeightRule("layers.post_mlp_norm", block + "post_feedforward_layernorm.weight"),
        ]
    else:
        rules.append(WeightRule("layers.mlp_norm", block + "post_attention_layernorm.weight"))
    present = _flatten(param_specs(config))
    return [r for r in rules if r.path in present]


def _flatten(tree: Params) -> dict[str, object]:
    """{"embed": ..., "layers.q_proj": ...} for the leaves that are not None."""
    flat = {k: v for k, v in vars(tree).items() if k != "layers" and v is not None}
    flat.update({f"layers.{k}": v for k, v in vars(tree.layers).items() if v is not None})
    return flat


def _unflatten(flat: Mapping[str, object]) -> Params:
    layer_fields = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("layers.")}
    top = {k: v for k, v in flat.items() if not k.startswith("layers.")}
    return Params(layers=LayerParams(**layer_fields), **top)


def params_from_hf(config: ModelConfig, state_dict: Mapping[str, np.ndarray],
                   dtype=jnp.float32) -> Params:
    """Converts an HF-named state dict into `Params`, reporting every mismatch at once."""
    specs = _flatten(param_specs(config))
    problems: list[str] = []
    used: set[str] = set()
    flat: dict[str, np.ndarray] = {}
    for rule in weight_map(config):
        spec = specs[rule.path]
        keys = ([rule.hf_key.format(i=i) for i in range(config.n_layers)] if rule.stacked
                else [rule.hf_key])
        expected = spec.shape[1:] if rule.stacked else spec.shape
        tensors = []
        for key in keys:
            if key not in state_dict:
                problems.append(f"missing tensor {key} (expected shape {hf_shape(expected, rule)})")
                continue
            used.add(key)
            tensor = np.asarray(state_dict[key])
            if not _is_float(tensor.dtype):
                problems.append(f"tensor {key} has dtype {tensor.dtype}, not floating point (a "
                                "quantised or damaged checkpoint; dequantise it to float first)")
                continue
            tensor = tensor.T if rule.transpose else tensor
            if tensor.shape != expected:
                problems.append(f"tensor {key} has shape {hf_shape(tensor.shape, rule)}, "
                                f"expected {hf_shape(expected, rule)}")
                continue
            tensors.append(tensor)
        if len(tensors) == len(keys):
            stacked = np.stack(tensors) if rule.stacked else tensors[0]
            flat[rule.path] = jnp.asarray(stacked, dtype=dtype)
    tied_copy = {"lm_head.weight"} if config.tie_embeddings else set()
    unexpected = sorted(k for k in set(state_dict) - used - tied_copy
                        if not k.endswith(NON_PARAMETER_SUFFIXES))
    problems += [f"unexpected tensor {key}" for key in unexpected]
    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise CheckpointMismatchError(
            f"checkpoint does not match the {config.family} config "
            f"({config.n_layers} layers, d_model={config.d_model}); {len(problems)} problem(s):\n  "
            + "\n  ".join(shown))
    return _unflatten(flat)


# Problems listed in a CheckpointMismatchError (the count says how many there are).
MAX_LISTED_PROBLEMS = 40


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


# Buffers that older checkpoints carry but that are not parameters.
NON_PARAMETER_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_shape(shape: tuple[int, ...], rule: WeightRule) -> tuple[int, ...]:
    return tuple(reversed(shape)) if rule.transpose else tuple(shape)


def params_to_hf(config: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """Exports `Params` as an HF-named state dict of float32 numpy arrays."""
    flat = _flatten(params)
    state_dict = {}
    for rule in weight_map(config):
        value = np.asarray(jax.device_get(flat[rule.path]), dtype=np.float32)
        if rule.stacked:
            for i in range(config.n_layers):
                state_dict[rule.hf_key.format(i=i)] = _maybe_t(value[i], rule)
        else:
            state_dict[rule.hf_key] = _maybe_t(value, rule)
    return state_dict


def _maybe_t(x: np.ndarray, rule: WeightRule) -> np.ndarray:
    return np.ascontiguousarray(x.T) if rule.transpose else x
