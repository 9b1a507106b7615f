"""The intervention algebra: pure maps, per-layer pytrees in the forward, vmap, no recompiles."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_decoder import CONFIG, D, L, run_forward
from tiny_decoder import batch as _batch
from tiny_decoder import params as _params

from refusal_jax import interventions as iv
from refusal_jax.models.core import forward


def _rng(seed=0):
    return np.random.default_rng(seed)


def _orthonormal(k, d=D, seed=0):
    q, _ = np.linalg.qr(_rng(seed).normal(size=(d, k)))
    return q.T.astype(np.float32)  # [k, d]


def _unit(d=D, seed=0):
    r = _rng(seed).normal(size=d).astype(np.float32)
    return r / np.linalg.norm(r)


def _context(valid):
    positions = np.where(valid, np.cumsum(valid, axis=1) - 1, -1).astype(np.int32)
    return iv.SiteContext(positions=jnp.asarray(positions), valid=jnp.asarray(valid))


def _matrix(fn):
    """The matrix M of a linear map on row vectors (fn(x) = x @ M), from the identity's rows."""
    return np.asarray(fn(jnp.eye(D)))


# ---------------------------------------------------------------------------------- pure maps


def test_projection_is_symmetric_idempotent_and_removes_exactly_the_used_rows():
    basis = _orthonormal(3)
    basis[1] = 0.0  # an unused direction
    P = _matrix(lambda x: iv.project_out(x, basis))
    np.testing.assert_allclose(P, P.T, atol=1e-6)
    np.testing.assert_allclose(P @ P, P, atol=1e-6)
    np.testing.assert_allclose(basis[[0, 2]] @ P, 0.0, atol=1e-6)
    assert np.isclose(np.trace(P), D - 2, atol=1e-5)  # the zero row removed nothing


def test_ablation_is_the_rank_one_projection():
    r_hat = _unit()
    x = _rng(2).normal(size=(5, D)).astype(np.float32)
    ablated = np.asarray(iv.ablate(x, r_hat))
    np.testing.assert_allclose(ablated @ r_hat, 0.0, atol=1e-6)
    np.testing.assert_allclose(ablated, x - np.outer(x @ r_hat, r_hat), atol=1e-6)


def test_reflection_with_alpha_two_is_an_involution_and_alpha_one_is_projection():
    basis = _orthonormal(2)
    R = _matrix(lambda x: iv.reflect(x, basis, 2.0))
    np.testing.assert_allclose(R @ R, np.eye(D), atol=1e-6)
    np.testing.assert_allclose(basis @ R, -basis, atol=1e-6)  # the subspace is negated
    np.testing.assert_allclose(_matrix(lambda x: iv.reflect(x, basis, 1.0)),
                               _matrix(lambda x: iv.project_out(x, basis)), atol=1e-7)


def test_clamp_is_idempotent_and_moves_the_harmful_mean_onto_the_harmless_mean():
    rng = _rng(3)
    harmless_mean = rng.normal(size=D).astype(np.float32)
    basis = _orthonormal(2, seed=4)
    harmful_mean = harmless_mean + basis.T @ np.array([3.0, -2.0], np.float32)
    # The class means differ only inside the subspace, so the clamp maps one onto the other.
    np.testing.assert_allclose(iv.clamp_subspace(harmful_mean, basis, harmless_mean),
                               harmless_mean, atol=1e-5)
    x = rng.normal(size=(6, D)).astype(np.float32)
    once = iv.clamp_subspace(x, basis, harmless_mean)
    np.testing.assert_allclose(iv.clamp_subspace(once, basis, harmless_mean), once, atol=1e-5)
    np.testing.assert_allclose(once @ basis.T, np.tile(harmless_mean @ basis.T, (6, 1)), atol=1e-5)
    np.testing.assert_allclose(iv.project_out(once, basis), iv.project_out(x, basis), atol=1e-5)


def test_oblique_eraser_matches_its_formula_and_treats_writes_by_their_linear_part():
    rng = _rng(5)
    read, write = rng.normal(size=(2, 2, D)).astype(np.float32)
    mean = rng.normal(size=D).astype(np.float32)
    stream, written = rng.normal(size=(2, 4, D)).astype(np.float32)
    np.testing.assert_allclose(iv.oblique_erase(stream, read, write, mean),
                               stream - ((stream - mean) @ read.T) @ write, atol=1e-5)
    eraser = iv.at_layer(iv.oblique_eraser(read, write, mean, n_layers=L, layers=None), 0)
    ctx = _context(np.ones((1, 4), bool))
    # f(s + a) = f(s) + (linear part)(a): erasing the stream before and after a write agree.
    after_write = eraser.apply("resid_pre", stream + written, ctx)
    before_write = eraser.apply("resid_pre", stream, ctx) + eraser.apply("attn_out", written, ctx)
    np.testing.assert_allclose(after_write, before_write, atol=1e-5)


