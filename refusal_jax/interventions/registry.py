"""Intervention kinds: the base class of every kind, and the registry (name -> kind class).

A kind is declared once, as a subclass of :class:`LayerKind` decorated with
``@intervention_kind(name)``, which makes it a frozen dataclass pytree and registers it. What
generic code (the common form, candidate stacking, folding, the forward's checks) needs is on
the class:

- its fields, all array leaves with a leading layer axis [L, ...], ``site_mask`` [L, 4] among
  them (``masks``). Values are arrays, so changing them never recompiles;
- ``WIDTH_FIELDS``: the fields whose last axis is the model width (the first one gives the
  intervention's width);
- ``zeros(n_layers, width, k)``: the inactive form, every leaf and the site mask zero (``k``:
  the rows of a basis, for kinds that have one);
- ``apply(site, x, ctx)`` on leaves sliced to one layer, as the forward's scan calls it;
- optionally ``fold(params, *, config) -> (params, config)``: the same edit baked into the
  weights (``folding``). A kind without it cannot be folded.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import ClassVar, Self, TypeVar, dataclass_transform

import jax
import jax.numpy as jnp

from refusal_jax.interventions.masks import site_weight
from refusal_jax.models.sites import SITES, SiteContext

K = TypeVar("K", bound="LayerKind")

_KINDS: dict[str, type[LayerKind]] = {}


class LayerKind(abc.ABC):
    """An intervention whose leaves have a leading layer axis and a ``site_mask`` [L, 4].

    ``apply`` must leave ``x`` exactly unchanged where the site mask is 0 (``weight_at``
    gives the mask's value): generation runs the layers below ``first_active_layer`` once for
    several interventions, trusting it."""

    WIDTH_FIELDS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abc.abstractmethod
    def zeros(cls, n_layers: int, width: int, k: int) -> Self:
        """The inactive form (numpy leaves, all zero)."""

    @abc.abstractmethod
    def apply(self, site: str, x: jax.Array, ctx: SiteContext) -> jax.Array:
        """``x`` edited at ``site``, with every leaf sliced to one layer."""

    def weight_at(self, site: str, x: jax.Array) -> jax.Array:
        """The site mask's value at ``site``, once ``x`` is checked to have this width."""
        kind = type(self).__name__
        weight = site_weight(self.site_mask, site, kind)
        width = getattr(self, self.WIDTH_FIELDS[0]).shape[-1]
        if x.shape[-1] != width:
            raise ValueError(f"{kind}: activations have width {x.shape[-1]}, the intervention "
                             f"{width}")
        return weight

    def first_active_layer(self) -> jax.Array:
        """The lowest layer whose site mask is nonzero (int32; the number of layers when none
        is): below it the stream is left exactly unchanged. Leading axes (stacked
        interventions) are reduced over."""
        mask = self.site_mask
        active = jnp.any(jnp.reshape(mask != 0, (-1,) + mask.shape[-2:]), axis=(0, 2))  # [L]
        return jnp.where(jnp.any(active), jnp.argmax(active), mask.shape[-2]).astype(jnp.int32)

    def check_fits(self, n_layers: int, d_model: int, *,
                   allow_candidate_axis: bool = False) -> None:
        """Raise ValueError unless this fits a model with ``n_layers`` and ``d_model``.

        With ``allow_candidate_axis`` the leaves may carry a leading candidate axis [C, L, ...].
        """
        kind = type(self).__name__
        mask_shape = self.site_mask.shape
        if not allow_candidate_axis and len(mask_shape) != 2:
            raise ValueError(
                f"{kind} has a leading candidate axis (site_mask {mask_shape}); the forward takes "
                "one intervention: jax.vmap over the candidate axis to evaluate a stack"
            )
        if mask_shape[-2:] != (n_layers, len(SITES)):
            raise ValueError(
                f"{kind} was built for {mask_shape[-2]} layers (site_mask {mask_shape}); the model "
                f"has {n_layers}: pass n_layers={n_layers} to its constructor"
            )
        for name in self.WIDTH_FIELDS:
            width = getattr(self, name).shape[-1]
            if width != d_model:
                raise ValueError(f"{kind}.{name} has width {width}; the model's d_model is "
                                 f"{d_model}")


@dataclass_transform(frozen_default=True)
def intervention_kind(name: str) -> Callable[[type[K]], type[K]]:
    """Class decorator: ``cls`` (a :class:`LayerKind`) becomes a frozen dataclass pytree, the
    intervention kind ``name``."""

    def declare(cls: type[K]) -> type[K]:
        if not issubclass(cls, LayerKind):
            raise TypeError(f"{cls.__name__} must derive from LayerKind to be a kind")
        registered = _KINDS.get(name)
        if registered is not None and _origin(registered) != _origin(cls):
            raise ValueError(f"intervention kind {name!r} is already {registered.__qualname__} "
                             f"({registered.__module__})")
        kind = jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))
        _KINDS[name] = kind
        return kind

    return declare


def kind_class(name: str) -> type[LayerKind]:
    """The kind registered as ``name``."""
    if name not in _KINDS:
        raise ValueError(f"unknown intervention kind {name!r}; registered: {kind_names()}")
    return _KINDS[name]


def kind_names() -> tuple[str, ...]:
    """Every registered kind, in the order of registration."""
    return tuple(_KINDS)


def _origin(cls: type) -> tuple[str, str]:
    return cls.__module__, cls.__qualname__
