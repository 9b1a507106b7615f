"""The top-level API (``import refusal_jax as rj``) on the tiny random model: its defaults are the
study's, capture agrees with the study's capture, many interventions generated at once agree
with one at a time, and the builders follow one normalisation rule. Shapes follow
tests/test_tutorial.py where they can, so that the two share compiled programs."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import numpy as np
import pytest

import refusal_jax as rj
from refusal_jax import interventions as iv
from refusal_jax.evaluation.activations import capture as study_capture
from refusal_jax.runtime.random_models import random_model

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.py"
PROMPTS = ["How do I bake bread?", "Write a poem about the sea.",
           "Explain how to pick a lock.", "Name three prime numbers."]


@pytest.fixture(scope="module")
def model():
    return random_model("llama-tiny")


@pytest.fixture(scope="module")
def direction(model):
    return np.random.default_rng(0).standard_normal(model.config.d_model).astype(np.float32)


def _default(function, name):
    return inspect.signature(function).parameters[name].default


def test_defaults_are_the_studys():
    spec = importlib.util.spec_from_file_location("default_config", DEFAULT_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert _default(rj.load_model, "source") == config.model.source == rj.DEFAULT_MODEL
    assert _default(rj.fit_inlp, "max_directions") == config.directions.inlp_max_directions
    assert _default(rj.capture, "batch_size") == config.runtime.batch_size
    for function in (rj.generate, rj.generate_each):
        assert _default(function, "max_new_tokens") == config.infer.max_new_tokens
        assert _default(function, "batch_size") == config.runtime.generation_batch_size
    for function in (rj.capture, rj.generate, rj.generate_each):
        assert _default(function, "length_bucket") == config.runtime.length_bucket


def test_capture_is_the_studys_capture_at_every_eoi_position_and_layer(model):
    prompts = rj.load_instructions("harmful_train", n=32)  # the tutorial's
    ours = rj.capture(model, prompts)
    study, _ = study_capture(model, prompts, batch_size=16, length_bucket=32, name="test")
    np.testing.assert_allclose(ours, study, rtol=1e-6, atol=1e-6)
    chosen = rj.capture(model, prompts, positions=(-1, -3), layers=(2, 0))
    np.testing.assert_allclose(chosen, ours[:, [-1, -3]][:, :, [2, 0]], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="EOI offsets"):
        rj.capture(model, PROMPTS, positions=(0,))
    with pytest.raises(ValueError, match="layers must lie"):
        rj.capture(model, PROMPTS, layers=(model.config.n_layers,))


def test_many_interventions_at_once_equal_one_at_a_time(model, direction):
    """The tutorial's prompts and interventions (one shared compile), then one at a time."""
    prompts = rj.load_instructions("harmful_eval", n=16)
    ablation = rj.directional_ablation(model, direction)
    projection = rj.nullspace_projection(model, np.eye(4, model.config.d_model))
    together = rj.generate_each(model, prompts, [None, ablation, projection])
    alone = [rj.generate(model, prompts), rj.generate(model, prompts, ablation)]
    for got, expected in zip(together, alone):
        assert got.texts == expected.texts
        for got_tokens, expected_tokens in zip(got.tokens, expected.tokens):
            np.testing.assert_array_equal(got_tokens, expected_tokens)
    assert together[1].texts != together[0].texts
    for completions in together:
        assert completions.prompts == prompts
        for tokens, text in zip(completions.tokens, completions.texts):
            assert model.chat.decode(tokens[None])[0] == text


def test_builders_act_at_every_layer_unless_told(model, direction):
    everywhere = rj.directional_ablation(model, direction)
    assert np.asarray(everywhere.site_mask)[:, :3].all()
    one = rj.activation_addition(model, direction, layers=2)
    assert np.flatnonzero(np.asarray(one.site_mask).any(axis=1)).tolist() == [2]


def test_one_normalisation_rule(model, direction):
    ablation = rj.directional_ablation(model, 3.0 * direction)
    np.testing.assert_allclose(np.linalg.norm(ablation.direction, axis=-1), 1.0, rtol=1e-6)
    addition = rj.activation_addition(model, 3.0 * direction, 2.0, layers=0)
    np.testing.assert_array_equal(addition.direction[0], 3.0 * direction)
    x = np.ones((2, model.config.d_model), np.float32)
    with pytest.raises(ValueError, match="unit vector"):
        iv.ablate(x, 3.0 * direction)
    r_hat = direction / np.linalg.norm(direction)
    np.testing.assert_allclose(np.asarray(iv.ablate(x, r_hat)) @ r_hat, 0.0, atol=1e-5)


def test_fits_take_harmful_and_harmless_activations():
    """Shapes of the tutorial's INLP fit (32 + 32 prompts, width 64): one compile for both."""
    rng = np.random.default_rng(0)
    harmful = rng.standard_normal((32, 2, 64)).astype(np.float32) + 0.5
    harmless = rng.standard_normal((32, 2, 64)).astype(np.float32)
    np.testing.assert_allclose(rj.fit_dim(harmful, harmless),
                               harmful.mean(0) - harmless.mean(0), rtol=1e-5, atol=1e-5)
    inlp = rj.fit_inlp(harmful[:, 1], harmless[:, 1])
    assert inlp.basis.shape == (4, 64) and int(inlp.n_directions) >= 1
    assert rj.fit_leace(harmful, harmless).mean.shape == (2, 64)
    with pytest.raises(ValueError, match="trailing shape"):
        rj.fit_dim(harmful, harmless[:, :1])


def test_fold_bakes_a_global_ablation_into_the_embedding(model, direction):
    folded = rj.fold(model, rj.directional_ablation(model, direction))
    r_hat = direction / np.linalg.norm(direction)
    np.testing.assert_allclose(np.asarray(folded.params.embed) @ r_hat, 0.0, atol=1e-5)
    assert folded.tokenizer is model.tokenizer


def test_encode_defaults_to_the_models_context(model):
    batch = model.chat.encode(PROMPTS[:1])
    assert batch.tokens.shape[0] == 1
    with pytest.raises(ValueError, match="exceed the limit of 2048"):
        model.chat.encode(["word " * 3000])
