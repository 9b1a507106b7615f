"""Greedy completions of a study's variants on the harmful and harmless evaluation prompts.

Prompts are generated in fixed-size batches grouped by length (``runtime.batches.
placed_batches``), so each (batch size, length bucket, number of variants) compiles once;
changing directions between variants does not recompile. The chat template's opening, which
every prompt shares, is each batch's prefix: it runs once for all rows, and the layers below
the first one a variant acts at run once for all the variants generated together. Variants
that run on the model's own weights share one intervention form (``interventions.forms`` of
``study.variants.FORM_KINDS``), so up to ``runtime.generation_variants`` of them are generated
together (``models.generate.generate_each``): each decode step reads the weights once for all
of them, and their KV caches are held at once. Completions are decoded up to the first stop
token. A variant running the same intervention as an earlier one is generated once. On a mesh,
each process encodes only its own rows, the KV cache is split like the batch, and the generated
tokens are gathered to every process.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from refusal_jax.models.generate import Generation, generate_each
from refusal_jax.models.loading import Model
from refusal_jax.runtime import distributed
from refusal_jax.runtime.batches import placed_batches
from refusal_jax.runtime.placement import Placement
from refusal_jax.runtime.progress import progress
from refusal_jax.study.data import CLASSES
from refusal_jax.study.variants import Variant, first_equal


def generate_batches(model: Model, instructions: Sequence[str], interventions: Sequence[Any], *,
                     params=None, config=None, max_new_tokens: int, batch_size: int,
                     length_bucket: int, name: str, placement: Placement | None = None
                     ) -> Iterator[tuple[np.ndarray, Generation]]:
    """Greedy generation of ``instructions`` under each of ``interventions`` (one form; None
    for none), batch by batch: (row indices into ``instructions``, the batch's `Generation`
    [V, batch_size, ...] gathered to every process; rows past the indices repeat the last)."""
    placement = placement or Placement()
    params = model.params if params is None else params
    config = model.config if config is None else config
    stop_ids = sorted(model.chat.stop_token_ids)
    total = -(-len(instructions) // batch_size)
    batches = placed_batches(model, instructions, batch_size, length_bucket, placement,
                             split_prefix=True)
    for rows, batch in progress(batches, total, f"generate {name}"):
        slots = len(batch.prefix) + batch.tokens.shape[1] + max_new_tokens
        out = generate_each(params, batch.tokens, batch.valid, interventions, config=config,
                            max_new_tokens=max_new_tokens, prefix=batch.prefix,
                            stop_ids=stop_ids,
                            cache_shardings=placement.kv_cache(config, len(batch.tokens), slots))
        yield rows, distributed.gather(out)


def complete_each(model: Model, instructions: Sequence[str], interventions: Sequence[Any], *,
                  params=None, config=None, max_new_tokens: int, batch_size: int,
                  length_bucket: int, name: str, placement: Placement | None = None
                  ) -> list[list[str]]:
    """Greedy completions (decoded, cut at the first stop token) of ``instructions`` under each
    of ``interventions`` (one form; None for none): one list of texts per intervention."""
    texts = [[""] * len(instructions) for _ in interventions]
    for rows, out in generate_batches(
            model, instructions, interventions, params=params, config=config,
            max_new_tokens=max_new_tokens, batch_size=batch_size, length_bucket=length_bucket,
            name=name, placement=placement):
        for variant_texts, tokens in zip(texts, out.tokens):
            for row, text in zip(rows, model.chat.decode(tokens)):
                variant_texts[row] = text
    return texts


def _form(intervention: Any) -> tuple:
    """What must agree for interventions to be stacked: tree structure and leaf shapes."""
    leaves, structure = jax.tree.flatten(intervention)
    return structure, tuple(leaf.shape for leaf in leaves)


def _groups(variants: Sequence[Variant], size: int) -> list[list[Variant]]:
    """``variants`` in groups of at most ``size`` that can be generated together: the model's
    own weights and the same intervention forms; a variant with its own weights is alone."""
    groups: dict[Any, list[list[Variant]]] = {}
    for index, variant in enumerate(variants):
        key = ((_form(variant.harmful), _form(variant.harmless)) if variant.params is None
               else index)
        chunks = groups.setdefault(key, [[]])
        if len(chunks[-1]) == size:
            chunks.append([])
        chunks[-1].append(variant)
    return [chunk for chunks in groups.values() for chunk in chunks]


def complete_variants(model: Model, variants: Sequence[Variant], prompts, infer_config,
                      runtime, *, placement: Placement | None = None
                      ) -> Iterator[tuple[Variant, dict[str, list[dict[str, str]]]]]:
    """``(variant, {"harmful": [{"instruction", "completion"}], "harmless": [...]})`` of each
    variant, yielded as each group of variants generated together is done. A variant that runs
    the same intervention as an earlier one (`study.variants.first_equal`) is not generated
    again: it is yielded with that one's completions."""
    firsts = first_equal(variants)
    copies: dict[int, list[Variant]] = {}
    for index, first in enumerate(firsts):
        if first != index:
            copies.setdefault(id(variants[first]), []).append(variants[index])
            logging.info("%s runs the same intervention as %s: its completions are copied",
                         variants[index].name, variants[first].name)
    distinct = [variant for index, variant in enumerate(variants) if firsts[index] == index]
    for group in _groups(distinct, runtime.generation_variants):
        first = group[0]
        result: list[dict] = [{} for _ in group]
        for cls in CLASSES:
            instructions = prompts[f"{cls}_eval"]
            texts = complete_each(
                model, instructions, [getattr(variant, cls) for variant in group],
                params=first.params, config=first.config,
                max_new_tokens=infer_config.max_new_tokens,
                batch_size=runtime.generation_batch_size, length_bucket=runtime.length_bucket,
                name=f"{'+'.join(variant.name for variant in group)} {cls}",
                placement=placement)
            for completions, variant_texts in zip(result, texts):
                completions[cls] = [{"instruction": instruction, "completion": text}
                                    for instruction, text in zip(instructions, variant_texts)]
        for variant, completions in zip(group, result):
            for same in [variant, *copies.get(id(variant), [])]:
                yield same, completions
