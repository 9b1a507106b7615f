"""Scale-out with JAX's SPMD runtime: a `Mesh`, logical-axis rules and `NamedSharding`s.

Conventions (fixed here once):
- The mesh has three axes, always in this order: ``data`` (batch and candidate parallelism),
  ``fsdp`` (weights sharded on their ``embed`` axis, batch sharded too) and ``model`` (tensor
  parallelism over heads, MLP width and vocabulary). Configs give the mesh shape as a mapping
  such as ``{"data": -1, "model": 4}``; missing axes have size 1 and one axis may be -1 (the
  devices left over). Every axis is `AxisType.Auto`: jit propagates shardings from the inputs
  and XLA inserts the collectives, so the model code carries no sharding annotations.
- Every weight declares its logical axes once, in `refusal_jax.models.params.param_specs`
  (vocab, embed, q_heads, kv_heads, mlp, layers). Activations use ``batch``; the leading axes of
  the embarrassingly parallel work use ``candidates`` (a vmapped intervention sweep) and
  ``pairs`` (INLP's flat (position, layer) axis). A logical axis of None is replicated.
- `Rules` map each logical axis to a mesh axis, a tuple of mesh axes, or None (replicated).
  Every dimension must be divisible by the mesh axes it is split over, and a mesh axis may
  shard at most one dimension of an array; both are checked here with errors that name the
  weight. Pad a leading axis with `pad_leading_axis` when it does not divide.
- Checkpoints load straight into their sharded layout with `loading.load_sharded_params`.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.core import KVCache
from refusal_jax.models.params import Params, init_params, param_specs

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "model")

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]

DEFAULT_RULES: Rules = types.MappingProxyType({
    # Weights (logical axes declared in params.py).
    "vocab": "model",
    "embed": "fsdp",
    "q_heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "layers": None,
    # Activations and the leading axes of parallel work.
    "batch": ("data", "fsdp"),
    "candidates": ("data", "fsdp"),
    "pairs": ("data", "fsdp", "model"),
})

# Logical axes of the KV cache's keys/values [L, B, K, S, head_dim] and of captures [B, P, L, D].
KV_CACHE_AXES: tuple[str | None, ...] = ("layers", "batch", "kv_heads", None, None)
CAPTURE_AXES: tuple[str | None, ...] = ("batch", None, None, None)

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------
# Meshes.


def mesh_shape(shape: Mapping[str, int] | Sequence[int], n_devices: int) -> tuple[int, int, int]:
    """Resolves a config's mesh shape to (data, fsdp, model) sizes for `n_devices` devices."""
    if isinstance(shape, Mapping) or hasattr(shape, "items"):  # also an ml_collections dict
        shape = dict(shape.items())
        unknown = sorted(set(shape) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"unknown mesh axes {unknown}; the mesh axes are {MESH_AXES}.")
        sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    else:
        sizes = [int(size) for size in shape]
        if len(sizes) != len(MESH_AXES):
            raise ValueError(f"a mesh shape needs {len(MESH_AXES)} sizes {MESH_AXES}; got {sizes}.")
    if sizes.count(-1) > 1 or any(size == 0 or size < -1 for size in sizes):
        raise ValueError(f"mesh sizes must be positive, with at most one -1; got "
                         f"{_describe(sizes)}.")
    if -1 in sizes:
        known = math.prod(size for size in sizes if size != -1)
        if n_devices % known:
            raise ValueError(f"{n_devices} devices cannot be split into a mesh "
                             f"{_describe(sizes)}: {known} does not divide {n_devices}.")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(
            f"mesh {_describe(sizes)} needs {math.prod(sizes)} devices but {n_devices} are "
            "available; change the mesh shape (one axis may be -1), or on CPU simulate devices "
            "with XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax.")
    return tuple(sizes)


