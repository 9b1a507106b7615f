"""Greedy completions of every variant on the harmful and harmless evaluation prompts.

Prompts are generated in fixed-size batches grouped by length (``extract.placed_batches``), so
each (batch size, length bucket, intervention kind) compiles once; changing directions between
variants of the same kind does not recompile. Completions are decoded up to the first stop
token. Each variant's completions are written to their own file as soon as they are done, so an
interrupted stage resumes at the next variant. On a mesh, each process encodes only its own
rows, the KV cache is split like the batch, and the generated tokens are gathered to every
process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from refusal_jax import distributed
from refusal_jax.distributed import Placement
from refusal_jax.models.generate import generate
from refusal_jax.models.loading import Model
from refusal_jax.pipeline.extract import placed_batches
from refusal_jax.pipeline.progress import progress
from refusal_jax.pipeline.variants import Variant


def complete(model: Model, instructions: Sequence[str], intervention: Any, *,
             params=None, config=None, max_new_tokens: int, batch_size: int,
             length_bucket: int, name: str, placement: Placement | None = None) -> list[str]:
    """Greedy completions (decoded, cut at the first stop token) of ``instructions``."""
    placement = placement or Placement()
    params = model.params if params is None else params
    config = model.config if config is None else config
    stop_ids = sorted(model.chat.stop_token_ids)
    texts: list[str] = [""] * len(instructions)
    total = -(-len(instructions) // batch_size)
    batches = placed_batches(model, instructions, batch_size, length_bucket, placement)
    for rows, batch in progress(batches, total, f"generate {name}"):
        out = generate(params, batch.tokens, batch.valid, config=config,
                       max_new_tokens=max_new_tokens, intervention=intervention,
                       stop_ids=stop_ids, mesh=placement.mesh, rules=placement.rules)
        decoded = model.chat.decode(distributed.gather(out.tokens))
        for row, text in zip(rows, decoded):
            texts[row] = text
    return texts


def complete_variant(model: Model, variant: Variant, prompts, infer_config, runtime, *,
                     placement: Placement | None = None) -> dict[str, list[dict[str, str]]]:
    """``{"harmful": [{"instruction", "completion"}], "harmless": [...]}`` of one variant."""
    result = {}
    for cls, intervention in (("harmful", variant.harmful), ("harmless", variant.harmless)):
        instructions = prompts[f"{cls}_eval"]
        texts = complete(model, instructions, intervention, params=variant.params,
                         config=variant.config, max_new_tokens=infer_config.max_new_tokens,
                         batch_size=runtime.generation_batch_size,
                         length_bucket=runtime.length_bucket, name=f"{variant.name} {cls}",
                         placement=placement)
        result[cls] = [{"instruction": instruction, "completion": text}
                       for instruction, text in zip(instructions, texts)]
    return result
