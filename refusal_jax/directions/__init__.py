"""Direction estimators on captured activations: DiM, INLP and LEACE (pure array code).

``refusal_jax.directions.fit.fit_directions`` fits all of them at every (EOI position, layer)
of a study's activations, on the devices of a ``runtime`` placement.
"""

from refusal_jax.directions.dim import mean_difference
from refusal_jax.directions.inlp import (
    K_POLICIES,
    INLPResult,
    LogisticRegressionFit,
    TrainDevSplit,
    fit_inlp,
    fit_inlp_split,
    fit_logistic_regression,
    leading_basis,
    pair_major,
    select_k,
    train_dev_split,
)
from refusal_jax.directions.leace import LeaceEraser, erase, fit_leace

__all__ = [
    "K_POLICIES",
    "INLPResult",
    "LeaceEraser",
    "LogisticRegressionFit",
    "TrainDevSplit",
    "erase",
    "fit_inlp",
    "fit_inlp_split",
    "fit_leace",
    "fit_logistic_regression",
    "leading_basis",
    "mean_difference",
    "pair_major",
    "select_k",
    "train_dev_split",
]
