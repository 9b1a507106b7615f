"""INLP's deterministic train/dev split of the examples, balanced to the smaller class."""

from __future__ import annotations

import dataclasses

import numpy as np
from jax.typing import ArrayLike

from refusal_jax.directions.validation import validated_labels


@dataclasses.dataclass(frozen=True)
class TrainDevSplit:
    """Indices into the example axis; both sorted ascending."""

    train_index: np.ndarray
    dev_index: np.ndarray


def train_dev_split(labels: ArrayLike, *, dev_fraction: float = 0.2, stratified: bool = True,
                    seed: int = 0) -> TrainDevSplit:
    """Deterministic train/dev split of binary labels, balanced to the smaller class.

    With ``m = min(#label 0, #label 1)``:

    - stratified (default): each class is subsampled (seeded) to ``m`` examples and
      ``max(2, round(dev_fraction * m))`` of each go to dev, so the dev majority rate is
      exactly 0.5;
    - not stratified (the published code's rule, index for index): the first ``m`` harmful
      then the first ``m`` harmless examples (in the order of ``labels``) are stacked, and
      ``numpy.random.default_rng(seed).permutation(2m)`` orders the stack; its first
      ``max(4, int(dev_fraction * 2m))`` entries are dev and the rest train, whatever their
      labels (the published code uses seed 42).
    """
    labels = validated_labels(labels)
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must lie in (0, 1); got {dev_fraction}.")
    harmful, harmless = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    per_class = min(harmful.size, harmless.size)
    if per_class < 3:
        raise ValueError(f"INLP needs at least 3 examples of each class for a train/dev split; got "
                         f"{harmful.size} harmful and {harmless.size} harmless.")
    rng = np.random.default_rng(seed)
    if stratified:
        harmful = rng.permutation(harmful)[:per_class]
        harmless = rng.permutation(harmless)[:per_class]
        dev_per_class = min(max(2, round(dev_fraction * per_class)), per_class - 1)
        dev = np.concatenate([harmful[:dev_per_class], harmless[:dev_per_class]])
        train = np.concatenate([harmful[dev_per_class:], harmless[dev_per_class:]])
    else:
        stacked = np.concatenate([harmful[:per_class], harmless[:per_class]])
        order = stacked[rng.permutation(stacked.size)]
        n_dev = max(4, int(dev_fraction * stacked.size))
        dev, train = order[:n_dev], order[n_dev:]
        if np.unique(labels[train]).size < 2:
            raise ValueError("the non-stratified split left one class out of the training set; "
                             "use more examples or another seed.")
    return TrainDevSplit(train_index=np.sort(train), dev_index=np.sort(dev))
