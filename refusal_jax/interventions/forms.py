"""The common form: one pytree of several kinds, each filled at some layers and sites.

Interventions that are to share one compiled program (the study's variants, the candidates of
selection) are built as a ``Compose`` of the same kinds in the same order, every kind in its
zero (inactive) form until a :class:`Part` fills it at some layers. A zero site mask leaves the
stream exactly unchanged, so an inactive kind costs compute but changes nothing, and the
forms of all variants share one structure and shape. This is generic over the registry: a kind
takes part through its ``zeros`` and its per-layer fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from refusal_jax.interventions.compose import Compose
from refusal_jax.interventions.masks import site_columns
from refusal_jax.interventions.registry import LayerKind, kind_class


@dataclasses.dataclass(frozen=True)
class Part:
    """The kind ``kind`` acting at ``layers`` and ``sites``.

    values: field name -> the field's value at each of those layers (without the layer axis;
    e.g. ``direction`` [D], ``coeff`` a scalar). Fields not named stay zero.
    """

    kind: str
    layers: Sequence[int]
    sites: Sequence[str]
    values: Mapping[str, ArrayLike]


def zero_form(kinds: Sequence[str], *, n_layers: int, width: int,
              ranks: Mapping[str, int] | None = None) -> Compose:
    """``Compose`` of every kind of ``kinds`` in its zero form (numpy leaves).

    ranks: kind -> the rows of its basis (``k`` of its ``zeros``); 1 for kinds not named.
    """
    ranks = ranks or {}
    return Compose(tuple(kind_class(kind).zeros(n_layers, width, ranks.get(kind, 1))
                         for kind in kinds))


def fill(intervention: LayerKind, part: Part) -> LayerKind:
    """A copy of ``intervention`` (leaves [L, ...]) with ``part``'s values written at its
    layers and its site mask set to 1 at (layers, sites); numpy leaves."""
    layers, columns = list(part.layers), site_columns(part.sites)
    mask = np.array(intervention.site_mask)
    mask[np.ix_(layers, columns)] = 1.0
    fields = {field.name for field in dataclasses.fields(intervention)} - {"site_mask"}
    changes = {}
    for name, value in part.values.items():
        if name not in fields:
            raise ValueError(f"{type(intervention).__name__} has no value field {name!r}")
        leaf = np.array(getattr(intervention, name))
        leaf[layers] = np.asarray(value, leaf.dtype)
        changes[name] = leaf
    return dataclasses.replace(intervention, site_mask=mask, **changes)


def assemble(parts: Sequence[Part], *, kinds: Sequence[str], n_layers: int, width: int,
             ranks: Mapping[str, int] | None = None) -> Compose:
    """The common form of ``kinds`` with ``parts`` filled in (numpy leaves).

    Parts of one kind at different layers share one form; a part whose kind is already active
    at one of its layers starts another form, and the result composes them in order (a
    different pytree structure, which compiles separately).
    """
    kinds = tuple(kinds)
    unknown = sorted({part.kind for part in parts} - set(kinds))
    if unknown:
        raise ValueError(f"parts of kinds {unknown} outside the form's kinds {kinds}")

    def empty() -> list[Any]:
        return list(zero_form(kinds, n_layers=n_layers, width=width,
                              ranks=ranks).interventions)

    forms = [empty()]
    for part in parts:
        slot = kinds.index(part.kind)
        form = next((form for form in forms
                     if not np.asarray(form[slot].site_mask)[list(part.layers)].any()), None)
        if form is None:
            form = empty()
            forms.append(form)
        form[slot] = fill(form[slot], part)
    built = [Compose(tuple(form)) for form in forms]
    return built[0] if len(built) == 1 else Compose(tuple(built))


def common_form(parts: Sequence[Part], *, kinds: Sequence[str], n_layers: int, width: int,
                ranks: Mapping[str, int] | None = None) -> Compose:
    """:func:`assemble` with jax leaves, ready for the forward."""
    form = assemble(parts, kinds=kinds, n_layers=n_layers, width=width, ranks=ranks)
    return jax.tree_util.tree_map(jnp.asarray, form)