def make_mesh(shape: Mapping[str, int] | Sequence[int] = types.MappingProxyType({"data": -1}),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, model) mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(shape, len(devices))
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def abstract_mesh(shape: Mapping[str, int] | Sequence[int], n_devices: int) -> AbstractMesh:
    """A device-free mesh of `n_devices`, for planning layouts of machines not at hand."""
    return AbstractMesh(mesh_shape(shape, n_devices), MESH_AXES,
                        axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _describe(sizes: Sequence[int]) -> str:
    return " x ".join(f"{axis}={size}" for axis, size in zip(MESH_AXES, sizes, strict=True))


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=-1,model=4"`` -> ``{"data": -1, "model": 4}`` (the config's ``runtime.mesh``)."""
    shape = {}
    for item in _items(text, "mesh"):
        axis, _, size = item.partition("=")
        axis = axis.strip()
        if axis not in MESH_AXES:
            raise ValueError(f"mesh {text!r}: unknown mesh axis {axis!r}; the mesh axes are "
                             f"{MESH_AXES}, e.g. 'data=-1,model=4'.")
        if axis in shape:
            raise ValueError(f"mesh {text!r} gives the size of {axis!r} twice.")
        try:
            shape[axis] = int(size)
        except ValueError:
            raise ValueError(f"mesh {text!r}: the size of {axis!r} must be an integer (-1 for "
                             f"the devices left over); got {size.strip()!r}.") from None
    return shape


def parse_rules(text: str, base: Rules = DEFAULT_RULES) -> Rules:
    """`base` with the overrides in `text` (the config's ``runtime.sharding_rules``).

    ``"embed=none,batch=data+fsdp"`` replicates the model width and splits batches over
    ``data`` x ``fsdp``: each item names a logical axis of `base`, then ``none`` or mesh axes
    joined by ``+``. The empty string gives `base` unchanged.
    """
    rules = dict(base)
    for item in _items(text, "sharding rule") if text.strip() else ():
        logical, _, target = item.partition("=")
        logical, target = logical.strip(), target.strip()
        if logical not in base:
            raise ValueError(f"sharding rule {item!r} names logical axis {logical!r}; the "
                             f"logical axes are {sorted(base)}.")
        names = () if target.lower() == "none" else tuple(n.strip() for n in target.split("+"))
        unknown = [name for name in names if name not in MESH_AXES]
        if unknown or (not names and target.lower() != "none"):
            raise ValueError(f"sharding rule {item!r}: map {logical!r} to 'none' or to mesh axes "
                             f"from {MESH_AXES} joined by '+', e.g. 'batch=data+fsdp'.")
        rules[logical] = None if not names else names[0] if len(names) == 1 else names
    return types.MappingProxyType(rules)


def _items(text: str, what: str) -> list[str]:
    items = [item for item in text.split(",") if item.strip()]
    malformed = [item for item in items if "=" not in item]
    if not items or malformed:
        raise ValueError(f"{what} {text!r} must be comma-separated 'name=value' items, e.g. "
                         "'data=-1,model=4' or 'embed=none,batch=data+fsdp'.")
    return items


# ----------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpec -> NamedSharding.


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules = DEFAULT_RULES
                    ) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions have these logical names."""
    used: dict[str, str] = {}
    spec = []
    for logical in logical_axes:
        if logical is None:
            spec.append(None)
            continue
        if logical not in rules:
            raise ValueError(f"no sharding rule for logical axis {logical!r}; add it to the rules "
                             "(None replicates it).")
        target = rules[logical]
        names = (target,) if isinstance(target, str) else tuple(target or ())
        for name in names:
            if name not in MESH_AXES:
                raise ValueError(f"rule {logical!r} -> {target!r} names mesh axis {name!r}; the "
                                 f"mesh axes are {MESH_AXES}.")
            if name in used:
                raise ValueError(f"mesh axis {name!r} would shard both {used[name]!r} and "
                                 f"{logical!r} of an array with axes {tuple(logical_axes)}; map "
                                 "one of them to another mesh axis or to None.")
            used[name] = logical
        spec.append(target if isinstance(target, str) or target is None else tuple(target))
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh | AbstractMesh, shape: Sequence[int],
                   logical_axes: Sequence[str | None], rules: Rules = DEFAULT_RULES,
                   name: str = "array") -> NamedSharding:
    """The sharding of an array of `shape`, checking that every split dimension divides."""
    if len(shape) != len(logical_axes):
        raise ValueError(f"{name} has shape {tuple(shape)} but logical axes "
                         f"{tuple(logical_axes)}.")
    spec = logical_to_spec(logical_axes, rules)
    for dim, (size, logical, axes) in enumerate(zip(shape, logical_axes, spec, strict=True)):
        split = _split_count(mesh, axes)
        if size % split:
            raise ValueError(
                f"{name} of shape {tuple(shape)}: dimension {dim} ({logical!r}, size {size}) is "
                f"split over mesh axes {axes!r} of total size {split}, which does not divide it; "
                f"choose a mesh whose {axes!r} size divides {size}, or map {logical!r} to None.")
    return NamedSharding(mesh, spec)


def param_shardings(config: ModelConfig, mesh: Mesh | AbstractMesh,
                    rules: Rules = DEFAULT_RULES) -> Params:
    """A `NamedSharding` for every weight, derived from `param_specs(config)` and the rules."""
    named = leaves_by_path(param_specs(config))
    shardings = {path: named_sharding(mesh, spec.shape, spec.logical_axes, rules, f"weight {path}")
                 for path, spec in named.items()}
    return replace_leaves_by_path(param_specs(config), shardings)


def abstract_sharded_params(config: ModelConfig, mesh: Mesh | AbstractMesh, dtype=jnp.float32,
                            rules: Rules = DEFAULT_RULES) -> Params:
    """`jax.eval_shape` of the sharded initialiser: shapes, dtypes and shardings, no memory."""
    shardings = param_shardings(config, mesh, rules)
    init = functools.partial(init_params, config, dtype=dtype)
    shapes = jax.eval_shape(init, jax.random.key(0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def kv_cache_shardings(config: ModelConfig, mesh: Mesh | AbstractMesh, batch: int, length: int,
                       rules: Rules = DEFAULT_RULES, *, replicate_indivisible: bool = False
                       ) -> KVCache:
    """Shardings of a `KVCache` of `batch` rows and `length` slots (batch and kv heads split).

    With `replicate_indivisible`, the rows or KV heads are replicated instead of split when the
    mesh axes of ``batch`` / ``kv_heads`` do not divide their number (e.g. 2 KV heads on a
    model axis of 4); otherwise that raises.
    """
    if replicate_indivisible:
        sizes = {"batch": batch, "kv_heads": config.n_kv_heads}
        rules = {**rules, **{axis: None for axis, size in sizes.items()
                             if size % axis_size(mesh, axis, rules)}}
    kv_shape = (config.n_layers, batch, config.n_kv_heads, length, config.head_dim)
    kv = named_sharding(mesh, kv_shape, KV_CACHE_AXES, rules, "KV cache")
    row = named_sharding(mesh, (batch, length), ("batch", None), rules, "KV cache positions")
    vector = named_sharding(mesh, (batch,), ("batch",), rules, "KV cache next positions")
    return KVCache(keys=kv, values=kv, positions=row, next_position=vector,
                   length=NamedSharding(mesh, PartitionSpec()))


def capture_sharding(config: ModelConfig, mesh: Mesh | AbstractMesh, batch: int, n_positions: int,
                     rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of captured activations [B, P, L, D] (split over the batch)."""
    shape = (batch, n_positions, config.n_layers, config.d_model)
    return named_sharding(mesh, shape, CAPTURE_AXES, rules, "captures")


