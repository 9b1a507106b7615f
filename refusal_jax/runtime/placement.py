"""Where a run's arrays live: one device, or a mesh over every device of every process.

A `Placement` bundles the mesh and sharding rules of a run (or none: one device) behind one
interface, so stage code has a single path for one device, one host with many, and many hosts.
On a mesh, each host reads only the prompts whose rows its own devices hold in a batch sharded
over ``batch`` (`process_rows`), and `global_batch` assembles the global array from those local
rows; every host must build batches of the same padded length (`distributed.agree_on_max`).
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from refusal_jax.runtime import sharding

T = TypeVar("T")


def process_rows(mesh: Mesh, n_rows: int, rules: sharding.Rules = sharding.DEFAULT_RULES) -> slice:
    """The contiguous rows of an [n_rows, ...] batch that this process's devices hold.

    With meshes from `sharding.make_mesh` every host owns one contiguous block of the batch; a
    mesh whose device order interleaves hosts along ``batch`` raises (reorder its devices).
    """
    rows_sharding = sharding.leading_axis_sharding(mesh, (n_rows,), "batch", rules)
    indices = rows_sharding.addressable_devices_indices_map((n_rows,)).values()
    rows = sorted({row for index in indices for row in range(*index[0].indices(n_rows))})
    if not rows:
        raise ValueError("the mesh holds none of this process's devices; build it with "
                         "sharding.make_mesh over jax.devices().")
    if rows != list(range(rows[0], rows[-1] + 1)):
        raise ValueError(f"this process's devices hold rows {rows} of the batch, which are not "
                         "contiguous; build the mesh with sharding.make_mesh so that each host "
                         "owns one block of the batch.")
    return slice(rows[0], rows[-1] + 1)


def global_batch(local: T, mesh: Mesh, n_rows: int,
                 rules: sharding.Rules = sharding.DEFAULT_RULES) -> T:
    """Global [n_rows, ...] arrays split over ``batch``, from this process's `process_rows`."""

    def assemble(leaf):
        leaf = np.asarray(leaf)
        shape = (n_rows,) + leaf.shape[1:]
        return jax.make_array_from_process_local_data(
            sharding.leading_axis_sharding(mesh, shape, "batch", rules), leaf, shape)

    return jax.tree.map(assemble, local)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a run's arrays live: on one device (``mesh`` None) or split over a mesh.

    On a mesh, weights follow `rules` (`sharding.param_shardings`), batch rows are split over
    ``batch``, INLP's flat (position, layer) axis over ``pairs`` and stacked selection
    candidates over ``candidates``. Every method also works without a mesh, where it places
    arrays as ``jnp.asarray`` would, so stages have one code path.
    """

    mesh: Mesh | None = None
    rules: sharding.Rules = dataclasses.field(default_factory=lambda: sharding.DEFAULT_RULES)

    @classmethod
    def from_config(cls, mesh: str, rules: str = "") -> "Placement":
        """The placement of the config strings ``runtime.mesh`` and ``runtime.sharding_rules``
        ("" = one device); builds the mesh over every device of every process."""
        if not mesh.strip():
            if rules.strip():
                raise ValueError(f"runtime.sharding_rules={rules!r} needs a mesh; set "
                                 "runtime.mesh too (e.g. 'data=-1'), or clear the rules.")
            return cls()
        return cls(sharding.make_mesh(sharding.parse_mesh(mesh)), sharding.parse_rules(rules))

    def describe(self) -> str:
        if self.mesh is None:
            return "one device, no mesh"
        sizes = " x ".join(f"{axis}={size}" for axis, size in self.mesh.shape.items())
        return f"mesh {sizes} over {jax.process_count()} process(es)"

    def multiple(self, logical_axis: str) -> int:
        """How many ways `logical_axis` is split (1 without a mesh): its sizes must divide."""
        if self.mesh is None:
            return 1
        return sharding.axis_size(self.mesh, logical_axis, self.rules)

    def round_up(self, size: int, logical_axis: str) -> int:
        """`size` rounded up to a multiple of `multiple(logical_axis)`."""
        multiple = self.multiple(logical_axis)
        return -(-size // multiple) * multiple

    def rows(self, n_rows: int) -> slice:
        """The rows of an [n_rows, ...] batch that this process reads and encodes."""
        if self.mesh is None:
            return slice(0, n_rows)
        return process_rows(self.mesh, n_rows, self.rules)

    def batch(self, local: T, n_rows: int) -> T:
        """Global [n_rows, ...] arrays from this process's `rows` of them."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, local)
        return global_batch(local, self.mesh, n_rows, self.rules)

    def leading(self, tree: T, logical_axis: str) -> tuple[T, int]:
        """(`tree` with axis 0 padded to a multiple of `multiple(logical_axis)` and split over
        it, the unpadded size); every process passes the whole tree. Drop the padded entries of
        the results with ``[:size]`` (see `sharding.pad_leading_axis`)."""
        padded, size = sharding.pad_leading_axis(tree, self.multiple(logical_axis))
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, padded), size
        return sharding.shard_leading_axis(padded, self.mesh, logical_axis, self.rules), size

    def params(self, params, config):
        """`params` laid out by the rules (unchanged without a mesh)."""
        if self.mesh is None:
            return params
        return sharding.shard_params(params, config, self.mesh, self.rules)

    def kv_cache(self, config, rows: int, slots: int):
        """Shardings of a KV cache of `rows` x `slots` (`sharding.kv_cache_shardings`; an axis
        whose split does not divide it is replicated), or None without a mesh."""
        if self.mesh is None:
            return None
        return sharding.kv_cache_shardings(config, self.mesh, rows, slots, self.rules,
                                           replicate_indivisible=True)
