"""Precision: where bfloat16 may be used.

bfloat16 is safe for weights and activations (the residual stream, matmuls, the KV cache and
captured activations); float32 is kept wherever numbers are compared or fitted: RMSNorm
statistics, attention softmax and logits (``models.core``), DiM means and INLP fits (the
directions package casts its inputs to float32), the refusal-score log-odds (evaluation), KL
divergence and cross-entropy (computed from float32 logits).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class DtypePolicy:
    """Where bfloat16 may be used; everything else listed in the module docstring is float32.

    params: dtype of the weights, hence of the matmuls, the residual stream, the KV cache and
      the activations as captured ("bfloat16" halves memory and doubles throughput on TPUs and
      GPUs; RMSNorm statistics, attention softmax and logits stay float32 inside the forward).
    captures: dtype in which captured activations are stored for the direction estimators
      (DiM means and INLP fits run in float32 whatever is stored).
    """

    params: str = "float32"
    captures: str = "float32"

    def __post_init__(self):
        for field in ("params", "captures"):
            if getattr(self, field) not in _DTYPES:
                raise ValueError(f"DtypePolicy.{field} must be one of {sorted(_DTYPES)}; got "
                                 f"{getattr(self, field)!r} (float16 overflows in the residual "
                                 "stream of several families).")

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(_DTYPES[self.params])

    @property
    def captures_dtype(self) -> jnp.dtype:
        return jnp.dtype(_DTYPES[self.captures])
