"""Multi-host start-up and the per-host view of a sweep.

One process runs per host (TPU VM worker, GPU node); together they see every device of the pod
as one mesh. Conventions:
- Start-up comes from absl flags (defined on import): ``--coordinator_address``,
  ``--num_processes`` and ``--process_id`` join processes explicitly;
  ``--distributed_auto`` lets JAX detect the cluster (TPU pods, SLURM, Open MPI); with neither,
  the run is a single process. Call `initialize_from_flags()` before anything touches devices.
- Each host reads only the prompts whose rows its own devices hold in a batch sharded over
  ``batch`` (`process_rows`), and `global_batch` assembles the global array from those local
  rows. Every host must build batches of the same padded length (`agree_on_max`).
- Results are gathered in full on every host (`gather`), and artefacts are written by process 0
  only (`write_once`), after which all processes wait at a barrier so that no host reads an
  artefact before it exists.
- A `Placement` bundles the mesh and rules of a run (or none: one device) behind one interface,
  so pipeline code has a single path for one device, one host with many, and many hosts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from refusal_jax.runtime import sharding

COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for jax.distributed.initialize (all processes pass the same).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).",
                                     lower_bound=1)
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).",
                                  lower_bound=0)
DISTRIBUTED_AUTO = flags.DEFINE_boolean(
    "distributed_auto", False,
    "Call jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM, Open MPI).")

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
    """How this process joins the others: explicitly, by auto-detection, or not at all."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False

    def __post_init__(self):
        explicit = (self.coordinator_address, self.num_processes, self.process_id)
        given = [value is not None for value in explicit]
        if any(given) and not all(given):
            raise ValueError("pass --coordinator_address, --num_processes and --process_id "
                             "together (or none of them); got coordinator_address="
                             f"{self.coordinator_address!r}, num_processes={self.num_processes!r}, "
                             f"process_id={self.process_id!r}.")
        if all(given) and self.auto:
            raise ValueError("--distributed_auto detects the cluster itself; do not combine it "
                             "with --coordinator_address/--num_processes/--process_id.")
        if all(given) and not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"--process_id={self.process_id} must lie in [0, "
                             f"{self.num_processes}) for --num_processes={self.num_processes}.")
        if self.coordinator_address is not None and ":" not in self.coordinator_address:
            raise ValueError(f"--coordinator_address must be host:port; got "
                             f"{self.coordinator_address!r}.")

    @property
    def explicit(self) -> bool:
        return self.coordinator_address is not None


def options_from_flags() -> DistributedOptions:
    """The start-up options given on the command line (flags must have been parsed)."""
    return DistributedOptions(coordinator_address=COORDINATOR_ADDRESS.value,
                              num_processes=NUM_PROCESSES.value, process_id=PROCESS_ID.value,
                              auto=DISTRIBUTED_AUTO.value)


def initialize(options: DistributedOptions) -> None:
    """Joins the other processes (a no-op for a single process). Call it once, first thing."""
    if options.explicit:
        jax.distributed.initialize(coordinator_address=options.coordinator_address,
                                   num_processes=options.num_processes,
                                   process_id=options.process_id)
    elif options.auto:
        jax.distributed.initialize()


def initialize_from_flags() -> None:
    """`initialize` with the options given on the command line."""
    initialize(options_from_flags())


def is_primary() -> bool:
    """Whether this is process 0, the one that writes artefacts and the report."""
    return jax.process_index() == 0


# ----------------------------------------------------------------------------------------------
# Per-host slices of a batch.


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


def agree_on_max(value: int) -> int:
    """The largest of every process's `value` (e.g. the padded prompt length of its rows)."""
    if jax.process_count() == 1:
        return int(value)
    values = multihost_utils.process_allgather(np.asarray(value, np.int64))
    return int(np.max(values))


# ----------------------------------------------------------------------------------------------
# Gathering results and writing artefacts once.


def gather(tree: T) -> T:
    """Every leaf of a tree of global arrays as a full numpy array on every process."""
    return jax.tree.map(_to_host, tree)


def _to_host(leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))


def write_once(name: str, write: Callable[..., Any], *args: Any) -> None:
    """Runs `write(*args)` on process 0 only, then waits until every process gets here.

    `name` labels the barrier (it must be the same string on every process).
    """
    if is_primary():
        write(*args)
    barrier(name)


def barrier(name: str) -> None:
    """Blocks until every process has reached the barrier of the same name."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)



# ----------------------------------------------------------------------------------------------
# The placement of a run.


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
