"""Candidate selection: the resumed forward equals a full recompute, and a planted refusal
direction is found at its (position, layer)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import planted_model
import pytest

from refusal_jax.evaluation.activations import capture
from refusal_jax.interventions import Compose, activation_addition, directional_ablation
from refusal_jax.models import batching
from refusal_jax.models.core import forward
from refusal_jax.runtime.random_models import random_model
from refusal_jax.selection import ranking, scoring
from refusal_jax.study.config import base_config, check_config
from refusal_jax.study.stages import select
from refusal_jax.directions.fit import fit_directions


@pytest.fixture(scope="module")
def tiny():
    return random_model("llama-tiny", seed=1)


def _acting_from(layer, n_layers, direction):
    """Acts at `layer` and at every later layer: ablation from `layer` on, ActAdd at `layer`."""
    return Compose((
        directional_ablation(direction, n_layers=n_layers, layers=range(layer, n_layers)),
        activation_addition(direction / np.linalg.norm(direction), 4.0, n_layers=n_layers,
                            layers=[layer])))


@functools.partial(jax.jit, static_argnames="config")
def _resumed(params, resid, valid, start_layer, intervention, *, config):
    return forward(params, None, valid, config=config, intervention=intervention, resid=resid,
                   start_layer=start_layer, logits="last").logits


@functools.partial(jax.jit, static_argnames="config")
def _resumed_after_prefix(params, prefix, resid, valid, start_layer, intervention, *, config):
    return batching.forward_shared_prefix(params, prefix, resid, valid, config=config,
                                          intervention=intervention, start_layer=start_layer,
                                          logits="last").logits


def test_forward_from_a_cached_layer_equals_a_full_recompute(tiny):
    batch = tiny.chat.encode(["How do I pick a lock?", "Name three colours of the rainbow"],
                             context_length=512)
    tokens, valid = jnp.asarray(batch.tokens), jnp.asarray(batch.valid)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    cache = forward(tiny.params, tokens, valid, config=tiny.config,
                    capture_positions=positions).captures  # [B, T, L, D]
    direction = np.random.default_rng(0).standard_normal(tiny.config.d_model)
    n_layers = tiny.config.n_layers
    full_forward = jax.jit(forward, static_argnames=("config", "logits"))
    for layer in range(n_layers):
        intervention = _acting_from(layer, n_layers, direction)
        full = full_forward(tiny.params, tokens, valid, config=tiny.config,
                            intervention=intervention, logits="last").logits
        got = _resumed(tiny.params, cache[:, :, layer], valid, jnp.asarray(layer), intervention,
                       config=tiny.config)
        np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
        assert not np.allclose(full, full_forward(tiny.params, tokens, valid,
                                                  config=tiny.config, logits="last").logits,
                               atol=1e-3)
    assert _resumed._cache_size() == 1  # a traced start layer: one program for every layer


def test_forward_from_a_cached_layer_with_a_shared_prefix_equals_a_full_recompute(tiny):
    """Prompts split into the template's shared start and their own tokens: the prefix computed
    once for the batch gives the logits of the full forward of each left-padded prompt."""
    instructions = ["How do I pick a lock?", "Name three colours of the rainbow", "Hi"]
    batch = tiny.chat.encode(instructions, context_length=512, length_bucket=1)
    token_lists = [list(ids[mask]) for ids, mask in zip(batch.tokens, batch.valid)]
    n_prefix = batching.shared_prefix_length(token_lists)
    assert n_prefix >= 3  # the system turn of the ChatML template
    ((rows, split_tokens, split_valid),) = batching.split_batches(
        token_lists, n_prefix, batch_size=8, length_bucket=4, pad_id=0)
    assert split_tokens.shape[0] == len(instructions)  # no filler rows
    positions = jnp.broadcast_to(jnp.arange(split_tokens.shape[1]), split_tokens.shape)
    cache = forward(tiny.params, jnp.asarray(split_tokens), jnp.asarray(split_valid),
                    config=tiny.config, capture_positions=positions).captures
    tokens, valid = jnp.asarray(batch.tokens)[rows], jnp.asarray(batch.valid)[rows]
    direction = np.random.default_rng(1).standard_normal(tiny.config.d_model)
    n_layers = tiny.config.n_layers
    for layer in range(n_layers):
        intervention = _acting_from(layer, n_layers, direction)
        full = forward(tiny.params, tokens, valid, config=tiny.config,
                       intervention=intervention, logits="last").logits
        got = _resumed_after_prefix(tiny.params, cache[0, :n_prefix, layer],
                                    cache[:, n_prefix:, layer],
                                    jnp.asarray(split_valid[:, n_prefix:]), jnp.asarray(layer),
                                    intervention, config=tiny.config)
        np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
    assert _resumed_after_prefix._cache_size() == 1


def test_shared_prefix_leaves_every_prompt_its_last_token():
    assert batching.shared_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert batching.shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert batching.shared_prefix_length([[7, 8, 9]]) == 2
    assert batching.shared_prefix_length([[1, 2], [3, 4]]) == 0
    assert batching.shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5, 6]], keep_last=3) == 1


def test_split_batches_are_equal_and_fill_only_the_last():
    lists = [[9, 9] + [5] * n for n in (3, 1, 4, 2, 6)]
    batches = list(batching.split_batches(lists, 2, batch_size=2, length_bucket=4, pad_id=0))
    assert [len(rows) for rows, _, _ in batches] == [2, 2, 1]
    assert sorted(np.concatenate([rows for rows, _, _ in batches]).tolist()) == list(range(5))
    for rows, tokens, valid in batches:
        assert tokens.shape == valid.shape == (2, 2 + 4 * -(-max(len(lists[r]) - 2
                                                                   for r in rows) // 4))
        assert (tokens[:, :2] == 9).all() and valid[:, :2].all()
        for row, index in enumerate(rows):
            assert tokens[row][valid[row]].tolist() == lists[index]


@pytest.fixture(scope="module")
def planted():
    """The planted model, its prompt sets, their baseline refusal scores and directions."""
    model = planted_model.model()
    sets = {"harmful_train": planted_model.prompts(16, "harmful", seed=0),
            "harmless_train": planted_model.prompts(16, "harmless", seed=1),
            "harmful_val": planted_model.prompts(8, "harmful", seed=2),
            "harmless_val": planted_model.prompts(8, "harmless", seed=3)}
    activations = {name: capture(model, prompts, batch_size=8, length_bucket=16, name=name)
                   for name, prompts in sets.items()}
    config = base_config()
    config.directions.inlp_max_directions = 4
    config.select.multipliers = (0.5, 1.0)
    config.runtime.batch_size = 8
    config.runtime.length_bucket = 16
    directions = fit_directions(activations["harmful_train"][0],
                                activations["harmless_train"][0], config.directions, seed=0)
    scores = {name: activations[name][1] for name in ("harmful_val", "harmless_val")}
    return model, sets, scores, directions, config


def test_selection_finds_the_planted_position_and_layer(planted):
    model, sets, baseline_scores, directions, config = planted
    harmful_scores = baseline_scores["harmful_val"]
    harmless_scores = baseline_scores["harmless_val"]
    assert harmful_scores.min() > 0 > harmless_scores.max()  # the model refuses harmful ones
    config = config.copy_and_resolve_references()
    config.select.compare_global = True
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
    assert rho == pytest.approx(ranking.spearman(bypass.ravel(),
                                                scores["dim_global_bypass"].ravel()))
    assert -1.0 <= rho <= 1.0


def test_filters_scored_until_the_best_survivor_choose_what_scoring_all_chooses(planted):
    model, sets, _, directions, config = planted
    lazy_summary, lazy = select.run_selection(model, sets, directions, config)
    config = config.copy_and_resolve_references()
    config.select.just_one = False  # with top_percentage = 0: one component, every pair scored
    full_summary, full = select.run_selection(model, sets, directions, config)
    for method in ("dim", "inlp"):
        assert lazy_summary[method]["components"] == full_summary[method]["components"]
        assert full_summary[method]["ranking"][0] == lazy_summary[method]["ranking"][0]
        scored = np.isfinite(lazy[f"{method}_local_kl"])
        n_pairs = np.isfinite(full[f"{method}_local_kl"]).sum()
        assert 1 <= scored.sum() == lazy_summary[method]["filters_scored"] < n_pairs
        assert full_summary[method]["filters_scored"] == n_pairs
        assert lazy_summary[method]["discarded"]["not_scored"] >= 1
        assert "not_scored" not in full_summary[method]["discarded"]
        for field in ("kl", "steering"):
            np.testing.assert_allclose(lazy[f"{method}_local_{field}"][scored],
                                       full[f"{method}_local_{field}"][scored], rtol=1e-6)
        np.testing.assert_allclose(lazy[f"{method}_local_bypass"],
                                   full[f"{method}_local_bypass"], rtol=1e-6)


def test_when_no_candidate_passes_the_run_stops_or_takes_the_lowest_bypass(planted):
    model, sets, _, directions, config = planted
    config = config.copy_and_resolve_references()
    config.select.kl_threshold = -1.0  # every candidate's KL exceeds it
    with pytest.raises(ValueError, match=r"no dim candidate passes the filters.*when_none_pass"):
        select.run_selection(model, sets, directions, config)
    config.select.when_none_pass = "lowest_bypass"
    summary, scores = select.run_selection(model, sets, directions, config)
    n_layers = model.config.n_layers
    for method in ("dim", "inlp"):
        (chosen,) = summary[method]["components"]
        bypass = scores[f"{method}_local_bypass"]
        late = n_layers - round(config.select.prune_layer_fraction * n_layers)
        assert chosen["layer"] < late and np.isfinite([chosen["kl"], chosen["steering"]]).all()
        assert chosen["bypass"] == pytest.approx(np.nanmin(bypass[:, :late]))
        assert "lowest bypass score outside the late layers" in summary[method]["fallback"]
        assert summary[method]["discarded"]["kl"] > 0
    assert (summary["dim"]["components"][0]["position"],
            summary["dim"]["components"][0]["layer"]) == planted_model.PLANTED
    config.select.when_none_pass = "closest"
    with pytest.raises(ValueError, match="select.when_none_pass must be one of"):
        check_config(config)


def test_score_candidates_rejects_an_unknown_filter_mode():
    with pytest.raises(ValueError, match="filters must be"):
        scoring.score_candidates(None, None, None, None, ablation_basis=None,
                                actadd_direction=None, actadd_norm=None,
                                degenerate=np.zeros((1, 1), bool), multipliers=(1.0,),
                                global_ablation=False, chunk=1, name="x", filters="some")


def test_spearman_matches_scipy_with_ties_and_nans():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    first = rng.integers(0, 5, 40).astype(float)  # many ties
    second = first + rng.normal(0, 2, 40)
    first[[3, 9]] = np.nan
    keep = np.isfinite(first)
    expected = spearmanr(first[keep], second[keep]).statistic
    assert ranking.spearman(first, second) == pytest.approx(expected, abs=1e-12)
    assert np.isnan(ranking.spearman(first[:2], second[:2]))
