"""The tunable-k curve: the k grid, truncated bases that reuse compiled programs, the plot."""

import numpy as np
import pytest

from refusal_jax.evaluation import k_curve
from refusal_jax.evaluation.k_curve import KCurve, KCurvePoint
from refusal_jax.evaluation.kl import _last_logits, last_position_logits
from refusal_jax.interventions import nullspace_projection, project_out
from tests.hf_reference import ragged_batch, tiny_hf_model, to_ours


@pytest.mark.parametrize("n, expected", [(1, [1]), (2, [1, 2]), (5, [1, 2, 4, 5]),
                                         (8, [1, 2, 4, 8]), (9, [1, 2, 4, 8, 9])])
def test_k_values(n, expected):
    assert k_curve.k_values(n) == expected


@pytest.mark.parametrize("n", [0, -3, 2.0, True])
def test_k_values_errors(n):
    with pytest.raises(ValueError, match="positive integer"):
        k_curve.k_values(n)


def orthonormal_rows(k, d, seed=0):
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(d, k)))[0].T.astype(np.float32)


def test_keep_first_k_equals_slicing():
    basis = orthonormal_rows(5, 16)
    x = np.random.default_rng(1).normal(size=(3, 16)).astype(np.float32)
    for k in range(6):
        kept = np.asarray(k_curve.keep_first_k(basis, k))
        assert kept.shape == basis.shape
        np.testing.assert_array_equal(kept[:k], basis[:k])
        np.testing.assert_array_equal(kept[k:], 0.0)
        np.testing.assert_allclose(np.asarray(project_out(x, kept)),
                                   np.asarray(project_out(x, basis[:k])), atol=1e-6)
    stacked = np.stack([basis, basis])  # leading axes (layers, candidates) are kept
    np.testing.assert_array_equal(np.asarray(k_curve.keep_first_k(stacked, 2))[:, 2:], 0.0)
    with pytest.raises(ValueError, match=r"k = 6 outside \[0, 5\]"):
        k_curve.keep_first_k(basis, 6)
    with pytest.raises(ValueError, match=r"\[\.\.\., K, D\]"):
        k_curve.keep_first_k(basis[0], 1)


def test_every_k_runs_the_same_compiled_forward():
    config, params = to_ours(tiny_hf_model("llama_mha"))
    tokens, valid = ragged_batch((6, 4))
    basis = orthonormal_rows(4, config.d_model, seed=2)
    ks = k_curve.k_values(4)
    edits = [nullspace_projection(k_curve.keep_first_k(basis, k), n_layers=config.n_layers,
                                  layers=1) for k in ks]
    before = _last_logits._cache_size()
    logits = [np.asarray(last_position_logits(params, tokens, valid, config=config,
                                              intervention=edit)) for edit in edits]
    assert _last_logits._cache_size() == before + 1  # k = 1, 2, 4 share one program
    for k, got in zip(ks, logits):
        sliced = nullspace_projection(basis[:k], n_layers=config.n_layers, layers=1)
        np.testing.assert_allclose(got, last_position_logits(
            params, tokens, valid, config=config, intervention=sliced), atol=1e-5)
    assert not np.allclose(logits[0], logits[-1])


def curve():
    return KCurve(intervention="inlp_reflection", baseline_harmful_refusal_rate=0.9,
                  baseline_cross_entropy=3.0, points=[
                      KCurvePoint(k=1, harmful_refusal_rate=0.6, cross_entropy=3.01,
                                  harmless_refusal_rate=0.0),
                      KCurvePoint(k=2, harmful_refusal_rate=0.3, cross_entropy=3.04,
                                  harmless_refusal_rate=0.0),
                      KCurvePoint(k=4, harmful_refusal_rate=0.1, cross_entropy=3.3,
                                  harmless_refusal_rate=0.05)])


def test_plot_is_written(tmp_path):
    path = k_curve.plot_k_curve(tmp_path / "plots" / "k_curve.png", curve())
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    without_harmless = curve()
    for point in without_harmless.points:
        point.harmless_refusal_rate = None
    assert k_curve.plot_k_curve(tmp_path / "k2.png", without_harmless).stat().st_size > 10_000


def test_plot_rejects_a_malformed_curve(tmp_path):
    bad = curve()
    bad.points = bad.points[::-1]
    with pytest.raises(ValueError, match="distinct increasing k"):
        k_curve.plot_k_curve(tmp_path / "k.png", bad)
    bad = curve()
    bad.points[0].harmful_refusal_rate = 1.5
    with pytest.raises(ValueError, match=r"points\[0\].harmful_refusal_rate = 1.5"):
        k_curve.plot_k_curve(tmp_path / "k.png", bad)
    assert not (tmp_path / "k.png").exists()
