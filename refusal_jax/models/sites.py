"""Where the forward calls an intervention, and what it passes.

Sites, per layer ``l`` (``SITES`` order is the column order of every site mask):
  ``resid_pre``  input of block ``l`` (before its norm);
  ``attn_out``   what attention adds to the stream (after o_proj; Gemma2: after its post-norm);
  ``mlp_out``    what the MLP adds to the stream (after down_proj; Gemma2: after its post-norm);
  ``resid_post`` output of block ``l`` (equal to ``resid_pre`` of block ``l + 1``).
``resid_pre``/``resid_post`` hold the stream itself ("stream sites"); ``attn_out``/``mlp_out``
hold increments that are added to it ("write sites").
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax

SITES: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out", "resid_post")
SITE_INDEX: dict[str, int] = {site: index for index, site in enumerate(SITES)}
STREAM_SITES: frozenset[str] = frozenset({"resid_pre", "resid_post"})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SiteContext:
    """Per-token context passed to every ``apply``.

    positions: [B, T] int32, position of each token in its own sequence (cumsum(valid) - 1).
    valid: [B, T] bool, False at left padding.
    """

    positions: jax.Array
    valid: jax.Array


class Intervention(Protocol):
    """What the forward needs from an intervention (leaves sliced to one layer)."""

    def apply(self, site: str, x: jax.Array, ctx: SiteContext) -> jax.Array: ...
