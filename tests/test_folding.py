"""Weight folding: the unhooked folded model equals the hooked one, and exports to transformers."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_reference import hf_logits, ragged_batch, tiny_hf_model, to_ours

from refusal_jax import interventions as iv
from refusal_jax.interventions import fold
from refusal_jax.interventions.export import export_hf_checkpoint
from refusal_jax.models.config import ModelConfig
from refusal_jax.models.core import forward
from refusal_jax.models.params import map_specs, param_specs

TOLERANCE = 1e-4  # float32 logits
# An intervention that moves the logits by less than this would make parity meaningless.
MIN_EFFECT = 0.05

_SHAPES = dict(vocab_size=96, d_model=48, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=12,
               d_ff=64, max_context=64)
CONFIGS = {
    "llama_untied": ModelConfig(family="llama", **_SHAPES),
    "qwen2_tied_bias": ModelConfig(family="qwen2", tie_embeddings=True, qkv_bias=True, **_SHAPES),
    "gemma_tied_scaled": ModelConfig(family="gemma", tie_embeddings=True, activation="gelu_tanh",
                                     norm_weight_offset=1.0, scale_embeddings=True, **_SHAPES),
}
# Not in CONFIGS: projections cannot be folded for Gemma2 (post-norms), ActAdd at layer 0 can.
GEMMA2 = ModelConfig(family="gemma2", tie_embeddings=True, activation="gelu_tanh",
                     norm_weight_offset=1.0, scale_embeddings=True, post_norms=True,
                     attn_softcap=50.0, final_softcap=30.0, **_SHAPES)
L, D = _SHAPES["n_layers"], _SHAPES["d_model"]
run_forward = jax.jit(forward, static_argnames=("config", "logits"))


@functools.cache
def _params(name):
    """Random weights (numpy, so no compilation): N(0, 0.1^2), norms near their identity."""
    config = GEMMA2 if name == "gemma2" else CONFIGS[name]
    rng = np.random.default_rng(0)

    def init(spec):
        identity = 1.0 - config.norm_weight_offset if spec.is_norm else 0.0
        return jnp.asarray(identity + 0.1 * rng.normal(size=spec.shape), jnp.float32)

    return map_specs(init, param_specs(config))


def _unit(seed=0, d=D):
    r = np.random.default_rng(seed).normal(size=d).astype(np.float32)
    return r / np.linalg.norm(r)


def _orthonormal(k, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(D, k)))
    return q.T.astype(np.float32)


def _logits(params, config, intervention=None):
    tokens, valid = ragged_batch(vocab=config.vocab_size)
    logits = run_forward(params, tokens, valid, config=config, intervention=intervention).logits
    return np.asarray(logits)[valid]


def _assert_folded_equals_hooked(name, intervention):
    config, params = GEMMA2 if name == "gemma2" else CONFIGS[name], _params(name)
    hooked = _logits(params, config, intervention)
    assert np.abs(hooked - _logits(params, config)).max() > MIN_EFFECT
    folded_params, folded_config = fold(params, intervention, config=config)
    diff = np.abs(_logits(folded_params, folded_config) - hooked).max()
    assert diff <= TOLERANCE, f"{name}: folded vs hooked max |diff| {diff:.2e}"
    return folded_params, folded_config


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_global_directional_ablation_folds_exactly(name):
    ablation = iv.directional_ablation(_unit(1), n_layers=L, layers=None)
    folded, config = _assert_folded_equals_hooked(name, ablation)
    # Every writer now writes nothing along r_hat.
    r_hat = _unit(1)
    for writer in (folded.embed, folded.layers.o_proj, folded.layers.down_proj):
        assert np.abs(np.asarray(writer) @ r_hat).max() < 1e-6
    if CONFIGS[name].tie_embeddings:  # untied: the LM head keeps the original embedding
        assert not config.tie_embeddings
        np.testing.assert_array_equal(folded.lm_head, _params(name).embed.T)


def test_global_nullspace_projection_with_an_unused_direction_folds_exactly():
    basis = _orthonormal(3, seed=2)
    basis[2] = 0.0
    projection = iv.nullspace_projection(basis, n_layers=L, layers=None)
    _assert_folded_equals_hooked("qwen2_tied_bias", projection)


def test_ablating_only_the_writes_of_some_layers_folds_exactly():
    ablation = iv.directional_ablation(_unit(3), n_layers=L, layers=[0, 2],
                                       sites=("attn_out", "mlp_out"))
    folded, _ = _assert_folded_equals_hooked("llama_untied", ablation)
    original = _params("llama_untied")
    np.testing.assert_array_equal(folded.embed, original.embed)  # the embedding is not a site
    np.testing.assert_array_equal(folded.layers.o_proj[1], original.layers.o_proj[1])


def test_activation_addition_at_the_first_block_input_folds_into_the_embedding():
    # Gemma2: scaled, tied embeddings; its post-norms do not matter for the embedding route.
    add = iv.activation_addition(_unit(4), 2.0, n_layers=L, layers=0)
    _assert_folded_equals_hooked("gemma2", add)


def test_folded_ablation_exports_to_transformers_with_the_hooked_logits(tmp_path):
    model = tiny_hf_model("qwen2_gqa_bias", seed=3)  # tied embeddings, QKV biases
    config, params = to_ours(model)
    r_hat = _unit(5, d=config.d_model)
    ablation = iv.directional_ablation(r_hat, n_layers=config.n_layers, layers=None)
    tokens, valid = ragged_batch(vocab=config.vocab_size)
    hooked = np.asarray(run_forward(params, tokens, valid, config=config,
                                    intervention=ablation).logits)
    folded_params, folded_config = fold(params, ablation, config=config)
    directory = export_hf_checkpoint(tmp_path / "ablated", folded_params, folded_config,
                                     hf_config=model.config.to_dict())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert not reloaded.config.tie_word_embeddings
    diff = np.abs(hf_logits(reloaded.eval(), tokens, valid) - hooked)[valid]
    assert diff.max() <= TOLERANCE, f"exported vs hooked max |diff| {diff.max():.2e}"
    assert np.abs(hooked - hf_logits(model, tokens, valid))[valid].max() > MIN_EFFECT


# ----------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("intervention, message", [
    (iv.directional_ablation(_unit(), n_layers=L, layers=[1]), "resid_pre of layer 1 cannot be"),
    (iv.directional_ablation(_unit(), n_layers=L, layers=None, sites=("attn_out", "resid_post")),
     "resid_post of layer 0 cannot be"),
    (iv.nullspace_projection(np.stack([_orthonormal(2, seed=s) for s in range(L)]), n_layers=L,
                             layers=None), "resid_pre of layer 1 cannot be"),
    (dataclasses.replace(iv.directional_ablation(_unit(), n_layers=L, layers=None),
                         site_mask=jnp.full((L, 4), 0.5)), "other than 0 and 1"),
    (iv.directional_ablation(_unit(), n_layers=L + 1, layers=None), r"needs \(3, 4\)"),
])
def test_interventions_without_an_exact_weight_form_are_refused(intervention, message):
    with pytest.raises(ValueError, match=message):
        fold(_params("llama_untied"), intervention, config=CONFIGS["llama_untied"])


def test_kinds_without_a_weight_form_are_refused_by_type():
    params, config = _params("llama_untied"), CONFIGS["llama_untied"]
    reflection = iv.counterfactual_reflection(_orthonormal(2), 2.0, n_layers=L, layers=None)
    with pytest.raises(TypeError, match="CounterfactualReflection has no folding rule"):
        fold(params, reflection, config=config)
    clamp = iv.subspace_clamp(_orthonormal(2), _unit(), n_layers=L, layers=None)
    with pytest.raises(TypeError, match="SubspaceClamp has no folding rule"):
        fold(params, clamp, config=config)
    with pytest.raises(TypeError, match="Compose has no folding rule"):
        fold(params, iv.Compose((reflection,)), config=config)


@pytest.mark.parametrize("intervention, message", [
    (iv.activation_addition(_unit(), 1.0, n_layers=L, layers=1), "only at resid_pre of layer 0"),
    (iv.activation_addition(_unit(), 1.0, n_layers=L, layers=0, sites=("attn_out",)),
     "only at resid_pre of layer 0"),
    (iv.activation_addition(_unit(), 1.0, n_layers=L, layers=0, position_start=2),
     "position-windowed"),
])
def test_activation_addition_without_an_exact_weight_form_is_refused(intervention, message):
    with pytest.raises(ValueError, match=message):
        fold(_params("llama_untied"), intervention, config=CONFIGS["llama_untied"])


def test_projections_are_refused_for_gemma2_post_norms():
    ablation = iv.directional_ablation(_unit(), n_layers=L, layers=None)
    with pytest.raises(ValueError, match="reintroduces the direction"):
        fold(_params("gemma2"), ablation, config=GEMMA2)
