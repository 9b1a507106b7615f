"""INLP: planted-subspace recovery, agreement with scikit-learn, vmapped vs per-pair fits, the
default and reference stop rules, the train/dev split, k policies and input errors.

Every INLP call here uses the same shapes (5000 examples, width 24, 6 slots), so the jitted
core compiles once per pair count and mode.
"""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from refusal_jax.directions import (
    INLPResult,
    fit_inlp,
    fit_inlp_split,
    fit_logistic_regression,
    leading_basis,
    pair_major,
    select_k,
    train_dev_split,
)

N_PER_CLASS, DIM, SLOTS = 2500, 24, 6
LABELS = np.repeat([1, 0], N_PER_CLASS)
# Solver tolerance of the tests that compare optima element by element (batched vs per-pair
# fits, scikit-learn's weights): solutions agree to about the distance the tolerance leaves.
TIGHT = 1e-6


def planted_data(seed: int, k: int, noise_scales=(30.0, 300.0), offset_scale=50.0):
    """Labels live in a random k-dim subspace S; elsewhere large, uneven, label-free noise.

    Inside S the class means differ by a shift and the within-class covariance is anisotropic,
    so each classifier normal leaves part of the shift behind and INLP needs exactly k rounds.
    """
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
    subspace = q[:, :k].T
    within = rng.normal(size=(2 * N_PER_CLASS, k)) * np.geomspace(0.4, 1.0, k)
    signal = within + np.outer(LABELS - 0.5, np.full(k, 2.0 / np.sqrt(k)))
    noise = rng.normal(size=(2 * N_PER_CLASS, DIM)) * np.geomspace(*noise_scales, DIM)
    noise -= (noise @ subspace.T) @ subspace
    features = signal @ subspace + noise + rng.normal(0.0, offset_scale, DIM)
    return features.astype(np.float32), subspace


def max_principal_angle(basis: np.ndarray, subspace: np.ndarray) -> float:
    cosines = np.linalg.svd(basis @ subspace.T, compute_uv=False)
    return float(np.arccos(np.clip(cosines.min(), -1.0, 1.0)))


@pytest.fixture(scope="module")
def planted():
    """Three pairs with planted subspaces of dimension 1, 2 and 3, fitted in one vmapped call."""
    data = [planted_data(seed=k, k=k) for k in (1, 2, 3)]
    features = np.stack([x for x, _ in data])
    result = fit_inlp(features, LABELS, max_directions=SLOTS, solver_tolerance=TIGHT)
    return features, [s for _, s in data], result


def test_recovers_planted_subspace(planted):
    _, subspaces, result = planted
    assert result.basis.shape == (3, SLOTS, DIM)
    for pair, subspace in enumerate(subspaces):
        k = subspace.shape[0]
        basis = np.asarray(result.basis[pair])
        assert int(result.n_directions[pair]) == k
        assert max_principal_angle(basis[:k], subspace) < 1e-2
        np.testing.assert_allclose(basis[:k] @ basis[:k].T, np.eye(k), atol=1e-5)
        assert not np.any(basis[k:])
        accuracies = np.asarray(result.dev_accuracies[pair])
        assert np.all(accuracies[:k] > 0.55)  # accepted: better than 0.5 + margin
        assert accuracies[k] <= 0.55  # the classifier that stopped the loop
        assert np.all(np.isnan(accuracies[k + 1:]))
        assert np.all(np.asarray(result.converged[pair, :k + 1]))
        np.testing.assert_array_equal(np.asarray(result.first_direction[pair]), basis[0])
    np.testing.assert_allclose(np.asarray(result.majority_rate), 0.5)


def test_directions_are_oriented_towards_harmful(planted):
    features, _, result = planted
    for pair in range(3):
        k = int(result.n_directions[pair])
        scores = features[pair] @ np.asarray(result.basis[pair, :k]).T
        gaps = scores[LABELS == 1].mean(0) - scores[LABELS == 0].mean(0)
        assert np.all(gaps > 0)


def test_vmapped_fit_equals_per_pair_fits(planted):
    features, _, batched = planted
    for pair in range(3):
        single = fit_inlp(features[pair], LABELS, max_directions=SLOTS, solver_tolerance=TIGHT)
        assert single.basis.shape == (SLOTS, DIM)
        assert int(single.n_directions) == int(batched.n_directions[pair])
        np.testing.assert_array_equal(np.asarray(single.dev_accuracies),
                                      np.asarray(batched.dev_accuracies[pair]))
        np.testing.assert_allclose(np.asarray(single.basis), np.asarray(batched.basis[pair]),
                                   atol=1e-4)


