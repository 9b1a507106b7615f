"""LAPACK decompositions one matrix at a time, for INLP on a CPU mesh.

jaxlib 0.10's CPU LAPACK kernels split a batch of matrices over the intra-op thread pool and
block until every part is done. When the devices of a CPU mesh each run such a kernel at once,
every pool thread can end up waiting for parts queued behind the others: a deadlock, at 0% CPU,
which INLP's batched eigendecompositions and Newton solves hit with pairs sharded over two
devices of a two-core machine. So on a CPU mesh they go one matrix at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def one_matrix_at_a_time(decomposition: Callable) -> Callable:
    """``decomposition`` whose batching rule maps it over the batch instead of batching it."""

    @jax.custom_batching.custom_vmap
    def unbatched(*operands):
        return decomposition(*operands)

    @unbatched.def_vmap
    def map_over_batch(axis_size, in_batched, *operands):
        operands = tuple(x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
                         for x, batched in zip(operands, in_batched))
        out = jax.lax.map(lambda xs: unbatched(*xs), operands)
        return out, jax.tree.map(lambda _: True, out)

    return unbatched


SERIAL_SOLVE = one_matrix_at_a_time(jnp.linalg.solve)
