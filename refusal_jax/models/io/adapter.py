"""Low-rank adapters (LoRA) for the decoder's projection matrices.

Conventions fixed here once:
- An adapter adds `scale * A @ B` to the stacked weights W [L, in, out] of `LayerParams` from
  layer `first_layer` on, with A [L - first_layer, in, r], B [L - first_layer, r, out] and
  scale = alpha / r (Hu et al. 2021). Weights multiply from the left (`x @ W`, see
  `refusal_jax.models.params`), so A reads the input and B writes the output.
- `init_adapter` draws A ~ N(0, 1 / in) and sets B = 0, so a fresh adapter is the identity edit.
- Adapters are merged into the weights (`merge_adapter`) rather than applied in the forward pass:
  the merged `Params` run through the unchanged forward, generation and interventions.
- On disk an adapter is one safetensors file with tensors `<target>.lora_a` and `<target>.lora_b`
  and metadata {"format": "refusal_jax.lora", "alpha", "targets", "first_layer"}.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.params import Params, param_specs

# Matrices of `LayerParams` an adapter may target.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_FORMAT = "refusal_jax.lora"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraAdapter:
    """Low-rank factors per target matrix: a[target] [n, in, r], b[target] [n, r, out] for the
    n layers first_layer, ..., first_layer + n - 1."""

    a: dict[str, jax.Array]
    b: dict[str, jax.Array]
    alpha: float = dataclasses.field(metadata=dict(static=True), default=16.0)
    first_layer: int = dataclasses.field(metadata=dict(static=True), default=0)

    @property
    def targets(self) -> tuple[str, ...]:
        """Adapted matrices in `LORA_TARGETS` order (pytree flattening sorts dict keys)."""
        return tuple(target for target in LORA_TARGETS if target in self.a)

    @property
    def rank(self) -> int:
        return next(iter(self.a.values())).shape[-1]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def num_parameters(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self))


def _check_targets(targets: Sequence[str]) -> tuple[str, ...]:
    if isinstance(targets, str):
        raise ValueError(f"targets must be a sequence of names, got the string {targets!r}; "
                         "wrap it in a tuple")
    targets = tuple(targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if not targets or unknown or len(set(targets)) != len(targets):
        raise ValueError(f"targets must be distinct names from {LORA_TARGETS}, got {targets}")
    return targets


def init_adapter(config: ModelConfig, key: jax.Array, *, rank: int = 8, alpha: float = 16.0,
                 targets: Sequence[str] = LORA_TARGETS, first_layer: int = 0) -> LoraAdapter:
    """A fresh float32 adapter of layers first_layer.. : A ~ N(0, 1/in), B = 0 (merging it
    changes nothing)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if not 0 <= first_layer < config.n_layers:
        raise ValueError(f"first_layer must lie in [0, {config.n_layers}), got {first_layer}")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}")
    targets = _check_targets(targets)
    specs = param_specs(config).layers
    a, b = {}, {}
    for target, k in zip(targets, jax.random.split(key, len(targets))):
        n_layers, fan_in, fan_out = getattr(specs, target).shape
        n_layers -= first_layer
        a[target] = jax.random.normal(k, (n_layers, fan_in, rank), jnp.float32) / np.sqrt(fan_in)
        b[target] = jnp.zeros((n_layers, rank, fan_out), jnp.float32)
    return LoraAdapter(a=a, b=b, alpha=float(alpha), first_layer=first_layer)


def check_compatible(params: Params, adapter: LoraAdapter) -> None:
    """Raises ValueError unless every factor pair fits its target weight in `params`."""
    for target in adapter.targets:
        weight = getattr(params.layers, target)
        a, b = adapter.a[target], adapter.b[target]
        n_layers = weight.shape[0] - adapter.first_layer
        expected_a = (n_layers, weight.shape[1], a.shape[-1])
        expected_b = (n_layers, a.shape[-1], weight.shape[2])
        if a.shape != expected_a or b.shape != expected_b:
            raise ValueError(
                f"adapter factors for {target} have shapes {a.shape} and {b.shape}, but the "
                f"model's {target} is {weight.shape} (expected {expected_a} and {expected_b}); "
                "the adapter was trained for a different model")


def merge_adapter(params: Params, adapter: LoraAdapter) -> Params:
    """Params with `scale * A @ B` added to each target weight (in the weights' dtype).

    Differentiable and jit-compatible (the shape check uses static shapes only)."""
    check_compatible(params, adapter)
    updates = {}
    for target in adapter.targets:
        weight = getattr(params.layers, target)
        delta = jnp.einsum("lir,lro->lio", adapter.a[target].astype(jnp.float32),
                           adapter.b[target].astype(jnp.float32))
        upper = weight[adapter.first_layer:].astype(jnp.float32) + adapter.scale * delta
        updates[target] = jnp.concatenate(
            [weight[:adapter.first_layer], upper.astype(weight.dtype)], axis=0)
    return dataclasses.replace(params, layers=dataclasses.replace(params.layers, **updates))


def save_adapter(path: str | os.PathLike[str], adapter: LoraAdapter, *,
                 dtype: Any = np.float16) -> Path:
    """Writes the adapter as safetensors (factors cast to `dtype`); returns the path."""
    path = Path(path)
    tensors = {}
    for target in adapter.targets:
        tensors[f"{target}.lora_a"] = np.asarray(adapter.a[target], dtype=dtype)
        tensors[f"{target}.lora_b"] = np.asarray(adapter.b[target], dtype=dtype)
    metadata = {"format": _FORMAT, "alpha": repr(adapter.alpha),
                "targets": ",".join(adapter.targets), "first_layer": str(adapter.first_layer)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_adapter(path: str | os.PathLike[str], *, dtype=jnp.float32) -> LoraAdapter:
    """Reads an adapter written by `save_adapter`, factors cast to `dtype`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a refusal_jax LoRA adapter (metadata format "
                         f"{metadata.get('format')!r}, expected {_FORMAT!r})")
    targets = _check_targets(metadata["targets"].split(","))
    tensors = load_file(str(path))
    expected = {f"{t}.lora_{ab}" for t in targets for ab in "ab"}
    if set(tensors) != expected:
        raise ValueError(f"{path} holds tensors {sorted(tensors)}, expected {sorted(expected)}")
    a = {t: jnp.asarray(tensors[f"{t}.lora_a"], dtype) for t in targets}
    b = {t: jnp.asarray(tensors[f"{t}.lora_b"], dtype) for t in targets}
    ranks = {a[t].shape[-1] for t in targets} | {b[t].shape[1] for t in targets}
    if len(ranks) != 1 or any(a[t].ndim != 3 or b[t].ndim != 3 for t in targets):
        raise ValueError(f"{path} has inconsistent factor shapes: "
                         f"{ {t: (a[t].shape, b[t].shape) for t in targets} }")
    return LoraAdapter(a=a, b=b, alpha=float(metadata["alpha"]),
                       first_layer=int(metadata.get("first_layer", 0)))