def test_queued_pairs_equal_pairs_fitted_side_by_side(planted):
    """With fewer lanes than pairs, pairs wait in the queue and are fitted later in the loop;
    the result is that of fitting all pairs side by side."""
    features, _, batched = planted
    queued = fit_inlp(features, LABELS, max_directions=SLOTS, solver_tolerance=TIGHT,
                      pairs_in_flight=1)
    np.testing.assert_array_equal(np.asarray(queued.n_directions),
                                  np.asarray(batched.n_directions))
    np.testing.assert_array_equal(np.asarray(queued.dev_accuracies),
                                  np.asarray(batched.dev_accuracies))
    np.testing.assert_allclose(np.asarray(queued.basis), np.asarray(batched.basis), atol=1e-4)


def test_pair_major_keeps_leading_axes(planted):
    features, _, batched = planted
    activations = np.moveaxis(features, 1, 0)[:, :, None, :]  # (n, P=3, L=1, D)
    result = fit_inlp(pair_major(activations), LABELS, max_directions=SLOTS)
    assert result.basis.shape == (3, 1, SLOTS, DIM)
    assert result.n_directions.shape == (3, 1)
    assert result.first_direction.shape == (3, 1, DIM)
    np.testing.assert_array_equal(np.asarray(result.n_directions[:, 0]),
                                  np.asarray(batched.n_directions))


def test_first_classifier_matches_sklearn():
    # Moderate scales and no offset, so that scikit-learn's own solver converges quickly.
    features, _ = planted_data(seed=7, k=2, noise_scales=(1.0, 10.0), offset_scale=0.0)
    result = fit_inlp(features, LABELS, max_directions=SLOTS)
    split = train_dev_split(LABELS)
    reference = LogisticRegression(C=0.1, max_iter=10_000, tol=1e-8).fit(
        features[split.train_index].astype(np.float64), LABELS[split.train_index])
    weight = reference.coef_[0]
    cosine = np.asarray(result.first_direction) @ weight / np.linalg.norm(weight)
    assert cosine >= 0.999
    n_dev = split.dev_index.size
    reference_correct = reference.score(features[split.dev_index], LABELS[split.dev_index]) * n_dev
    assert round(float(result.dev_accuracies[0]) * n_dev) == round(reference_correct)


