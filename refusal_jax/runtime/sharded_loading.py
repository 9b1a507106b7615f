"""A checkpoint read straight into its sharded layout, so no host holds the whole model.

The checkpoint is read one tensor at a time (shard file by shard file), each host transfers
only the slices its own devices hold, and stacked layer weights are filled in place one layer
at a time, so no host ever holds more than one checkpoint tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.io.checkpoints import Source, iter_hf_tensors
from refusal_jax.models.io.convert import (
    NON_PARAMETER_SUFFIXES,
    CheckpointMismatchError,
    WeightRule,
    hf_shape,
    weight_map,
)
from refusal_jax.models.params import Params, param_specs
from refusal_jax.runtime.sharding import (
    DEFAULT_RULES,
    Rules,
    leaves_by_path,
    param_shardings,
    put_global,
    replace_leaves_by_path,
)


def load_sharded_params(source: Source, config: ModelConfig, mesh: Mesh, *, dtype=jnp.float32,
                        rules: Rules = DEFAULT_RULES, gguf_file: str | None = None) -> Params:
    """Loads a checkpoint tensor by tensor, shard file by shard file, into sharded `Params`.

    Uses convert.py's `weight_map` (HF name, transpose) for every tensor. Each process reads the
    checkpoint's tensors one at a time and transfers only the slices its own devices hold
    (`jax.make_array_from_callback`); a stacked layer weight is allocated sharded and filled in
    place, one layer at a time, and no tensor outlives its turn. Every missing, unexpected or
    mis-shaped tensor is collected and reported together in one `CheckpointMismatchError`, as
    `params_from_hf` does.
    """
    loader = _ShardedLoader(config, mesh, rules, jnp.dtype(dtype))
    for name, tensor in iter_hf_tensors(source, gguf_file=gguf_file, dtype=None):
        loader.add(name, tensor)
        del tensor  # the next tensor is read only once this one is gone
    return loader.finish()


class _ShardedLoader:
    """Places checkpoint tensors, one at a time, into their slots of sharded `Params`."""

    def __init__(self, config: ModelConfig, mesh: Mesh, rules: Rules, dtype: jnp.dtype):
        self.config, self.mesh, self.dtype = config, mesh, dtype
        self.specs = leaves_by_path(param_specs(config))
        self.shardings = leaves_by_path(param_shardings(config, mesh, rules))
        self.table: dict[str, tuple[WeightRule, int | None]] = {}
        for rule in weight_map(config):
            if rule.stacked:
                self.table.update({rule.hf_key.format(i=i): (rule, i)
                                   for i in range(config.n_layers)})
            else:
                self.table[rule.hf_key] = (rule, None)
        self.loaded: dict[str, jax.Array] = {}
        self.filled: dict[str, set[int]] = {}
        self.seen: set[str] = set()  # checkpoint names found, whether they fit or not
        self.problems: list[str] = []

    def add(self, name: str, tensor: np.ndarray) -> None:
        if name not in self.table:
            tied_copy = self.config.tie_embeddings and name == "lm_head.weight"
            if not (tied_copy or name.endswith(NON_PARAMETER_SUFFIXES)):
                self.problems.append(f"unexpected tensor {name}")
            return
        self.seen.add(name)
        rule, layer = self.table[name]
        full_shape = self.specs[rule.path].shape
        expected = full_shape if layer is None else full_shape[1:]
        value = tensor.T if rule.transpose else tensor
        if value.shape != expected:
            self.problems.append(f"tensor {name} has shape {tensor.shape}, expected "
                                 f"{hf_shape(expected, rule)}")
            return
        value = value.astype(self.dtype)
        sharding = self.shardings[rule.path]
        if layer is None:
            self.loaded[rule.path] = put_global(value, sharding)
            return
        if rule.path not in self.loaded:
            self.loaded[rule.path] = _sharded_zeros(full_shape, self.dtype, sharding)
            self.filled[rule.path] = set()
        layer_value = put_global(value, NamedSharding(self.mesh, PartitionSpec(*sharding.spec[1:])))
        self.loaded[rule.path] = _layer_setter(sharding)(self.loaded[rule.path], layer_value,
                                                         jnp.int32(layer))
        self.filled[rule.path].add(layer)

    def finish(self) -> Params:
        for hf_key, (rule, layer) in self.table.items():
            if hf_key in self.seen:
                continue
            full_shape = self.specs[rule.path].shape
            shape = full_shape if layer is None else full_shape[1:]
            self.problems.append(f"missing tensor {hf_key} (expected shape "
                                 f"{hf_shape(shape, rule)})")
        if self.problems:
            config = self.config
            raise CheckpointMismatchError(
                f"checkpoint does not match the {config.family} config ({config.n_layers} layers, "
                f"d_model={config.d_model}); {len(self.problems)} problem(s):\n  "
                + "\n  ".join(self.problems))
        return replace_leaves_by_path(param_specs(self.config), self.loaded)


def _sharded_zeros(shape: tuple[int, ...], dtype: jnp.dtype, sharding: NamedSharding) -> jax.Array:
    return _zeros_maker(shape, dtype, sharding)()


@functools.lru_cache(maxsize=None)
def _zeros_maker(shape: tuple[int, ...], dtype: jnp.dtype,
                 sharding: NamedSharding) -> Callable[[], jax.Array]:
    """Jitted zeros created directly in their sharded layout (one compile per layout)."""
    return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _layer_setter(sharding: NamedSharding) -> Callable[..., jax.Array]:
    """Jitted in-place (donated) write of one layer into a stacked, sharded weight."""

    def set_layer(stacked, value, layer):
        return jax.lax.dynamic_update_index_in_dim(stacked, value, layer, 0)

    return jax.jit(set_layer, donate_argnums=0, out_shardings=sharding)
