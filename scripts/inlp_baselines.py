"""PyTorch-stack INLP comparators for the benchmark, and a command line that times them vs ours.

Two per-pair loops, run one (position, layer) pair after another:

(a) ``torch_reference_inlp_pair``: the published code's loop as docs/method.md section 2 has it
    (its source is not part of this repository; every behaviour below is taken from that
    description): ``torch.optim.LBFGS(lr=1)`` with no line search on the raw activations, loss
    ``mean BCE + lam ||w||^2`` with ``lam = 1 / (2 C n_train)`` and a free intercept; after each
    classifier its rowspace projection is added and the nullspace projection ``P`` is rebuilt
    from an SVD of the summed ``D x D`` rowspace projections; the data are re-projected with
    ``P``; the loop stops when dev accuracy < 0.55, after the failing classifier has been added.
    The number of L-BFGS iterations (one ``step`` call with ``max_iter`` iterations) is not fixed
    by that description; it is the ``lbfgs_max_iter`` argument. On real activations this L-BFGS
    does not converge (docs/method.md, 2), so ``line_search_fn="strong_wolfe"`` gives the same
    loop with torch's line search: the fair speed comparison at equal accuracy.
(b) ``sklearn_inlp_pair``: ``sklearn.linear_model.LogisticRegression(C)`` (lbfgs, float64) with
    our default INLP rules (stop when dev accuracy <= majority rate + margin, failing classifier
    dropped, Gram-Schmidt basis).

Both take one pair's split data and return a :class:`PairFit`; ``torch_reference_inlp`` and
``sklearn_inlp`` run them over all pairs of ``(n, P, L, D)`` activations with the matching split
(non-stratified for the reference, stratified for scikit-learn, via ``train_dev_split``).

  python scripts/inlp_baselines.py                      # synthetic (256, 2, 30, 576)
  python scripts/inlp_baselines.py --activations=acts.npy --labels=labels.npy
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import jax
import numpy as np
import torch
from absl import app, flags
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from refusal_jax.directions import fit_inlp, pair_major, train_dev_split


@dataclasses.dataclass(frozen=True)
class PairFit:
    """One pair's INLP run: every classifier fitted (the failing one included)."""

    dev_accuracies: list[float]
    n_directions: int  # directions kept in the basis
    first_objective: float  # BCE + lam ||w||^2 of the first classifier on its training data
    basis: np.ndarray  # [n_directions, D] unit rows, in the order found
    first_weight: np.ndarray  # [D] the first classifier's weights (kept even when it failed)

    @property
    def n_classifiers(self) -> int:
        return len(self.dev_accuracies)

    @property
    def first_accuracy(self) -> float:
        return self.dev_accuracies[0]


@dataclasses.dataclass(frozen=True)
class BaselineRun:
    first_accuracies: np.ndarray  # [P, L]
    n_classifiers: np.ndarray  # [P, L]
    first_objectives: np.ndarray  # [P, L]
    seconds: float


def _objective(x, y, weight, bias, inverse_regularization) -> float:
    logits = x.astype(np.float64) @ np.asarray(weight, np.float64) + float(bias)
    cross_entropy = np.mean(np.logaddexp(0.0, logits) - y * logits)
    return float(cross_entropy + np.sum(np.square(weight, dtype=np.float64))
                 / (2.0 * inverse_regularization * len(y)))


# ----------------------------------------------------------------------------------------------
# (a) The reference code's torch loop.


def _torch_logistic_regression(x: torch.Tensor, y: torch.Tensor, *, inverse_regularization: float,
                               max_iter: int, line_search_fn: str | None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    model = torch.nn.Linear(x.shape[1], 1)
    lam = 1.0 / (2.0 * inverse_regularization * x.shape[0])
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=max_iter,
                                  line_search_fn=line_search_fn)

    def closure():
        optimizer.zero_grad()
        logits = model(x).squeeze(-1)
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
                + lam * model.weight.pow(2).sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    return model.weight.detach()[0], model.bias.detach()[0]