def test_fit_logistic_regression_matches_sklearn():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    features = (rng.normal(size=(300, 10)) * np.geomspace(0.1, 100.0, 10)
                + np.outer(labels, rng.normal(size=10) * 3.0) + 20.0).astype(np.float32)
    fit = fit_logistic_regression(features, labels, tolerance=TIGHT)
    reference = LogisticRegression(C=0.1, max_iter=100_000, tol=1e-10).fit(
        features.astype(np.float64), labels)
    assert bool(fit.converged)
    np.testing.assert_allclose(np.asarray(fit.weight), reference.coef_[0], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(float(fit.bias), reference.intercept_[0], rtol=1e-3)


def test_reference_mode_keeps_the_failing_classifier():
    rng = np.random.default_rng(11)
    noise = rng.normal(size=(2 * N_PER_CLASS, DIM)).astype(np.float32)  # no signal at all
    default = fit_inlp(noise, LABELS, max_directions=SLOTS)
    assert int(default.n_directions) == 0
    assert float(default.dev_accuracies[0]) <= 0.55
    assert not np.any(np.asarray(default.basis))

    reference = fit_inlp(noise, LABELS, max_directions=SLOTS, stratified=False,
                         absolute_stop=True, keep_failing=True)
    n = int(reference.n_directions)
    accuracies = np.asarray(reference.dev_accuracies)
    assert n >= 1  # the failing classifier is kept
    assert np.all(accuracies[:n - 1] >= 0.55)
    if n < SLOTS:
        assert accuracies[n - 1] < 0.55
    basis = np.asarray(reference.basis)
    np.testing.assert_allclose(basis[:n] @ basis[:n].T, np.eye(n), atol=1e-5)


def test_default_rule_compares_with_the_majority_rate():
    # Uninformative features with 70% harmful labels: the classifier predicts the majority
    # class, which the reference rule (absolute 0.55) accepts and the default rule rejects.
    rng = np.random.default_rng(5)
    n_train, n_dev = 4 * N_PER_CLASS // 5 * 2, N_PER_CLASS // 5 * 2
    train_labels = (np.arange(n_train) < 0.7 * n_train).astype(np.int32)
    dev_labels = (np.arange(n_dev) < 0.7 * n_dev).astype(np.int32)
    train = rng.normal(size=(1, n_train, DIM)).astype(np.float32)
    dev = rng.normal(size=(1, n_dev, DIM)).astype(np.float32)

    default = fit_inlp_split(train, train_labels, dev, dev_labels, max_directions=SLOTS)
    np.testing.assert_allclose(np.asarray(default.majority_rate), [0.7])
    assert 0.6 < float(default.dev_accuracies[0, 0]) <= 0.75
    assert int(default.n_directions[0]) == 0

    reference = fit_inlp_split(train, train_labels, dev, dev_labels, max_directions=SLOTS,
                               absolute_stop=True, keep_failing=True)
    assert int(reference.n_directions[0]) == SLOTS
    assert np.all(np.asarray(reference.dev_accuracies[0]) > 0.6)


def test_stratified_split_is_balanced_and_deterministic():
    labels = np.array([1] * 100 + [0] * 60)
    split = train_dev_split(labels, seed=3)
    again = train_dev_split(labels, seed=3)
    np.testing.assert_array_equal(split.train_index, again.train_index)
    np.testing.assert_array_equal(split.dev_index, again.dev_index)
    assert np.intersect1d(split.train_index, split.dev_index).size == 0
    assert np.bincount(labels[split.dev_index]).tolist() == [12, 12]
    assert np.bincount(labels[split.train_index]).tolist() == [48, 48]
    small = train_dev_split(np.array([1, 1, 1, 0, 0, 0, 0]))
    assert np.bincount(np.array([1, 1, 1, 0, 0, 0, 0])[small.dev_index]).tolist() == [2, 2]


def test_reference_split_is_not_stratified():
    labels = np.repeat([1, 0], 128)
    dev_counts = []
    for seed in range(10):
        split = train_dev_split(labels, stratified=False, seed=seed)
        assert split.dev_index.size == 51  # int(0.2 * 256), as in the reference run
        assert split.train_index.size == 205
        dev_counts.append(tuple(np.bincount(labels[split.dev_index], minlength=2)))
    assert any(harmless != harmful for harmless, harmful in dev_counts)


def _hand_made_result(accuracies, n_directions):
    accuracies = np.asarray(accuracies, np.float32)
    dim = 8
    basis = np.zeros(accuracies.shape + (dim,), np.float32)
    for index in np.ndindex(accuracies.shape[:-1]):
        basis[index][: n_directions[index]] = np.eye(dim)[: n_directions[index]]
    return INLPResult(basis=basis, n_directions=np.asarray(n_directions, np.int32),
                      dev_accuracies=accuracies, majority_rate=np.full(accuracies.shape[:-1], 0.5),
                      first_direction=basis[..., 0, :], converged=np.isfinite(accuracies),
                      solver_steps=np.zeros(accuracies.shape, np.int32))


def test_k_policies():
    nan = np.nan
    result = _hand_made_result([[1.0, 0.96, 0.995, 0.7, 0.5, nan],
                                [0.98, 0.3, nan, nan, nan, nan]], n_directions=np.array([4, 1]))
    assert select_k(result).tolist() == [4, 1]
    assert select_k(result, "fixed", k=2).tolist() == [2, 1]
    assert select_k(result, "fixed", k=0).tolist() == [0, 0]
    assert select_k(result, "acc99").tolist() == [2, 0]  # a count: 1.0 and 0.995
    assert select_k(result, "acc95").tolist() == [3, 1]
    basis = np.asarray(leading_basis(result, "acc99"))
    np.testing.assert_array_equal(basis[0, :2], np.asarray(result.basis)[0, :2])  # the first two
    assert not np.any(basis[0, 2:]) and not np.any(basis[1])


def test_k_policy_errors():
    result = _hand_made_result([[1.0, 0.5]], n_directions=np.array([1]))
    with pytest.raises(ValueError, match="unknown k policy"):
        select_k(result, "top")
    with pytest.raises(ValueError, match="pass k exactly"):
        select_k(result, "fixed")
    with pytest.raises(ValueError, match="pass k exactly"):
        leading_basis(result, "acc99", k=3)
    with pytest.raises(ValueError, match="k must be >= 0"):
        select_k(result, "fixed", k=-1)


@pytest.mark.parametrize("features, labels, match", [
    (np.zeros((10, 4)), np.array([0, 1] * 4), "10 examples .* 8 labels"),
    (np.zeros((10, 4)), np.array([0, 1, 2, 0, 1] * 2), "only 0 .* and 1"),
    (np.zeros((10, 4)), np.ones(10, int), "both classes"),
    (np.zeros((10, 4)), np.array([0] * 8 + [1] * 2), "at least 3 examples of each class"),
    (np.full((10, 4), np.nan), np.array([0, 1] * 5), "NaN or inf"),
    (np.zeros(10), np.array([0, 1] * 5), "at least 2 axes"),
    (np.zeros((10, 4), int), np.array([0, 1] * 5), "floating point"),
])
def test_fit_inlp_input_errors(features, labels, match):
    with pytest.raises(ValueError, match=match):
        fit_inlp(features, labels)


def test_option_errors():
    features, labels = np.zeros((10, 4), np.float32), np.array([0, 1] * 5)
    with pytest.raises(ValueError, match="max_directions"):
        fit_inlp(features, labels, max_directions=0)
    with pytest.raises(ValueError, match="inverse_regularization"):
        fit_inlp(features, labels, inverse_regularization=0.0)
    with pytest.raises(ValueError, match="dev_fraction"):
        train_dev_split(labels, dev_fraction=1.0)
    with pytest.raises(ValueError, match=r"must be \(n, D\)"):
        fit_logistic_regression(np.zeros((2, 10, 4), np.float32), labels)


# Wide data (fewer examples than dimensions), the shape of real activations: the solver works in
# the row space of the centred training rows, a different code path from the tall data above.
WIDE_N, WIDE_DIM = 160, 400


def wide_data(seed: int, k: int):
    """Planted k-dim label subspace, plus large uneven label-free noise and a common offset."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([1, 0], WIDE_N // 2)
    q, _ = np.linalg.qr(rng.normal(size=(WIDE_DIM, WIDE_DIM)))
    subspace = q[:, :k].T
    signal = rng.normal(size=(WIDE_N, k)) + np.outer(labels - 0.5, np.full(k, 6.0 / np.sqrt(k)))
    noise = rng.normal(size=(WIDE_N, WIDE_DIM)) * np.geomspace(0.2, 3.0, WIDE_DIM)
    noise -= (noise @ subspace.T) @ subspace
    features = signal @ subspace + noise + rng.normal(0.0, 30.0, WIDE_DIM)
    return features.astype(np.float32), labels


@pytest.mark.parametrize("solver", ["newton", "lbfgs"])
def test_wide_logistic_regression_matches_sklearn(solver):
    features, labels = wide_data(seed=11, k=2)
    fit = fit_logistic_regression(features, labels, tolerance=TIGHT, solver=solver)
    reference = LogisticRegression(C=0.1, max_iter=100_000, tol=1e-10).fit(
        features.astype(np.float64), labels)
    assert bool(fit.converged)
    np.testing.assert_allclose(np.asarray(fit.weight), reference.coef_[0], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(float(fit.bias), reference.intercept_[0], rtol=1e-3, atol=1e-4)


def test_wide_inlp_matches_sklearn_and_per_pair_fits():
    data = [wide_data(seed=s, k=2) for s in (12, 13)]
    labels = data[0][1]
    features = np.stack([x for x, _ in data])
    batched = fit_inlp(features, labels, max_directions=4, solver_tolerance=TIGHT)
    split = train_dev_split(labels)
    for pair in range(2):
        basis = np.asarray(batched.basis[pair])
        k = int(batched.n_directions[pair])
        assert k >= 1
        np.testing.assert_allclose(basis[:k] @ basis[:k].T, np.eye(k), atol=1e-5)
        reference = LogisticRegression(C=0.1, max_iter=100_000, tol=1e-10).fit(
            features[pair, split.train_index].astype(np.float64), labels[split.train_index])
        weight = reference.coef_[0]
        assert np.asarray(batched.first_direction[pair]) @ weight / np.linalg.norm(weight) >= 0.999
        single = fit_inlp(features[pair], labels, max_directions=4, solver_tolerance=TIGHT)
        assert int(single.n_directions) == k
        np.testing.assert_array_equal(np.asarray(single.dev_accuracies),
                                      np.asarray(batched.dev_accuracies[pair]))
        np.testing.assert_allclose(np.asarray(single.basis), basis, atol=1e-4)


def test_unknown_solver_is_named():
    features, labels = wide_data(seed=11, k=1)
    with pytest.raises(ValueError, match="unknown solver 'sgd'"):
        fit_inlp(features, labels, solver="sgd")