def test_leace_eraser_from_the_directions_module_applies_as_fitted():
    from refusal_jax.directions.leace import erase, fit_leace

    rng = _rng(13)
    labels = np.repeat([0, 1], 20)
    features = rng.normal(size=(40, D)).astype(np.float32) + 2.0 * labels[:, None] * _unit(seed=14)
    fitted = fit_leace(features, labels)
    eraser = iv.oblique_eraser(fitted.A, fitted.B, fitted.mean, n_layers=L, layers=None)
    ctx = _context(np.ones((1, 40), bool))
    applied = iv.at_layer(eraser, 0).apply("resid_pre", jnp.asarray(features[None]), ctx)[0]
    np.testing.assert_allclose(applied, erase(fitted, features), atol=1e-5)
    class_gap = applied[labels == 1].mean(0) - applied[labels == 0].mean(0)
    assert np.abs(class_gap).max() < 1e-4  # LEACE: the erased class means coincide


def test_edits_keep_the_activation_dtype_and_compute_in_float32():
    basis = _orthonormal(2)
    reflection = iv.at_layer(iv.counterfactual_reflection(basis, 2.0, n_layers=L, layers=0), 0)
    x = jnp.asarray(_rng(15).normal(size=(1, 3, D)), jnp.bfloat16)
    out = reflection.apply("resid_pre", x, _context(np.ones((1, 3), bool)))
    assert out.dtype == jnp.bfloat16
    expected = iv.reflect(x.astype(jnp.float32), basis, 2.0).astype(jnp.bfloat16)
    np.testing.assert_array_equal(out, expected)


def test_composition_applies_its_parts_in_order():
    r_hat = _unit()
    add = iv.at_layer(iv.activation_addition(r_hat, 3.0, n_layers=L, layers=0), 0)
    ablation = iv.at_layer(iv.directional_ablation(r_hat, n_layers=L, layers=0), 0)
    x = jnp.asarray(_rng(6).normal(size=(2, 7, D)), jnp.float32)
    ctx = _context(np.ones((2, 7), bool))
    add_then_ablate = iv.Compose((add, ablation)).apply("resid_pre", x, ctx)
    ablate_then_add = iv.Compose((ablation, add)).apply("resid_pre", x, ctx)
    np.testing.assert_array_equal(
        add_then_ablate, ablation.apply("resid_pre", add.apply("resid_pre", x, ctx), ctx))
    np.testing.assert_allclose(add_then_ablate @ r_hat, 0.0, atol=1e-5)
    np.testing.assert_allclose(ablate_then_add @ r_hat, 3.0, atol=1e-5)


def test_activation_addition_acts_only_on_valid_tokens_inside_the_window():
    r_hat = _unit()
    _, valid = _batch()
    ctx = _context(valid)  # row 0 positions 0..6, row 1 positions -1,-1,-1,0..3
    # Per-prompt windows: row 0 its last two prompt tokens, row 1 all positions >= -10, which
    # would include its padding (position -1) if padding were not excluded.
    add = iv.activation_addition(r_hat, 2.0, n_layers=L, layers=1,
                                 position_start=np.array([5, -10]), position_stop=np.array([7, 99]))
    x = jnp.zeros((2, 7, D))
    added = np.asarray(iv.at_layer(add, 1).apply("resid_pre", x, ctx) @ r_hat)
    expected = np.array([[0, 0, 0, 0, 0, 2, 2], [0, 0, 0, 2, 2, 2, 2]], np.float32)
    np.testing.assert_allclose(added, expected, atol=1e-6)
    untouched = iv.at_layer(add, 0).apply("resid_pre", x, ctx)  # layer 0 not selected
    np.testing.assert_array_equal(untouched, x)
    assert not np.asarray(iv.at_layer(add, 1).apply("attn_out", x, ctx)).any()  # site not selected


# ------------------------------------------------------------------------ in the real forward


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _ComponentProbe:
    """Records max |x . r_hat| and max |x| at every site it is applied to (returns x unchanged)."""

    direction: jax.Array  # [L, D]

    def apply(self, site, x, ctx):
        jax.debug.callback(functools.partial(_record, site),
                           jnp.max(jnp.abs(x @ self.direction)), jnp.max(jnp.abs(x)))
        return x


_RECORDED: list = []


def _record(site, component, magnitude):
    _RECORDED.append((site, float(component), float(magnitude)))