# ----------------------------------------------------------------------------------------------
# Placing arrays.


def put_global(value: np.ndarray | jax.Array, sharding: NamedSharding) -> jax.Array:
    """A global array from a value every process holds in full; each host sends only its slices."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def shard_params(params: Params, config: ModelConfig, mesh: Mesh,
                 rules: Rules = DEFAULT_RULES) -> Params:
    """Re-lays out parameters that are already in memory (small models, tests)."""
    return jax.tree.map(put_global, params, param_shardings(config, mesh, rules))


def init_sharded_params(config: ModelConfig, key: jax.Array, mesh: Mesh, dtype=jnp.float32,
                        rules: Rules = DEFAULT_RULES, scale: float = 0.02) -> Params:
    """Random parameters (`init_params`) created directly in their sharded layout."""
    init = jax.jit(functools.partial(init_params, config, dtype=dtype, scale=scale),
                   out_shardings=param_shardings(config, mesh, rules))
    return init(key)


def leading_axis_sharding(mesh: Mesh, shape: Sequence[int], logical_axis: str,
                          rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding that splits axis 0 of an array of `shape` along `logical_axis`'s mesh axes."""
    return named_sharding(mesh, shape, (logical_axis,) + (None,) * (len(shape) - 1), rules,
                          f"leading {logical_axis!r} axis")


