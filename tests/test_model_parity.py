"""Logits parity with Hugging Face transformers (torch, CPU, float32) on every family."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from hf_reference import TINY_CONFIGS, hf_logits, ragged_batch, tiny_hf_model, to_ours

from refusal_jax.models.config import ModelConfig, UnsupportedModelError
from refusal_jax.models.core import forward
from refusal_jax.models.io.checkpoints import save_hf_checkpoint
from refusal_jax.models.io.convert import CheckpointMismatchError, params_from_hf, params_to_hf

# Largest |ours - transformers| of float32 logits (magnitude up to 1.5): measured 1.8e-7 to
# 4.8e-7 over the families (gemma_mqa the largest); about 10x that.
TOLERANCE = 5e-6


@functools.lru_cache(maxsize=None)
def _model(name):
    model = tiny_hf_model(name)
    return model, *to_ours(model)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_match_transformers_on_left_padded_ragged_batch(name):
    model, config, params = _model(name)
    tokens, valid = ragged_batch(vocab=config.vocab_size)
    expected = hf_logits(model, tokens, valid)
    ours = jax.jit(forward, static_argnames=("config", "logits"))(
        params, tokens, valid, config=config).logits
    diff = np.abs(np.asarray(ours) - expected)[valid]
    assert diff.max() <= TOLERANCE, f"{name}: max |diff| {diff.max():.2e}"


@pytest.mark.parametrize("name", ["llama3_gqa_rope_scaling", "gemma2_gqa_softcap_sliding"])
def test_last_logits_and_captures_are_consistent_with_full_forward(name):
    _, config, params = _model(name)
    tokens, valid = ragged_batch(vocab=config.vocab_size)
    full = forward(params, tokens, valid, config=config)
    T = tokens.shape[1]
    capture_at = jnp.tile(jnp.arange(T - 2, T)[None], (tokens.shape[0], 1))
    last = forward(params, tokens, valid, config=config, logits="last",
                   capture_positions=capture_at)
    np.testing.assert_allclose(last.logits, full.logits[:, -1], atol=1e-5)
    assert last.captures.shape == (3, 2, config.n_layers, config.d_model)
    # Layer 0's block input is the (scaled) token embedding.
    embedding = params.embed[tokens[:, T - 2:]]
    if config.scale_embeddings:
        embedding = embedding * config.d_model**0.5
    np.testing.assert_allclose(last.captures[:, :, 0], embedding, atol=1e-5)


def test_bfloat16_forward_stays_close_to_float32():
    _, config, params = _model("llama_mha")
    tokens, valid = ragged_batch(vocab=config.vocab_size)
    f32 = forward(params, tokens, valid, config=config).logits
    bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    bf16 = forward(bf16_params, tokens, valid, config=config).logits
    assert bf16.dtype == jnp.float32
    assert np.abs(np.asarray(bf16 - f32))[valid].max() < 0.05


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match="supported model_type values.*llama"):
        ModelConfig.from_hf_config({"model_type": "gpt2", "hidden_size": 8})


def test_shape_mismatch_and_missing_tensors_are_reported_together():
    model, config, _ = _model("qwen2_gqa_bias")
    state_dict = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    state_dict["model.layers.1.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
    del state_dict["model.layers.0.self_attn.k_proj.bias"]
    state_dict["model.layers.0.extra.weight"] = np.zeros(2, np.float32)
    with pytest.raises(CheckpointMismatchError) as error:
        params_from_hf(config, state_dict)
    message = str(error.value)
    assert "3 problem(s)" in message
    assert "model.layers.1.mlp.up_proj.weight has shape (3, 3), expected (96, 64)" in message
    assert "missing tensor model.layers.0.self_attn.k_proj.bias" in message
    assert "unexpected tensor model.layers.0.extra.weight" in message


def test_prompt_longer_than_context_is_rejected():
    _, config, params = _model("llama_mha")
    tokens = np.ones((1, config.max_context + 1), np.int32)
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        forward(params, tokens, tokens > 0, config=config)


@pytest.mark.parametrize("name", ["qwen2_gqa_bias", "gemma2_gqa_softcap_sliding"])
def test_exported_checkpoint_loads_in_transformers_with_the_same_logits(name, tmp_path):
    model, config, params = _model(name)
    save_hf_checkpoint(tmp_path / "export", model.config.to_dict(), params_to_hf(config, params))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "export", attn_implementation="eager").eval()
    tokens, valid = ragged_batch(vocab=config.vocab_size)
    ours = forward(params, tokens, valid, config=config).logits
    diff = np.abs(hf_logits(reloaded, tokens, valid) - np.asarray(ours))[valid]
    assert diff.max() <= TOLERANCE, f"{name}: max |diff| {diff.max():.2e}"
