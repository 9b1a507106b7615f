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


class TextEmbeddings:
    """A sentence encoder that embeds each distinct text once (the requests are shared by every
    variant of a study, and many replies, such as refusals, repeat)."""

    def __init__(self, encoder: SentenceEncoder, *, batch_size: int = 64):
        self.encoder, self.batch_size = encoder, batch_size
        self._cache: dict[str, np.ndarray] = {}

    def add(self, texts: Sequence[str]) -> None:
        """Embeds those of `texts` not embedded yet, all in one call (fuller batches than one
        call per set of replies: pass every text a stage will ask for first)."""
        new = list(dict.fromkeys(text for text in texts if text not in self._cache))
        if new:
            self._cache.update(zip(new, embed_texts(self.encoder, new,
                                                    batch_size=self.batch_size)))

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings [N, D] of `texts`."""
        self.add(texts)
        return np.stack([self._cache[text] for text in texts]) if len(texts) else np.zeros(
            (0, self.encoder.config.d_model), np.float32)


def relevance(embeddings: TextEmbeddings, requests: Sequence[str], replies: Sequence[str]
              ) -> np.ndarray:
    """cosine(request, reply) [N] of each pair (the embeddings are unit norm)."""
    if len(requests) != len(replies):
        raise ValueError(f"{len(requests)} requests but {len(replies)} replies; pass one reply "
                         "per request")
    return np.sum(embeddings(requests) * embeddings(replies), axis=-1).astype(np.float64)