def _components_at_sites(intervention, r_hat):
    _RECORDED.clear()
    probe = _ComponentProbe(direction=jnp.broadcast_to(r_hat, (L, D)))
    composed = probe if intervention is None else iv.Compose((intervention, probe))
    tokens, valid = _batch()
    jax.block_until_ready(run_forward(_params(), tokens, valid, config=CONFIG,
                                      intervention=composed, logits="none").captures)
    jax.effects_barrier()
    return list(_RECORDED)


def test_ablation_leaves_no_component_along_r_hat_at_any_site_of_any_layer():
    r_hat = _unit(seed=7)
    # Control: without the ablation the component is clearly there.
    baseline = _components_at_sites(None, r_hat)
    assert max(component for _, component, _ in baseline) > 0.1
    recorded = _components_at_sites(iv.directional_ablation(r_hat, n_layers=L, layers=None), r_hat)
    assert sorted({site for site, _, _ in recorded}) == sorted(iv.SITES)
    assert len(recorded) == L * len(iv.SITES)
    for site, component, magnitude in recorded:
        assert component <= 1e-6 * max(magnitude, 1.0), (site, component, magnitude)


def _captured_block_inputs(intervention, params):
    tokens, valid = _batch()
    capture = jnp.tile(jnp.arange(7)[None], (2, 1))
    out = run_forward(params, tokens, valid, config=CONFIG, intervention=intervention,
                      capture_positions=capture, logits="none")
    return np.asarray(out.captures)[valid]  # [tokens, L, D]


def test_reference_reflection_flips_back_at_the_second_layer_and_the_clamp_does_not():
    # Blocks that write nothing, so the stream only changes where the intervention acts.
    silent = dataclasses.replace(_params(), layers=dataclasses.replace(
        _params().layers, o_proj=jnp.zeros_like(_params().layers.o_proj),
        down_proj=jnp.zeros_like(_params().layers.down_proj)))
    basis = _orthonormal(2, seed=8)
    stream = _captured_block_inputs(None, silent)[:, 0]
    flipped = np.asarray(iv.reflect(stream, basis, 2.0))
    assert np.abs(flipped - stream).max() > 0.01  # the flip is visible

    reflection = iv.counterfactual_reflection(basis, 2.0, n_layers=L, layers=[1, 2])
    seen = _captured_block_inputs(reflection, silent)
    np.testing.assert_allclose(seen[:, 1], flipped, atol=1e-5)   # first selected layer: flipped
    np.testing.assert_allclose(seen[:, 2], stream, atol=1e-5)    # second one: flipped back

    target = _rng(9).normal(size=D).astype(np.float32)
    clamp = iv.subspace_clamp(basis, target, n_layers=L, layers=[1, 2])
    seen = _captured_block_inputs(clamp, silent)
    clamped = np.asarray(iv.clamp_subspace(stream, basis, target))
    np.testing.assert_allclose(seen[:, 1], clamped, atol=1e-5)
    np.testing.assert_allclose(seen[:, 2], clamped, atol=1e-5)   # stays at the target


def test_clamp_keeps_target_coordinates_through_a_block_that_writes():
    basis = _orthonormal(2, seed=10)
    target = _rng(11).normal(size=D).astype(np.float32)
    clamp = iv.subspace_clamp(basis, target, n_layers=L, layers=[1])
    seen = _captured_block_inputs(clamp, _params())
    expected = np.tile(target @ basis.T, (seen.shape[0], 1))
    np.testing.assert_allclose(seen[:, 1] @ basis.T, expected, atol=1e-5)
    # Layer 1 wrote through attn_out/mlp_out; the clamp's linear part kept those writes out.
    np.testing.assert_allclose(seen[:, 2] @ basis.T, expected, atol=1e-5)


def _logits(params, intervention):
    tokens, valid = _batch()
    return run_forward(params, tokens, valid, config=CONFIG, intervention=intervention).logits


def test_vmapped_candidates_equal_applying_each_one():
    basis = _orthonormal(3, seed=12)
    candidates = [
        iv.Compose((
            iv.activation_addition(_unit(seed=s), 1.0 + s, n_layers=L, layers=s % L),
            iv.counterfactual_reflection(basis * (np.arange(3) < s + 1)[:, None], 1.0 + s / 2,
                                         n_layers=L, layers=[s % L, (s + 1) % L]),
        ))
        for s in range(3)
    ]
    stacked = iv.stack(candidates)
    all_at_once = jax.jit(jax.vmap(lambda c: _logits(_params(), c)))(stacked)
    for index, candidate in enumerate(candidates):
        np.testing.assert_allclose(all_at_once[index], _logits(_params(), candidate), atol=1e-5)
    assert np.abs(np.asarray(all_at_once[0] - all_at_once[1])).max() > 1e-2  # they differ


