"""Difference-in-means (DiM) candidate directions (docs/method.md section 2).

Activations are shaped ``(n, *trailing)``: the leading axis indexes prompts, the trailing axes
are whatever the caller captured, typically ``(P, L, D)`` (EOI position, layer, width). The
difference in means is taken over the prompt axis only, so one candidate direction comes out
per (position, layer). Means are accumulated in float32 whatever the input dtype (bfloat16
captures would otherwise lose the small differences this method measures).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


@jax.jit
def _mean_difference(harmful: jax.Array, harmless: jax.Array) -> jax.Array:
    harmful_mean = jnp.mean(harmful.astype(jnp.float32), axis=0)
    harmless_mean = jnp.mean(harmless.astype(jnp.float32), axis=0)
    return harmful_mean - harmless_mean


def mean_difference(harmful: ArrayLike, harmless: ArrayLike) -> jax.Array:
    """Returns ``mean(harmful) - mean(harmless)`` over the leading (prompt) axis, in float32.

    Args:
      harmful: activations of the harmful prompts (label 1), shape ``(n_harmful, *trailing)``.
      harmless: activations of the harmless prompts (label 0), shape ``(n_harmless, *trailing)``.

    Returns:
      float32 array of shape ``trailing``, e.g. ``(P, L, D)``: the unnormalised direction ``r``.

    Raises:
      ValueError: an input has no leading axis or no prompts, the trailing shapes differ, or the
        inputs hold NaN/inf. Call this on concrete arrays (it checks values eagerly).
    """
    harmful, harmless = jnp.asarray(harmful), jnp.asarray(harmless)
    for name, x in (("harmful", harmful), ("harmless", harmless)):
        if x.ndim < 1:
            raise ValueError(f"{name} activations must have a leading prompt axis; got a scalar.")
        if x.shape[0] == 0:
            raise ValueError(f"{name} activations are empty (shape {x.shape}); pass at least one "
                             "prompt per set.")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} activations must be floating point; got {x.dtype}.")
    if harmful.shape[1:] != harmless.shape[1:]:
        raise ValueError(f"harmful and harmless activations must share their trailing shape; got "
                         f"{harmful.shape[1:]} and {harmless.shape[1:]}. Capture both sets at the "
                         "same positions and layers.")
    difference = _mean_difference(harmful, harmless)
    # NaN or inf anywhere in the inputs reaches the means, so checking the result suffices.
    if not bool(jnp.all(jnp.isfinite(difference))):
        raise ValueError("activations contain NaN or inf values; check the capture (e.g. a float16 "
                         "overflow) before computing directions.")
    return difference
