"""The `reference.*` switches reproduce the published code's rules (docs/method.md section 7):
its INLP split index for index, its KL, and, in the select stage, the sites of INLP candidates,
the INLP steering scale and the unfiltered component pool, which the variants then follow."""

import types

import numpy as np
import planted_model
import pytest

from refusal_jax.directions.inlp import train_dev_split
from refusal_jax.evaluation.kl import kl_divergence, kl_from_log_probs
from refusal_jax.interventions import ABLATION_SITES
from refusal_jax.models.sites import SITE_INDEX
from refusal_jax.selection.candidates import Candidate, stack_candidates
from refusal_jax.selection.ranking import CandidateScores
from refusal_jax.study.config import REFERENCE_SWITCHES, base_config, check_config
from refusal_jax.study.stages import select
from refusal_jax.study.variants import FORM_KINDS, build_variants


def test_reference_split_follows_the_published_index_rule():
    # Harmful (1) at 1, 2, 4, 6, 7, 10; harmless (0) at 0, 3, 5, 8, 9: n_min = 5, so the stack
    # is harmful[:5] + harmless[:5] = [1, 2, 4, 6, 7, 0, 3, 5, 8, 9] (index 10 is left out).
    # numpy.random.default_rng(42).permutation(10) = [5, 6, 0, 7, 3, 2, 4, 9, 1, 8]; dev is
    # its first max(4, int(0.2 * 10)) = 4 entries: stack[5, 6, 0, 7] = [0, 3, 1, 5]; train is
    # stack[3, 2, 4, 9, 1, 8] = [6, 4, 7, 9, 2, 8].
    labels = np.array([0, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1])
    split = train_dev_split(labels, stratified=False, seed=42)
    assert split.dev_index.tolist() == [0, 1, 3, 5]
    assert split.train_index.tolist() == [2, 4, 6, 7, 8, 9]


def test_kl_eps_is_the_published_formula_and_zero_eps_the_exact_kl():
    rng = np.random.default_rng(0)
    logits_p, logits_q = rng.normal(size=(2, 3, 7)) * 4.0

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    log_p, log_q = log_softmax(logits_p), log_softmax(logits_q)
    p, q = np.exp(log_p), np.exp(log_q)
    published = np.sum(p * (np.log(p + 1e-6) - np.log(q + 1e-6)), axis=-1)
    np.testing.assert_allclose(kl_from_log_probs(log_p.astype(np.float32),
                                                 log_q.astype(np.float32), eps=1e-6),
                               published, rtol=1e-5)
    np.testing.assert_allclose(kl_from_log_probs(log_p.astype(np.float32),
                                                 log_q.astype(np.float32)),
                               kl_divergence(logits_p, logits_q), rtol=1e-5)
    assert not np.allclose(published, np.sum(p * (log_p - log_q), axis=-1), rtol=1e-9)


def test_block_input_only_candidates_act_at_resid_pre_of_their_layer():
    n_layers, width = 3, 4
    basis = np.zeros((1, n_layers, 2, width), np.float32)
    basis[..., 0, 0] = basis[..., 1, 1] = 1.0
    args = dict(n_layers=n_layers, global_ablation=False, ablation_basis=basis,
                actadd_direction=basis[:, :, 0], actadd_norm=np.ones((1, n_layers)))
    candidate = [Candidate(0, 1, "ablate", 1)]
    for sites in (("resid_pre",), ABLATION_SITES):
        stacked = stack_candidates(candidate, ablation_sites=sites, **args)
        mask = np.asarray(stacked.interventions[0].site_mask)[0]  # [L, 4] of the projection
        expected = np.zeros_like(mask)
        expected[1, [SITE_INDEX[site] for site in sites]] = 1.0
        np.testing.assert_array_equal(mask, expected)