def shard_leading_axis(tree: T, mesh: Mesh, logical_axis: str, rules: Rules = DEFAULT_RULES) -> T:
    """Places every leaf of `tree` with its axis 0 split along `logical_axis` (e.g. "pairs").

    Every leaf must have the same leading size, divisible by the mesh axes (see
    `pad_leading_axis`).
    """
    _leading_size(tree, "shard_leading_axis")
    return jax.tree.map(
        lambda leaf: put_global(leaf, leading_axis_sharding(mesh, np.shape(leaf), logical_axis,
                                                            rules)), tree)


def shard_batch(tree: T, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> T:
    """Places a batch (tokens, valid, capture positions, ...) with its rows split over `batch`."""
    return shard_leading_axis(tree, mesh, "batch", rules)


def pad_leading_axis(tree: T, multiple: int) -> tuple[T, int]:
    """Pads axis 0 of every leaf (on the host, as numpy) to a multiple of `multiple` by
    repeating its last entry.

    Returns the padded tree and the original size; the padded entries are valid inputs (copies),
    so they compute finite results that the caller drops with ``[:size]``.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1; got {multiple}.")
    size = _leading_size(tree, "pad_leading_axis")
    if size == 0:
        raise ValueError("cannot pad an empty leading axis; there must be at least one entry.")
    extra = -size % multiple

    def pad(leaf):
        leaf = np.asarray(leaf)
        return np.concatenate([leaf, np.repeat(leaf[-1:], extra, axis=0)], axis=0)

    return (jax.tree.map(pad, tree) if extra else tree), size


def _leading_size(tree: Any, caller: str) -> int:
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(tree)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"{caller} needs leaves that share one leading axis; got leading sizes "
                         f"{sorted(sizes, key=str)}.")
    return sizes.pop()


def axis_size(mesh: Mesh | AbstractMesh, logical_axis: str, rules: Rules = DEFAULT_RULES) -> int:
    """How many ways `logical_axis` is split on `mesh` (the multiple to pad it to)."""
    return _split_count(mesh, logical_to_spec((logical_axis,), rules)[0])


def _split_count(mesh: Mesh | AbstractMesh, axes: MeshAxes) -> int:
    """Number of pieces a dimension mapped to `axes` (one PartitionSpec entry) is split into."""
    names = (axes,) if isinstance(axes, str) else axes or ()
    return math.prod(mesh.shape[name] for name in names)


# ----------------------------------------------------------------------------------------------
# Bytes per device.


def planned_bytes_per_device(tree: Any) -> int:
    """Bytes one device holds for a tree of sharded `jax.ShapeDtypeStruct`s (even shardings)."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(tree))


def addressable_bytes(tree: Any) -> dict[jax.Device, int]:
    """Bytes each local device actually holds for a tree of `jax.Array`s."""
    totals: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals


# ----------------------------------------------------------------------------------------------
# Params <-> {"embed": ..., "layers.q_proj": ...}.


def leaves_by_path(tree: Params) -> dict[str, Any]:
    """The present (non-None) leaves of a Params-shaped tree by dotted path ("layers.q_proj")."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(key.name for key in path): leaf for path, leaf in flat}


def replace_leaves_by_path(template: Params, values: Mapping[str, Any]) -> Params:
    """``template`` with each present leaf replaced by ``values[its dotted path]``."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(
        treedef, [values[".".join(key.name for key in path)] for path, _ in flat])