def test_changing_directions_alphas_and_layers_does_not_recompile():
    traces = []
    tokens, valid = _batch()

    @jax.jit
    def run(params, intervention):
        traces.append(None)  # runs only while tracing
        return forward(params, tokens, valid, config=CONFIG, intervention=intervention).logits

    for seed, alpha, layers in [(0, 1.0, None), (1, 2.0, [0]), (2, 0.5, [1, 2])]:
        run(_params(), iv.counterfactual_reflection(_orthonormal(2, seed=seed), alpha,
                                                    n_layers=L, layers=layers))
    assert len(traces) == 1 and run._cache_size() == 1
    # Control: a new shape (k = 3) must compile again, so the counter does count.
    run(_params(), iv.counterfactual_reflection(_orthonormal(3), 2.0, n_layers=L, layers=None))
    assert len(traces) == 2 and run._cache_size() == 2


# ----------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("build, message", [
    (lambda: iv.directional_ablation(_unit(), n_layers=L, layers=None, sites=("resid",)),
     "sites must be a non-empty subset"),
    (lambda: iv.directional_ablation(_unit(), n_layers=L, layers=None, sites="resid_pre"),
     "sequence of site names"),
    (lambda: iv.directional_ablation(_unit(), n_layers=L, layers=[0, 3]), r"layers \[3\] outside"),
    (lambda: iv.directional_ablation(_unit(), n_layers=L, layers=[]), "layers is empty"),
    (lambda: iv.directional_ablation(_unit(), n_layers=0, layers=None), "n_layers must be"),
    (lambda: iv.directional_ablation(np.zeros(D), n_layers=L, layers=None), "zero"),
    (lambda: iv.directional_ablation(np.ones((L + 1, D)), n_layers=L, layers=None),
     "leading axis of n_layers=3"),
    (lambda: iv.nullspace_projection(np.ones((2, D)), n_layers=L, layers=None), "orthonormal"),
    (lambda: iv.activation_addition(_unit(), 1.0, n_layers=L, layers=0,
                                    position_start=np.zeros((2, 2))), "scalar or one value"),
    (lambda: iv.oblique_eraser(np.ones((2, D)), np.ones((3, D)), np.zeros(D), n_layers=L,
                               layers=None), "differ"),
])
def test_bad_constructor_arguments_raise_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_apply_calls_raise_clear_errors():
    ablation = iv.directional_ablation(_unit(), n_layers=L, layers=None)
    ctx = _context(np.ones((1, 2), bool))
    with pytest.raises(ValueError, match="sliced to one layer"):
        ablation.apply("resid_pre", jnp.zeros((1, 2, D)), ctx)
    with pytest.raises(ValueError, match="unknown site 'resid_mid'"):
        iv.at_layer(ablation, 0).apply("resid_mid", jnp.zeros((1, 2, D)), ctx)
    with pytest.raises(ValueError, match="width 16, the intervention 32"):
        iv.at_layer(ablation, 0).apply("resid_pre", jnp.zeros((1, 2, 16)), ctx)


def test_stack_and_compatibility_checks_name_the_mismatch():
    small = iv.nullspace_projection(_orthonormal(2), n_layers=L, layers=None)
    large = iv.nullspace_projection(_orthonormal(3), n_layers=L, layers=None)
    with pytest.raises(ValueError, match="pad bases with zero rows"):
        iv.stack([small, large])
    iv.check_compatible(iv.stack([small, small]), n_layers=L, d_model=D)
    with pytest.raises(ValueError, match="built for 3 layers.*n_layers=4"):
        iv.check_compatible(iv.Compose((small,)), n_layers=4, d_model=D)
    with pytest.raises(ValueError, match="basis has width 32; the model's d_model is 64"):
        iv.check_compatible(small, n_layers=L, d_model=64)


def test_first_active_layer_is_the_lowest_layer_a_site_mask_turns_on():
    direction = np.ones(D, np.float32)
    late = iv.directional_ablation(direction, n_layers=L, layers=[L - 1])
    early = iv.activation_addition(direction, 1.0, n_layers=L, layers=[1])
    assert int(late.first_active_layer()) == L - 1
    assert int(iv.Compose((late, early)).first_active_layer()) == 1
    assert int(iv.stack([late, late]).first_active_layer()) == L - 1  # a stacked sweep
    assert int(iv.zero_form(["ablation"], n_layers=L, width=D).first_active_layer()) == L

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass(frozen=True)
    class Own:  # a user-defined kind cannot say where it acts: layer 0
        def apply(self, site, x, ctx):
            return x

    assert int(iv.Compose((late, Own())).first_active_layer()) == 0
