"""Adding an intervention kind: kinds declared in this file alone go through the common form
(the study's variants), candidate stacking (selection) and folding, with no package file
edited."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_decoder import CONFIG, D, L, run_forward
from tiny_decoder import batch as _batch
from tiny_decoder import params as _params

from refusal_jax import interventions as iv
from refusal_jax.interventions import folding
from refusal_jax.models.core import forward
from refusal_jax.selection.candidates import stack_parts
from refusal_jax.study import variants
from refusal_jax.study.config import base_config


@iv.intervention_kind("test_scaled_ablation")
class ScaledAblation(iv.LayerKind):
    """``x - scale (x . r_hat) r_hat``: scale 1 ablates ``r_hat``, scale 2 reflects it.

    direction: [L, D] unit; scale: [L]; site_mask: [L, 4].
    """

    WIDTH_FIELDS = ("direction",)

    direction: jax.Array
    scale: jax.Array
    site_mask: jax.Array

    @classmethod
    def zeros(cls, n_layers, width, k):
        return cls(direction=np.zeros((n_layers, width), np.float32),
                   scale=np.zeros(n_layers, np.float32),
                   site_mask=np.zeros((n_layers, 4), np.float32))

    def apply(self, site, x, ctx):
        weight = self.weight_at(site, x)
        return iv.reflect(x, self.direction[None, :], weight * self.scale).astype(x.dtype)

    def fold(self, params, *, config):
        """An ablation (scale 1 wherever it acts) folds like one; other scales do not."""
        active = np.asarray(self.site_mask).any(axis=-1)
        if not np.all(np.asarray(self.scale)[active] == 1.0):
            raise ValueError("only a scale of 1 (an ablation) has a weight form")
        return folding.fold_projection(params, self.direction[:, None, :], self.site_mask,
                                       config=config)


@iv.intervention_kind("test_shift")
class Shift(iv.LayerKind):
    """``x + shift`` at every token. shift: [L, D]; site_mask: [L, 4]. No folding rule."""

    WIDTH_FIELDS = ("shift",)

    shift: jax.Array
    site_mask: jax.Array

    @classmethod
    def zeros(cls, n_layers, width, k):
        return cls(shift=np.zeros((n_layers, width), np.float32),
                   site_mask=np.zeros((n_layers, 4), np.float32))

    def apply(self, site, x, ctx):
        return (x + self.weight_at(site, x) * self.shift).astype(x.dtype)


TOY_KINDS = ("test_scaled_ablation", "test_shift")


def _unit(seed):
    r = np.random.default_rng(seed).normal(size=D).astype(np.float32)
    return r / np.linalg.norm(r)


def _logits(intervention, params=None, config=CONFIG):
    tokens, valid = _batch()
    params = _params() if params is None else params
    return np.asarray(run_forward(params, tokens, valid, config=config,
                                  intervention=intervention).logits)[valid]


def _scaled(seed, scale, layers):
    """The toy kind built directly (its own constructor would look like this)."""
    return ScaledAblation(direction=jnp.broadcast_to(_unit(seed), (L, D)),
                          scale=jnp.full(L, scale, jnp.float32),
                          site_mask=iv.make_site_mask(L, layers, iv.ABLATION_SITES))


def _scaled_part(seed, scale, layers):
    return iv.Part("test_scaled_ablation", layers, iv.ABLATION_SITES,
                   dict(direction=_unit(seed), scale=scale))


def test_kinds_are_registered_by_name_once():
    assert iv.kind_class("test_scaled_ablation") is ScaledAblation
    assert set(TOY_KINDS) <= set(iv.kind_names())
    assert {"ablation", "actadd", "nullspace", "reflection", "clamp", "eraser"} <= set(
        iv.kind_names())
    with pytest.raises(ValueError, match="already ScaledAblation"):
        iv.intervention_kind("test_scaled_ablation")(type("Other", (Shift,), {}))
    with pytest.raises(TypeError, match="must derive from LayerKind"):
        iv.intervention_kind("test_plain")(type("Plain", (), {}))
    with pytest.raises(ValueError, match="unknown intervention kind 'absent'"):
        iv.kind_class("absent")


@pytest.mark.parametrize("kind", sorted(iv.kind_names()))
def test_every_zero_form_fits_and_leaves_activations_exactly_unchanged(kind):
    zero = iv.kind_class(kind).zeros(L, D, 2)
    zero.check_fits(L, D)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 7, D)), jnp.float32)
    _, valid = _batch()
    positions = np.where(valid, np.cumsum(valid, axis=1) - 1, -1).astype(np.int32)
    ctx = iv.SiteContext(positions=jnp.asarray(positions), valid=jnp.asarray(valid))
    for layer in range(L):
        for site in iv.SITES:
            np.testing.assert_array_equal(iv.at_layer(zero, layer).apply(site, x, ctx), x)


def test_the_common_form_holds_a_new_kind_in_one_shape_for_every_fill():
    kinds = ("ablation", "test_scaled_ablation", "actadd", "test_shift")
    form = functools.partial(iv.common_form, kinds=kinds, n_layers=L, width=D)
    empty = form([])
    scaled = form([_scaled_part(2, 2.0, [0, 2])])
    shifted = form([iv.Part("test_shift", [1], ("mlp_out",), dict(shift=_unit(3)))])
    # Each against the kind alone (another program, so equal to float32 rounding).
    np.testing.assert_allclose(_logits(empty), _logits(None), rtol=0, atol=1e-6)
    np.testing.assert_allclose(_logits(scaled), _logits(_scaled(2, 2.0, [0, 2])), rtol=0,
                               atol=1e-6)
    shift = Shift(shift=jnp.broadcast_to(_unit(3), (L, D)),
                  site_mask=iv.make_site_mask(L, 1, ("mlp_out",)))
    np.testing.assert_allclose(_logits(shifted), _logits(shift), rtol=0, atol=1e-6)
    assert np.abs(_logits(scaled) - _logits(None)).max() > 1e-2  # the toy edit acts

    traces = []

    @jax.jit
    def run(intervention):
        traces.append(None)  # runs only while tracing
        return forward(_params(), *map(jnp.asarray, _batch()), config=CONFIG,
                       intervention=intervention).logits

    for intervention in (empty, scaled, shifted):
        run(intervention)
    assert len(traces) == 1  # one program for every fill


def test_parts_that_collide_compose_forms_in_order():
    kinds = ("test_scaled_ablation",)
    first, second = _scaled_part(4, 2.0, [1]), _scaled_part(5, 1.0, [1, 2])
    composed = iv.common_form([first, second], kinds=kinds, n_layers=L, width=D)
    assert len(composed.interventions) == 2  # the second part found layer 1 taken
    expected = iv.Compose((_scaled(4, 2.0, [1]), _scaled(5, 1.0, [1, 2])))
    np.testing.assert_allclose(_logits(composed), _logits(expected), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="outside the form's kinds"):
        iv.common_form([first], kinds=("ablation",), n_layers=L, width=D)
    with pytest.raises(ValueError, match="no value field 'alpha'"):
        iv.fill(ScaledAblation.zeros(L, D, 1), iv.Part("test_scaled_ablation", [0],
                                                       ("resid_pre",), dict(alpha=2.0)))


def test_candidate_stacking_takes_new_kinds():
    parts = [_scaled_part(6, 2.0, [0]), _scaled_part(7, 1.0, [0, 1, 2]),
             iv.Part("test_shift", [2], ("resid_pre",), dict(shift=_unit(8)))]
    kinds = ("test_scaled_ablation", "test_shift")
    stacked = stack_parts(parts, kinds=kinds, n_layers=L, width=D)
    tokens, valid = map(jnp.asarray, _batch())
    all_at_once = jax.jit(jax.vmap(lambda candidate: forward(
        _params(), tokens, valid, config=CONFIG, intervention=candidate).logits))(stacked)
    for index, part in enumerate(parts):
        alone = iv.common_form([part], kinds=kinds, n_layers=L, width=D)
        np.testing.assert_allclose(np.asarray(all_at_once[index])[np.asarray(valid)],
                                   _logits(alone), atol=1e-5)


def test_folding_uses_a_new_kinds_rule_or_refuses_a_kind_without_one():
    ablation = _scaled(9, 1.0, None)
    hooked = _logits(ablation)
    params, config = iv.fold(_params(), ablation, config=CONFIG)
    np.testing.assert_allclose(_logits(None, params, config), hooked, atol=1e-4)
    assert np.abs(hooked - _logits(None)).max() > 0.05  # parity is not trivial
    with pytest.raises(ValueError, match="only a scale of 1"):
        iv.fold(_params(), _scaled(9, 2.0, None), config=CONFIG)
    with pytest.raises(TypeError, match="Shift has no folding rule"):
        iv.fold(_params(), Shift.zeros(L, D, 1), config=CONFIG)


# ------------------------------------------------------------------------- the variant table


def _study_inputs(n_positions=2, k=2):
    """A model, directions and a selection of one component per method, for build_variants."""
    rng = np.random.default_rng(10)
    model = types.SimpleNamespace(config=CONFIG, params=_params())
    basis = np.linalg.qr(rng.normal(size=(D, k)))[0].T.astype(np.float32)
    directions = {
        "dim": rng.normal(size=(n_positions, L, D)).astype(np.float32),
        "harmless_mean": rng.normal(size=(n_positions, L, D)).astype(np.float32),
        "inlp_basis": np.broadcast_to(basis, (n_positions, L, k, D)).copy(),
        "inlp_n_directions": np.full((n_positions, L), k),
        "inlp_dev_accuracies": np.full((n_positions, L, k), 0.9, np.float32),
        "inlp_majority_rate": np.full((n_positions, L), 0.5, np.float32),
        "inlp_first_direction": np.broadcast_to(basis[0], (n_positions, L, D)).copy(),
        "inlp_converged": np.ones((n_positions, L, k), bool),
        "inlp_solver_steps": np.ones((n_positions, L, k), np.int32),
        "leace_read": rng.normal(size=(n_positions, L, 1, D)).astype(np.float32),
        "leace_write": rng.normal(size=(n_positions, L, 1, D)).astype(np.float32),
        "leace_mean": rng.normal(size=(n_positions, L, D)).astype(np.float32),
    }
    selection = {"dim": {"components": [dict(position=-1, position_index=1, layer=1)]},
                 "inlp": {"components": [dict(position=-2, position_index=0, layer=2, k=k)]}}
    return model, directions, selection


def _form(intervention):
    leaves, structure = jax.tree.flatten(intervention)
    return structure, [leaf.shape for leaf in leaves]


def test_every_hooked_variant_has_one_form():
    model, directions, selection = _study_inputs()
    built = variants.build_variants(model, directions, selection, base_config(),
                                    names=list(variants.VARIANTS))
    hooked = [v for v in built if v.params is None]
    assert [v.name for v in built if v.params is not None] == ["dim_folded"]
    forms = {str(_form(intervention)) for v in hooked for intervention in (v.harmful, v.harmless)}
    assert len(forms) == 1
    assert all("{" not in v.description for v in built)


def test_a_variant_of_a_new_kind_joins_the_table(monkeypatch):
    """A new variant is a row of the table (and its kind in ``FORM_KINDS``)."""
    monkeypatch.setattr(variants, "FORM_KINDS", (*variants.FORM_KINDS, "test_scaled_ablation"))
    monkeypatch.setitem(variants.VARIANTS, "dim_half_ablation", variants.VariantSpec(
        "DiM ablation at half strength at {dim_where}",
        harmful=lambda c: c.form([iv.Part("test_scaled_ablation", [c.best["layer"]],
                                          iv.ABLATION_SITES,
                                          dict(direction=_unit(11), scale=0.5))])))
    model, directions, selection = _study_inputs()
    half, baseline = variants.build_variants(model, directions, selection, base_config(),
                                             names=["dim_half_ablation", "baseline"])
    assert half.description == "DiM ablation at half strength at (pos -1, layer 1)"
    assert _form(half.harmful) == _form(baseline.harmful)
    np.testing.assert_allclose(_logits(half.harmful), _logits(_scaled(11, 0.5, [1])), rtol=0,
                               atol=1e-6)
