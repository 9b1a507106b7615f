"""Multi-host start-up, gathering results and writing artefacts once.

One process runs per host (TPU VM worker, GPU node); together they see every device of the pod
as one mesh (`refusal_jax.runtime.placement`). Conventions:
- Start-up takes `DistributedOptions`: join the processes explicitly (coordinator address,
  number of processes, process id), let JAX detect the cluster (TPU pods, SLURM, Open MPI), or
  neither (a single process). The entry point (``refusal_jax.main``) builds them from its
  command-line flags; call `initialize` before anything touches devices.
- Every host must build batches of the same padded length (`agree_on_max`).
- Results are gathered in full on every host (`gather`), and artefacts are written by process 0
  only (`write_once`), after which all processes wait at a barrier so that no host reads an
  artefact before it exists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

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


def initialize(options: DistributedOptions) -> None:
    """Joins the other processes (a no-op for a single process). Call it once, first thing."""
    if options.explicit:
        jax.distributed.initialize(coordinator_address=options.coordinator_address,
                                   num_processes=options.num_processes,
                                   process_id=options.process_id)
    elif options.auto:
        jax.distributed.initialize()


def is_primary() -> bool:
    """Whether this is process 0, the one that writes artefacts and the report."""
    return jax.process_index() == 0


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
