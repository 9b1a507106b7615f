"""The offline judge's two model measures (`refusal_jax.evaluation.outcomes`), done the plain
PyTorch / transformers way for the PyTorch twin of the evaluate stage.

- Fluency (`reply_nll`): the mean token NLL of each reply under an unsteered transformers model,
  given its request's chat prompt (`ChatFormat.prompts`) followed by the reply's tokens
  (tokenized alone, without special tokens, cut to the context), as
  `refusal_jax.evaluation.fluency`. One forward per batch of rows, each row prompt + reply,
  left padded to the batch's longest; only the logits that predict reply tokens are kept.
- Relevance (`SentenceEmbeddings.relevance`): the cosine of the request's and the reply's
  all-MiniLM-L6-v2 embeddings, the model loaded with transformers' `AutoModel` and
  `AutoTokenizer` from the directory our loader reads, pooled as sentence-transformers does:
  the mean over valid tokens (texts truncated to `max_seq_length`), L2-normalised when
  modules.json lists a Normalize module. Each distinct text is embedded once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import transformers

from bench_lib import torch_stack
from refusal_jax.models.io.sentence_encoder import default_encoder_directory
from refusal_jax.text.chat import ChatFormat, pad_token_id

ENCODER_BATCH_SIZE = 64  # as `refusal_jax.evaluation.relevance.TextEmbeddings`


def reply_nll(model: transformers.PreTrainedModel, chat: ChatFormat, requests: Sequence[str],
              replies: Sequence[str | None], *, batch_size: int, max_context: int,
              device: str = "cpu") -> tuple[np.ndarray, int]:
    """(Mean NLL per reply token [N] in nats, the number of forward passes) of each reply given
    its request; a reply of None (not scored, e.g. a refusal) or with no tokens gets NaN."""
    tokenizer = chat.tokenizer
    prompt_ids = tokenizer(chat.prompts(list(requests)), add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer([reply or "" for reply in replies],
                          add_special_tokens=False)["input_ids"]
    rows = [(index, prompt, reply[:max(max_context - len(prompt), 0)])
            for index, (prompt, reply, text) in enumerate(zip(prompt_ids, reply_ids, replies))
            if text is not None]
    rows = [row for row in rows if row[2]]
    nll = np.full(len(replies), np.nan)
    pad = pad_token_id(tokenizer)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        length = max(len(prompt) + len(reply) for _, prompt, reply in chunk)
        ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        is_reply = torch.zeros((len(chunk), length), dtype=torch.bool)
        for row, (_, prompt, reply) in enumerate(chunk):
            ids[row, length - len(prompt) - len(reply):] = torch.as_tensor(prompt + reply)
            mask[row, length - len(prompt) - len(reply):] = 1
            is_reply[row, length - len(reply):] = True
        ids, mask, is_reply = ids.to(device), mask.to(device), is_reply.to(device)
        # The logits of the last `keep` positions: those predicting the longest reply's tokens.
        keep = max(len(reply) for _, _, reply in chunk) + 1
        logits = model(input_ids=ids, attention_mask=mask,
                       position_ids=torch_stack.position_ids(mask), use_cache=False,
                       logits_to_keep=keep).logits[:, :-1].float()
        token_nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), ids[:, length - keep + 1:], reduction="none")
        scored = is_reply[:, length - keep + 1:]
        sums = torch.where(scored, token_nll, 0.0).double().sum(-1)
        means = (sums / scored.sum(-1)).cpu().numpy()
        nll[[index for index, _, _ in chunk]] = means
    return nll, -(-len(rows) // batch_size)


class SentenceEmbeddings:
    """all-MiniLM-L6-v2 (or the sentence-transformers BERT directory given) in transformers,
    embedding each distinct text once."""

    def __init__(self, directory: str | Path | None = None, *, device: str = "cpu"):
        directory = Path(directory) if directory is not None else default_encoder_directory()
        pooling = json.loads((directory / "1_Pooling/config.json").read_text())
        if not pooling.get("pooling_mode_mean_tokens"):
            raise ValueError(f"{directory / '1_Pooling/config.json'} asks for pooling other "
                             f"than mean pooling, which is the only mode mirrored: {pooling}")
        modules = json.loads((directory / "modules.json").read_text())
        self.normalize = any(m["type"].endswith("models.Normalize") for m in modules)
        self.max_length = json.loads(
            (directory / "sentence_bert_config.json").read_text())["max_seq_length"]
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        self.model = transformers.AutoModel.from_pretrained(directory, dtype=torch.float32)
        self.model.to(device).eval()
        self.device = device
        self.cache: dict[str, np.ndarray] = {}
        self.batches = 0

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings [N, D] of `texts`."""
        if not len(texts):
            return np.zeros((0, self.model.config.hidden_size), np.float32)
        new = list(dict.fromkeys(text for text in texts if text not in self.cache))
        for start in range(0, len(new), ENCODER_BATCH_SIZE):
            chunk = new[start:start + ENCODER_BATCH_SIZE]
            inputs = self.tokenizer(chunk, padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt").to(
                                        self.device)
            hidden = self.model(**inputs).last_hidden_state
            mask = inputs["attention_mask"][..., None].to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
            self.cache.update(zip(chunk, pooled.cpu().numpy()))
            self.batches += 1
        return np.stack([self.cache[text] for text in texts])

    def relevance(self, requests: Sequence[str], replies: Sequence[str]) -> np.ndarray:
        """cosine(request, reply) [N] of each pair."""
        a, b = self(requests).astype(np.float64), self(replies).astype(np.float64)
        return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
