"""Greedy completions of a list of prompts, under one intervention or many at once.

Prompts run in batches grouped by length (the study's ``study.completions.generate_batches``
around ``models.generate.generate_each``: one jitted prefill and decode loop per batch shape).
The interventions of one call are generated together, in one decode loop whose steps read the
weights once for all of them: built-in kinds (``LayerKind``) of different kinds are put in one
common form (each a ``Compose`` of every kind in the call, the others inactive: a zero site mask
leaves the stream exactly unchanged), and None is that form with every kind inactive. Other
interventions (a ``Compose``, your own kinds) are generated together with those of the same
structure and shapes. The KV caches of a group are held at once, so split a long list of
interventions over several calls when memory is short. Changing an intervention's values (a
direction, a coefficient) never recompiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.interventions import Compose, LayerKind
from refusal_jax.models.loading import Model
from refusal_jax.study.completions import generate_batches


@dataclasses.dataclass(frozen=True)
class Completions:
    """Completions of ``prompts`` in their order: ``texts`` decoded up to the first stop token;
    ``tokens`` the generated ids of each prompt, the stop token included when one came."""

    prompts: list[str]
    texts: list[str]
    tokens: list[np.ndarray]


def generate(model: Model, prompts: Sequence[str], intervention: Any = None, *,
             max_new_tokens: int = 48, batch_size: int = 32,
             length_bucket: int = 32) -> Completions:
    """Greedy completions of ``prompts`` (instructions, chat-formatted here) under
    ``intervention`` (None: the model as it is)."""
    return generate_each(model, prompts, [intervention], max_new_tokens=max_new_tokens,
                         batch_size=batch_size, length_bucket=length_bucket)[0]


def generate_each(model: Model, prompts: Sequence[str], interventions: Sequence[Any], *,
                  max_new_tokens: int = 48, batch_size: int = 32,
                  length_bucket: int = 32) -> list[Completions]:
    """:func:`generate` under each of ``interventions`` (None for none), in their order,
    generated together where their forms allow (see the module docstring)."""
    prompts = list(prompts)
    if not interventions:
        raise ValueError("generate_each needs at least one intervention (None for none)")
    results: list[Completions | None] = [None] * len(interventions)
    for indices, group in _groups(interventions):
        done = _complete(model, prompts, group, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, length_bucket=length_bucket)
        if len(done) < len(indices):  # None only: one run serves them all
            done = done * len(indices)
        for index, completions in zip(indices, done):
            results[index] = completions
    return results


def _complete(model: Model, prompts: list[str], group: list[Any], **options
              ) -> list[Completions]:
    """Completions under each intervention of ``group`` (one form), generated together."""
    texts = [[""] * len(prompts) for _ in group]
    tokens = [[np.zeros(0, np.int32)] * len(prompts) for _ in group]
    for rows, out in generate_batches(model, prompts, group, name=f"{len(prompts)} prompts",
                                      **options):
        for variant, (variant_tokens, lengths) in enumerate(zip(out.tokens, out.lengths)):
            decoded = model.chat.decode(variant_tokens)
            for slot, row in enumerate(rows):
                texts[variant][row] = decoded[slot]
                tokens[variant][row] = variant_tokens[slot, :lengths[slot]]
    return [Completions(prompts, variant_texts, variant_tokens)
            for variant_texts, variant_tokens in zip(texts, tokens)]


def _groups(interventions: Sequence[Any]) -> list[tuple[list[int], list[Any]]]:
    """(indices, interventions of one form) covering ``interventions``: the built-in kinds and
    None in their common form, every other one with those of its structure and shapes."""
    slots: dict[Any, LayerKind] = {}  # (kind, shapes) -> an instance, in order of appearance
    others: dict[Any, list[int]] = {}
    common = []
    for index, intervention in enumerate(interventions):
        if intervention is None or isinstance(intervention, LayerKind):
            common.append(index)
            if intervention is not None:
                slots.setdefault(_form(intervention), intervention)
        else:
            others.setdefault(_form(intervention), []).append(index)
    groups = [(indices, [interventions[i] for i in indices]) for indices in others.values()]
    if common:
        inactive = {key: jax.tree.map(jnp.zeros_like, kind) for key, kind in slots.items()}

        def in_common_form(intervention):
            if not slots:
                return None  # None only: stacks to one run
            return Compose(tuple(intervention if intervention is not None
                                 and _form(intervention) == key else zeros
                                 for key, zeros in inactive.items()))

        groups.insert(0, (common, [in_common_form(interventions[i]) for i in common]))
    return groups


def _form(intervention: Any) -> tuple:
    leaves, structure = jax.tree.flatten(intervention)
    return structure, tuple(np.shape(leaf) for leaf in leaves)