# The select stage with scoring replaced by fixed scores on 2 positions x 5 layers (layer 4 is
# late). DiM: the lowest bypass is at the late (1, 4), the best survivor (0, 2). INLP (equal
# first accuracies): the lowest at the late (0, 4), the best survivor (1, 1); pairs (1, 0),
# (1, 2), (1, 3) have no direction, so INLP's unfiltered pool is 7 pairs against DiM's 10.
_BYPASS = {"dim": np.array([[0.0, -1.0, -5.0, -2.0, -3.0], [1.0, -4.0, 2.0, 3.0, -9.0]]),
           "inlp": np.array([[0.0, -1.0, -2.0, -3.0, -8.0], [1.0, -6.0, 2.0, 3.0, -4.0]])}
_NO_INLP_DIRECTION = [(1, 0), (1, 2), (1, 3)]


@pytest.fixture(scope="module")
def model():
    return planted_model.model()


def _select(model, monkeypatch, **changes):
    """(summary, the keyword arguments score_candidates got per method)."""
    rng = np.random.default_rng(1)
    n_directions = np.ones((2, 5), np.int32)
    for pair in _NO_INLP_DIRECTION:
        n_directions[pair] = 0
    basis = rng.normal(size=(2, 5, 2, 6)).astype(np.float32)
    directions = {"dim": rng.normal(size=(2, 5, 6)) * np.arange(1, 11).reshape(2, 5, 1),
                  "inlp_basis": basis, "inlp_n_directions": n_directions,
                  "inlp_dev_accuracies": np.full((2, 5, 2), 0.9, np.float32),
                  "inlp_majority_rate": np.full((2, 5), 0.5, np.float32),
                  "inlp_first_direction": basis[:, :, 0],
                  "inlp_converged": np.ones((2, 5, 2), bool),
                  "inlp_solver_steps": np.ones((2, 5, 2), np.int32)}
    calls = {}

    def score_candidates(*_, name, degenerate, multipliers, **kwargs):
        method = name.split()[0]
        calls[method] = kwargs
        bypass = np.where(degenerate, np.nan, _BYPASS[method])
        return CandidateScores(bypass=bypass, steering=np.ones((2, 5, len(multipliers))),
                               kl=np.full((2, 5), 0.01), filtered=~degenerate)

    monkeypatch.setattr(select, "score_candidates", score_candidates)
    monkeypatch.setattr(select, "cache_baseline", lambda *_, **__: types.SimpleNamespace(
        refusal_scores=np.zeros(2)))
    config = base_config()
    for key, value in changes.items():
        section, name = key.split(".")
        config[section][name] = value
    check_config(config)
    summary, _ = select.run_selection(model, {"harmful_val": [], "harmless_val": []},
                                      directions, config)
    return summary, calls, directions


def _where(entries):
    return [(entry["position_index"], entry["layer"]) for entry in entries]


def test_default_components_come_from_the_filtered_ranking(model, monkeypatch):
    summary, calls, directions = _select(model, monkeypatch)
    assert _where(summary["dim"]["components"]) == [(0, 2)]
    assert _where(summary["inlp"]["components"]) == [(1, 1)]
    assert "direction_source" not in summary["dim"]["components"][0]
    assert calls["inlp"]["ablation_sites"] == ABLATION_SITES
    assert calls["inlp"]["kl_eps"] == 0.0
    np.testing.assert_allclose(calls["inlp"]["actadd_norm"],
                               np.linalg.norm(directions["dim"], axis=-1))


def test_preset_switches_in_the_select_stage(model, monkeypatch):
    switches = {f"reference.{name}": True for name in REFERENCE_SWITCHES}
    summary, calls, directions = _select(model, monkeypatch, **switches)
    # Erasures at the top of the unfiltered ranking, late layers included, with the best
    # filtered pair's direction; ActAdd at the best filtered pair.
    for method, top, best in (("dim", (1, 4), (0, 2)), ("inlp", (0, 4), (1, 1))):
        (component,) = summary[method]["components"]
        assert _where([component]) == [top]
        assert tuple(component["direction_source"]) == best
        assert _where(summary[method]["actadd_components"]) == [best]
        assert _where([summary[method]["best"]]) == [best]
    assert calls["inlp"]["ablation_sites"] == ("resid_pre",)
    assert "ablation_sites" not in calls["dim"]  # DiM keeps every site
    assert calls["dim"]["kl_eps"] == calls["inlp"]["kl_eps"] == 1e-6
    best_norm = np.linalg.norm(directions["dim"][0, 2])
    np.testing.assert_allclose(calls["inlp"]["actadd_norm"], np.full((2, 5), best_norm))
    np.testing.assert_allclose(calls["dim"]["actadd_norm"],
                               np.linalg.norm(directions["dim"], axis=-1))


