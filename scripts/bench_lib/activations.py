"""Training activations for INLP and DiM: every EOI position of every layer, captured with our
jitted forward in batches (one compilation per distinct padded length)."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench_lib.measure import wait_for
from bench_lib.workload import Workload
from refusal_jax.directions import mean_difference
from refusal_jax.models.core import forward


@dataclasses.dataclass(frozen=True)
class Activations:
    features: np.ndarray  # [n, P, L, D] float32, harmful prompts first
    labels: np.ndarray  # [n] int32, 1 = harmful, 0 = harmless
    seconds: float  # wall time of the whole extraction, compilations included
    compile_s: float
    n_compilations: int

    def dim_directions(self) -> np.ndarray:
        """[P, L, D] difference-in-means directions r (harmful mean minus harmless mean)."""
        harmful = self.features[self.labels == 1]
        harmless = self.features[self.labels == 0]
        return np.asarray(mean_difference(harmful, harmless))


def spread(total: int, count: int) -> np.ndarray:
    """`count` indices spread evenly over range(total); all of them when count <= 0 or >= total.

    Used to pick (position, layer) pairs, flattened position-major, across the whole grid.
    """
    if count <= 0 or count >= total:
        return np.arange(total)
    return np.unique(np.linspace(0, total - 1, count).round().astype(int))


def extract(w: Workload, n_per_class: int, batch: int) -> Activations:
    """Captures `n_per_class` harmful and harmless training prompts."""
    if n_per_class < 1 or batch < 1:
        raise ValueError(f"need n_per_class >= 1 and batch >= 1, got {n_per_class}, {batch}")
    capture = jax.jit(lambda p, t, v, pos: forward(p, t, v, config=w.config,
                                                   capture_positions=pos,
                                                   logits="none").captures)
    compiled = {}
    compile_s = 0.0
    chunks, labels = [], []
    start_time = time.perf_counter()
    for split, label in (("harmful_train", 1), ("harmless_train", 0)):
        for start in range(0, n_per_class, batch):
            prompts = w.prompts(split, min(batch, n_per_class - start), start)
            args = (w.params, jnp.asarray(prompts.tokens), jnp.asarray(prompts.valid),
                    jnp.asarray(prompts.eoi_positions))
            key = prompts.tokens.shape
            if key not in compiled:
                compile_start = time.perf_counter()
                compiled[key] = capture.lower(*args).compile()
                compile_s += time.perf_counter() - compile_start
            chunks.append(np.asarray(wait_for(compiled[key](*args)), np.float32))
            labels.append(np.full(len(prompts), label, np.int32))
    seconds = time.perf_counter() - start_time
    return Activations(np.concatenate(chunks), np.concatenate(labels), seconds, compile_s,
                       len(compiled))