def _nullspace_projection(rowspace_projections: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``I - orth(sum of rowspace projections)``, by SVD, as the reference rebuilds it."""
    summed = torch.stack(rowspace_projections).sum(0)
    left, singular_values, _ = torch.linalg.svd(summed)
    tolerance = singular_values.max() * dim * torch.finfo(summed.dtype).eps
    basis = left[:, singular_values > tolerance]
    return torch.eye(dim) - basis @ basis.T


def torch_reference_inlp_pair(train_x: np.ndarray, train_y: np.ndarray, dev_x: np.ndarray,
                              dev_y: np.ndarray, *, max_directions: int = 100,
                              inverse_regularization: float = 0.1, threshold: float = 0.55,
                              lbfgs_max_iter: int = 100, line_search_fn: str | None = None,
                              seed: int = 0) -> PairFit:
    torch.manual_seed(seed)
    dim = train_x.shape[1]
    train_x_t, dev_x_t = torch.as_tensor(train_x, dtype=torch.float32), torch.as_tensor(
        dev_x, dtype=torch.float32)
    train_y_t = torch.as_tensor(train_y, dtype=torch.float32)
    dev_y_t = torch.as_tensor(dev_y, dtype=torch.float32)
    projection = torch.eye(dim)
    rowspace_projections, units, accuracies, first_objective = [], [], [], float("nan")
    for _ in range(max_directions):
        projected_train, projected_dev = train_x_t @ projection, dev_x_t @ projection
        weight, bias = _torch_logistic_regression(projected_train, train_y_t,
                                                  inverse_regularization=inverse_regularization,
                                                  max_iter=lbfgs_max_iter,
                                                  line_search_fn=line_search_fn)
        accuracy = float(((projected_dev @ weight + bias > 0).float() == dev_y_t).float().mean())
        accuracies.append(accuracy)
        if len(accuracies) == 1:
            first_objective = _objective(train_x, train_y, weight.numpy(), bias.numpy(),
                                         inverse_regularization)
            first_weight = weight.numpy().astype(np.float64)
        rowspace_projections.append(torch.outer(weight, weight) / weight.dot(weight))
        units.append((weight / weight.norm()).numpy().astype(np.float64))
        projection = _nullspace_projection(rowspace_projections, dim)
        if accuracy < threshold:
            break
    return PairFit(dev_accuracies=accuracies, n_directions=len(rowspace_projections),
                   first_objective=first_objective, basis=np.stack(units),
                   first_weight=first_weight)


# ----------------------------------------------------------------------------------------------
# (b) scikit-learn with our default rules.


def sklearn_inlp_pair(train_x: np.ndarray, train_y: np.ndarray, dev_x: np.ndarray,
                      dev_y: np.ndarray, *, max_directions: int = 100,
                      inverse_regularization: float = 0.1, accuracy_margin: float = 0.05,
                      max_iter: int = 1000) -> PairFit:
    train_x, dev_x = train_x.astype(np.float64), dev_x.astype(np.float64)
    majority_rate = max(np.mean(dev_y), 1.0 - np.mean(dev_y))
    basis = np.zeros((0, train_x.shape[1]))
    accuracies, first_objective = [], float("nan")
    for _ in range(max_directions):
        classifier = LogisticRegression(C=inverse_regularization, max_iter=max_iter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            classifier.fit(train_x, train_y)
        accuracies.append(float(classifier.score(dev_x, dev_y)))
        weight = classifier.coef_[0]
        if len(accuracies) == 1:
            first_objective = _objective(train_x, train_y, weight, classifier.intercept_[0],
                                         inverse_regularization)
            first_weight = weight.copy()
        if accuracies[-1] <= majority_rate + accuracy_margin:
            break
        for _ in range(2):  # Gram-Schmidt, applied twice
            weight = weight - (basis @ weight) @ basis
        if np.linalg.norm(weight) <= 1e-3 * np.linalg.norm(classifier.coef_[0]):
            break
        unit = weight / np.linalg.norm(weight)
        basis = np.vstack([basis, unit])
        train_x = train_x - np.outer(train_x @ unit, unit)
        dev_x = dev_x - np.outer(dev_x @ unit, unit)
    return PairFit(dev_accuracies=accuracies, n_directions=basis.shape[0],
                   first_objective=first_objective, basis=basis, first_weight=first_weight)


# ----------------------------------------------------------------------------------------------
# All pairs.


def _run_all_pairs(pair_fn, activations: np.ndarray, labels: np.ndarray, *, stratified: bool,
                   seed: int, **options) -> BaselineRun:
    _, positions, layers, _ = activations.shape
    split = train_dev_split(labels, stratified=stratified, seed=seed)
    train_y, dev_y = labels[split.train_index], labels[split.dev_index]
    fits = np.empty((positions, layers), dtype=object)
    warm_up = activations[:, 0, 0]  # untimed: the libraries' first-call set-up (seconds in torch)
    pair_fn(warm_up[split.train_index], train_y, warm_up[split.dev_index], dev_y,
            **{**options, "max_directions": 1})
    start = time.perf_counter()
    for position in range(positions):
        for layer in range(layers):
            features = activations[:, position, layer]
            fits[position, layer] = pair_fn(features[split.train_index], train_y,
                                            features[split.dev_index], dev_y, **options)
    seconds = time.perf_counter() - start

    def field(name: str) -> np.ndarray:
        return np.vectorize(lambda fit: getattr(fit, name))(fits)

    return BaselineRun(first_accuracies=field("first_accuracy"),
                       n_classifiers=field("n_classifiers"),
                       first_objectives=field("first_objective"), seconds=seconds)


def torch_reference_inlp(activations: np.ndarray, labels: np.ndarray, *, seed: int = 0,
                         **options) -> BaselineRun:
    """(a) over all pairs of ``(n, P, L, D)`` activations, on the non-stratified split."""
    return _run_all_pairs(torch_reference_inlp_pair, activations, labels, stratified=False,
                          seed=seed, **options)


def sklearn_inlp(activations: np.ndarray, labels: np.ndarray, *, seed: int = 0,
                 **options) -> BaselineRun:
    """(b) over all pairs of ``(n, P, L, D)`` activations, on the stratified split."""
    return _run_all_pairs(sklearn_inlp_pair, activations, labels, stratified=True, seed=seed,
                          **options)


def synthetic_activations(n_per_class: int, positions: int, layers: int, width: int,
                          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Residual-stream-like activations ``(2 n_per_class, P, L, D)`` and labels (harmful first).

    Per pair: a large shared offset with a few massive dimensions, log-normal feature scales,
    and class means separated along two random directions, more strongly in later layers.
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat([1, 0], n_per_class).astype(np.int32)
    n = 2 * n_per_class
    activations = np.empty((n, positions, layers, width), np.float32)
    for position in range(positions):
        for layer in range(layers):
            scales = np.exp(rng.normal(0.0, 0.7, width))
            offset = rng.normal(0.0, 3.0, width)
            offset[rng.choice(width, 3, replace=False)] = 200.0
            directions = np.linalg.qr(rng.normal(size=(width, 2)))[0].T
            separation = (0.5 + 5.5 * layer / max(layers - 1, 1)) * np.median(scales)
            shift = np.outer(labels - 0.5, [separation, 0.5 * separation]) @ directions
            activations[:, position, layer] = (rng.normal(size=(n, width)) * scales + offset
                                               + shift)
    return activations, labels


# ----------------------------------------------------------------------------------------------
# Command line.

FLAGS = flags.FLAGS
flags.DEFINE_string("activations", None, ".npy of (n, P, L, D) activations (default: synthetic).")
flags.DEFINE_string("labels", None, ".npy of n labels, 1 = harmful, 0 = harmless (with "
                    "--activations).")
flags.DEFINE_integer("n_per_class", 128, "Synthetic prompts per class.")
flags.DEFINE_integer("positions", 2, "Synthetic EOI positions.")
flags.DEFINE_integer("layers", 30, "Synthetic layers.")
flags.DEFINE_integer("width", 576, "Synthetic width.")
flags.DEFINE_integer("max_directions", 100, "N, the most classifiers per pair.")
flags.DEFINE_integer("torch_max_iter", 100, "L-BFGS iterations of each torch classifier.")
flags.DEFINE_integer("sklearn_max_iter", 1000, "max_iter of each scikit-learn classifier.")
flags.DEFINE_list("skip", [], "Baselines not to run: torch, torch_line_search, sklearn.")
flags.DEFINE_integer("seed", 0, "Split and data seed.")
flags.DEFINE_integer("baseline_threads", 0, "torch and BLAS threads of the baselines (0: the "
                     "libraries' defaults); 1 avoids oversubscription on a shared machine.")


def _ours(activations, labels, *, reference: bool):
    features = pair_major(activations)
    rules = dict(stratified=not reference, absolute_stop=reference, keep_failing=reference)
    start = time.perf_counter()
    result = jax.block_until_ready(fit_inlp(features, labels, **rules,
                                            max_directions=FLAGS.max_directions, seed=FLAGS.seed))
    first_call = time.perf_counter() - start  # compile + run
    start = time.perf_counter()
    result = jax.block_until_ready(fit_inlp(features, labels, **rules,
                                            max_directions=FLAGS.max_directions, seed=FLAGS.seed))
    return result, first_call, time.perf_counter() - start


def main(argv):
    del argv
    if FLAGS.activations:
        if not FLAGS.labels:
            raise app.UsageError("--activations needs --labels (a .npy of 0/1 values).")
        activations = np.load(FLAGS.activations).astype(np.float32)
        labels = np.load(FLAGS.labels).astype(np.int32)
        if activations.ndim != 4:
            raise app.UsageError(f"--activations must be (n, P, L, D); got {activations.shape}.")
    else:
        activations, labels = synthetic_activations(FLAGS.n_per_class, FLAGS.positions,
                                                    FLAGS.layers, FLAGS.width, FLAGS.seed)
    n, positions, layers, width = activations.shape
    rows, firsts = [], {}
    for name, reference in (("ours (default rules)", False), ("ours (reference rules)", True)):
        result, first_call, seconds = _ours(activations, labels, reference=reference)
        fitted = int(np.isfinite(np.asarray(result.dev_accuracies)).sum())
        firsts[name] = np.asarray(result.dev_accuracies[..., 0])
        rows.append((name, "non-stratified" if reference else "stratified", fitted, seconds,
                     f"{first_call:.2f} s with compilation", "n/a"))
    baselines = {"torch": ("torch L-BFGS (reference code)", torch_reference_inlp,
                           {"lbfgs_max_iter": FLAGS.torch_max_iter}, "non-stratified"),
                 "torch_line_search": ("torch L-BFGS + strong-Wolfe line search",
                                       torch_reference_inlp,
                                       {"lbfgs_max_iter": FLAGS.torch_max_iter,
                                        "line_search_fn": "strong_wolfe"}, "non-stratified"),
                 "sklearn": ("scikit-learn", sklearn_inlp, {"max_iter": FLAGS.sklearn_max_iter},
                             "stratified")}
    if FLAGS.baseline_threads:
        torch.set_num_threads(FLAGS.baseline_threads)
    for key, (name, run, options, split) in baselines.items():
        if key in FLAGS.skip:
            continue
        with threadpool_limits(FLAGS.baseline_threads or None):
            outcome = run(activations, labels, seed=FLAGS.seed,
                          max_directions=FLAGS.max_directions, **options)
        firsts[name] = outcome.first_accuracies
        rows.append((name, split, int(outcome.n_classifiers.sum()), outcome.seconds, "",
                     f"{np.median(outcome.first_objectives):.4g}"))

    print(f"INLP on activations {activations.shape} ({n} prompts, {positions} x {layers} pairs, "
          f"width {width}), N = {FLAGS.max_directions}, C = 0.1, jax backend "
          f"{jax.default_backend()}, baseline threads {FLAGS.baseline_threads or 'default'}\n")
    print("| method | split | classifiers fitted | total time (s) | ms per classifier | "
          "mean first-classifier dev acc | median first objective | note |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, split, fitted, seconds, note, objective in rows:
        print(f"| {name} | {split} | {fitted} | {seconds:.2f} | {1e3 * seconds / fitted:.2f} | "
              f"{np.mean(firsts[name]):.3f} | {objective} | {note} |")
    names = list(firsts)
    print("\nFirst-classifier dev accuracy per (position, layer):\n")
    print("| position | layer | " + " | ".join(names) + " |")
    print("| ---: | ---: |" + " ---: |" * len(names))
    for position in range(positions):
        for layer in range(layers):
            cells = " | ".join(f"{firsts[name][position, layer]:.3f}" for name in names)
            print(f"| {position - positions} | {layer} | {cells} |")


if __name__ == "__main__":
    app.run(main)
