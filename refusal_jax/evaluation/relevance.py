"""Relevance of a reply to its request: the cosine similarity of their sentence embeddings.

Both texts are embedded by a sentence encoder (all-MiniLM-L6-v2 by default,
`refusal_jax.models.io.sentence_encoder`), which was trained to place a question near its
answers; the cosine lies in [-1, 1]. Why the request, and not the released model's own answer,
is the reference: docs/method.md section 6, "What the completions say".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from refusal_jax.models.encoder import SentenceEncoder, embed_texts


def relevance(encoder: SentenceEncoder, requests: Sequence[str], replies: Sequence[str], *,
              batch_size: int = 64) -> np.ndarray:
    """cosine(request, reply) [N] of each pair (the embeddings are unit norm)."""
    if len(requests) != len(replies):
        raise ValueError(f"{len(requests)} requests but {len(replies)} replies; pass one reply "
                         "per request")
    both = embed_texts(encoder, [*requests, *replies], batch_size=batch_size)
    return np.sum(both[:len(requests)] * both[len(requests):], axis=-1).astype(np.float64)