def test_unfiltered_pool_is_the_smaller_of_the_two_methods(model, monkeypatch):
    # ceil(0.25 * 7) = 2 components (INLP's pool), where DiM's 10 pairs would give 3.
    summary, _, _ = _select(model, monkeypatch, **{"reference.unfiltered_components": True,
                                                   "select.just_one": False,
                                                   "select.top_percentage": 0.25})
    assert summary["dim"]["unfiltered_pool"] == 7
    assert _where(summary["dim"]["components"]) == [(1, 4), (0, 2)]
    assert _where(summary["inlp"]["components"]) == [(0, 4), (1, 1)]


def test_a_switch_left_unset_is_rejected():
    config = base_config()
    config.reference.kl_eps = None
    with pytest.raises(ValueError, match="reference.kl_eps"):
        check_config(config)


def test_variants_use_the_direction_source_and_the_actadd_components(model):
    # Components as the select stage writes them under reference.unfiltered_components: the
    # erasures act at layer 3 with the best pair (0, 1)'s direction, ActAdd at (0, 1) itself.
    n_layers, width = model.config.n_layers, model.config.d_model
    rng = np.random.default_rng(2)
    basis = rng.normal(size=(2, n_layers, 2, width)).astype(np.float32)
    directions = {"dim": rng.normal(size=(2, n_layers, width)).astype(np.float32),
                  "harmless_mean": np.zeros((2, n_layers, width), np.float32),
                  "inlp_basis": basis, "inlp_n_directions": np.ones((2, n_layers), np.int32),
                  "inlp_dev_accuracies": np.ones((2, n_layers, 2), np.float32),
                  "inlp_majority_rate": np.full((2, n_layers), 0.5, np.float32),
                  "inlp_first_direction": basis[:, :, 0],
                  "inlp_converged": np.ones((2, n_layers, 2), bool),
                  "inlp_solver_steps": np.ones((2, n_layers, 2), np.int32),
                  "leace_read": np.zeros((2, n_layers, 1, width), np.float32),
                  "leace_write": np.zeros((2, n_layers, 1, width), np.float32),
                  "leace_mean": np.zeros((2, n_layers, width), np.float32)}
    best = {"position": -2, "position_index": 0, "layer": 1, "k": 1}
    component = {"position": -1, "position_index": 1, "layer": 3, "k": 1,
                 "direction_source": [0, 1]}
    selection = {method: {"components": [component], "actadd_components": [best], "best": best}
                 for method in ("dim", "inlp")}
    ablation, actadd, nullspace = build_variants(
        model, directions, selection, base_config(),
        names=["dim_ablation", "dim_actadd", "inlp_nullspace"])
    erase = ablation.harmful.interventions[FORM_KINDS.index("ablation")]
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(erase.site_mask).any(-1)), [3])
    unit = directions["dim"][0, 1] / np.linalg.norm(directions["dim"][0, 1])
    np.testing.assert_allclose(np.asarray(erase.direction[3]), unit, rtol=1e-6)
    add = actadd.harmful.interventions[FORM_KINDS.index("actadd")]
    np.testing.assert_array_equal(np.argwhere(np.asarray(add.site_mask)),
                                  [[1, SITE_INDEX["resid_pre"]]])
    project = nullspace.harmful.interventions[FORM_KINDS.index("reflection")]
    np.testing.assert_allclose(np.asarray(project.basis[3, 0]), basis[0, 1, 0], rtol=1e-6)
    assert "layer 3; direction of pos -2, layer 1" in ablation.description
    assert "(pos -2, layer 1)" in actadd.description
