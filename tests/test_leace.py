"""LEACE: agreement with the paper's d x d closed form, linear guardedness on held-out data,
coinciding class means, idempotence, the rank-deficient case, vmapped pairs and input errors."""

import jax
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from refusal_jax.directions import erase, fit_leace

DIM = 16


def gaussian_classes(rng, n, dim=DIM, separation=3.0):
    """Two Gaussian classes with a shared, correlated covariance and shifted means."""
    labels = rng.integers(0, 2, n)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    shift = rng.normal(size=dim)
    shift *= separation / np.linalg.norm(shift @ np.linalg.inv(mixing))  # Mahalanobis distance
    features = rng.normal(size=(n, dim)) @ mixing + np.outer(labels, shift) + 10.0
    return features.astype(np.float32), labels


def closed_form_eraser(features, labels):
    """``x -> x - W^+ P W (x - mean)`` of Belrose et al. (2023) with d x d matrices, float64."""
    x = features.astype(np.float64)
    mean = x.mean(0)
    centered = x - mean
    z = labels - labels.mean()
    covariance = centered.T @ centered / len(x)
    cross_covariance = centered.T @ z / len(x)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    whitening = eigenvectors @ np.diag(eigenvalues**-0.5) @ eigenvectors.T
    unwhitening = eigenvectors @ np.diag(eigenvalues**0.5) @ eigenvectors.T
    u = whitening @ cross_covariance
    projection = np.outer(u, u) / (u @ u)
    return lambda v: v - (v - mean) @ (unwhitening @ projection @ whitening).T


def test_matches_closed_form():
    features, labels = gaussian_classes(np.random.default_rng(0), 2000)
    eraser = fit_leace(features, labels)
    assert eraser.mean.shape == (DIM,) and eraser.A.shape == eraser.B.shape == (1, DIM)
    probe = np.random.default_rng(1).normal(size=(50, DIM)).astype(np.float32) + 10.0
    expected = closed_form_eraser(features, labels)(probe.astype(np.float64))
    np.testing.assert_allclose(np.asarray(erase(eraser, probe)), expected, atol=2e-4)


def test_no_linear_classifier_beats_chance_after_erasure():
    rng = np.random.default_rng(2)
    train, train_labels = gaussian_classes(rng, 6000)
    held_out, held_out_labels = train[4000:], train_labels[4000:]
    train, train_labels = train[:4000], train_labels[:4000]
    chance = max(held_out_labels.mean(), 1 - held_out_labels.mean())

    def held_out_accuracy(fit_on, test_on):
        probe = LogisticRegression(C=0.1, max_iter=10_000).fit(fit_on, train_labels)
        return probe.score(test_on, held_out_labels)

    assert held_out_accuracy(train, held_out) > 0.85  # the concept is linearly decodable
    eraser = fit_leace(train, train_labels)
    erased_train = np.asarray(erase(eraser, train))
    erased_held_out = np.asarray(erase(eraser, held_out))
    assert held_out_accuracy(erased_train, erased_held_out) < chance + 0.03


@pytest.mark.parametrize("n, dim", [(4000, DIM), (40, 100)])  # full rank; n < d (singular)
def test_erased_class_means_coincide_and_erasure_is_idempotent(n, dim):
    rng = np.random.default_rng(3)
    features, labels = gaussian_classes(rng, n, dim)
    eraser = fit_leace(features, labels)
    erased = np.asarray(erase(eraser, features))
    assert np.all(np.isfinite(erased))
    gap_before = np.abs(features[labels == 1].mean(0) - features[labels == 0].mean(0)).max()
    gap_after = np.abs(erased[labels == 1].mean(0) - erased[labels == 0].mean(0)).max()
    assert gap_before > 0.1
    assert gap_after < 1e-4
    np.testing.assert_allclose(float(eraser.A[0] @ eraser.B[0]), 1.0, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(erase(eraser, erased)), erased, atol=1e-4)


def test_identical_class_means_leave_nothing_to_erase():
    rng = np.random.default_rng(4)
    half = rng.normal(size=(100, DIM)).astype(np.float32)
    features = np.concatenate([half, half])  # both classes hold the same points
    labels = np.repeat([1, 0], 100)
    eraser = fit_leace(features, labels)
    assert not np.any(np.asarray(eraser.A)) and not np.any(np.asarray(eraser.B))
    np.testing.assert_array_equal(np.asarray(erase(eraser, features)), features)


def test_pairs_are_fitted_independently():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 300)
    features = np.stack([gaussian_classes(np.random.default_rng(s), 300)[0] for s in range(3)])
    features += np.outer(labels, np.ones(DIM))[None].astype(np.float32)
    batched = fit_leace(features.reshape(3, 1, 300, DIM), labels)  # pair axes (3, 1)
    assert batched.A.shape == (3, 1, 1, DIM)
    for pair in range(3):
        single = fit_leace(features[pair], labels)
        for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
            np.testing.assert_allclose(np.asarray(got)[pair, 0], np.asarray(want), atol=1e-5)


def test_erase_keeps_dtype():
    features, labels = gaussian_classes(np.random.default_rng(6), 200)
    eraser = fit_leace(features, labels)
    assert erase(eraser, features.astype(np.float16)).dtype == np.float16


@pytest.mark.parametrize("features, labels, match", [
    (np.zeros((10, 4), np.float32), np.array([0, 1] * 4), "10 examples .* 8 labels"),
    (np.zeros((10, 4), np.float32), np.ones(10, int), "both classes"),
    (np.zeros((10, 4), np.float32), np.arange(10), "only 0 .* and 1"),
    (np.full((10, 4), np.inf, np.float32), np.array([0, 1] * 5), "NaN or inf"),
    (np.zeros(10, np.float32), np.array([0, 1] * 5), "at least 2 axes"),
])
def test_fit_errors(features, labels, match):
    with pytest.raises(ValueError, match=match):
        fit_leace(features, labels)


def test_erase_errors():
    features, labels = gaussian_classes(np.random.default_rng(7), 100)
    eraser = fit_leace(np.stack([features, features]), labels)
    with pytest.raises(ValueError, match="single pair's eraser"):
        erase(eraser, features)
    with pytest.raises(ValueError, match="width 8 .* width 16"):
        erase(jax.tree.map(lambda leaf: leaf[0], eraser), features[:, :8])
    with pytest.raises(ValueError, match="rcond"):
        fit_leace(features, labels, rcond=1.5)
