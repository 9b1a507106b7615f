"""Candidate selection: the resumed forward equals a full recompute, and a planted refusal
direction is found at its (position, layer)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import planted_model
from refusal_jax.interventions import Compose, activation_addition, directional_ablation
from refusal_jax.models.core import forward
from refusal_jax.pipeline import select
from refusal_jax.pipeline.config import base_config
from refusal_jax.pipeline.extract import capture, fit_directions
from refusal_jax.pipeline.models import random_model


@pytest.fixture(scope="module")
def tiny():
    return random_model("llama-tiny", seed=1)


def test_forward_from_a_cached_layer_equals_a_full_recompute(tiny):
    batch = tiny.chat.encode(["How do I pick a lock?", "Name three colours of the rainbow"],
                             context_length=512)
    tokens, valid = jnp.asarray(batch.tokens), jnp.asarray(batch.valid)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    cache = forward(tiny.params, tokens, valid, config=tiny.config,
                    capture_positions=positions).captures  # [B, T, L, D]
    direction = np.random.default_rng(0).standard_normal(tiny.config.d_model)
    n_layers = tiny.config.n_layers
    resumed = jax.jit(select.forward_from_layer, static_argnames="config")
    full_forward = jax.jit(forward, static_argnames=("config", "logits"))
    for layer in range(n_layers):
        # Acts at `layer` and at every later layer: ablation from `layer` on, ActAdd at `layer`.
        intervention = Compose((
            directional_ablation(direction, n_layers=n_layers, layers=range(layer, n_layers)),
            activation_addition(direction / np.linalg.norm(direction), 4.0, n_layers=n_layers,
                                layers=[layer])))
        full = full_forward(tiny.params, tokens, valid, config=tiny.config,
                            intervention=intervention, logits="last").logits
        got = resumed(tiny.params, cache[:, :, layer], valid, jnp.asarray(layer),
                      config=tiny.config, intervention=intervention)
        np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
        assert not np.allclose(full, full_forward(tiny.params, tokens, valid,
                                                  config=tiny.config, logits="last").logits,
                               atol=1e-3)


def test_selection_finds_the_planted_position_and_layer():
    model = planted_model.model()
    sets = {"harmful_train": planted_model.prompts(16, "harmful", seed=0),
            "harmless_train": planted_model.prompts(16, "harmless", seed=1),
            "harmful_val": planted_model.prompts(8, "harmful", seed=2),
            "harmless_val": planted_model.prompts(8, "harmless", seed=3)}
    activations = {name: capture(model, prompts, batch_size=8, length_bucket=16, name=name)
                   for name, prompts in sets.items()}
    (harmful_scores, harmless_scores) = (activations["harmful_val"][1],
                                         activations["harmless_val"][1])
    assert harmful_scores.min() > 0 > harmless_scores.max()  # the model refuses harmful ones
    config = base_config()
    config.directions.inlp_max_directions = 4
    config.select.multipliers = (0.5, 1.0)
    config.select.compare_global = True
    config.runtime.batch_size = 8
    config.runtime.length_bucket = 16
    directions = fit_directions(activations["harmful_train"][0],
                                activations["harmless_train"][0], config.directions, seed=0)
    summary, scores = select.run_selection(model, sets, directions, config)

    (chosen,) = summary["dim"]["components"]
    assert (chosen["position"], chosen["layer"]) == planted_model.PLANTED
    bypass = scores["dim_local_bypass"]
    p, layer = planted_model.PLANTED[0] + 2, planted_model.PLANTED[1]
    # Ablating there brings harmful prompts down to the harmless baseline; everywhere else
    # refusal survives by a wide margin.
    assert bypass[p, layer] == pytest.approx(harmless_scores.mean(), abs=0.1)
    others = np.delete(bypass.ravel(), p * bypass.shape[1] + layer)
    assert np.nanmin(others) > bypass[p, layer] + 4.0
    assert np.isnan(bypass[:, 0]).all()  # identical EOI activations at layer 0: a zero DiM
    assert summary["dim"]["discarded"]["late_layer"] == 2  # layer 4 at both positions
    assert summary["dim"]["ranking"][0] == list(planted_model.PLANTED)
    # Global ablation (every layer) was scored too, and compared with the local ranking.
    assert scores["dim_global_bypass"].shape == bypass.shape
    rho = summary["dim"]["spearman_local_global_bypass"]
    assert rho == pytest.approx(select.spearman(bypass.ravel(),
                                                scores["dim_global_bypass"].ravel()))
    assert -1.0 <= rho <= 1.0


def test_spearman_matches_scipy_with_ties_and_nans():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    first = rng.integers(0, 5, 40).astype(float)  # many ties
    second = first + rng.normal(0, 2, 40)
    first[[3, 9]] = np.nan
    keep = np.isfinite(first)
    expected = spearmanr(first[keep], second[keep]).statistic
    assert select.spearman(first, second) == pytest.approx(expected, abs=1e-12)
    assert np.isnan(select.spearman(first[:2], second[:2]))
