"""Iterative nullspace projection (INLP; Ravfogel et al. 2020) as docs/method.md section 2
specifies.

Conventions (fixed here once):
- Labels: 1 = harmful, 0 = harmless.
- Features are pair-major, ``(*pairs, n, D)``: the leading axes index (EOI position, layer) pairs
  and every output keeps them in front. Activations captured as ``(n, P, L, D)`` become
  ``(P, L, n, D)`` with :func:`pair_major`. The jitted core :func:`fit_inlp_split` takes one flat
  leading pair axis, works through it as a queue, and is sharded along it.
- ``N = max_directions`` slots per pair. Directions are kept in the order found: row ``i`` of
  ``basis`` (``V`` in docs/method.md) is the ``i``-th accepted classifier normal, Gram-Schmidt
  orthonormalised against the earlier rows and oriented so that harmful examples project higher
  than harmless ones. Rows after the last accepted direction are zero, so shapes are static. The
  nullspace projection is ``x - (x @ basis.T) @ basis``; no ``D x D`` matrix is formed anywhere.

Modules: ``split`` (the train/dev split), ``logistic`` (the classifier fits; ``coordinates``,
``problem``, ``newton``, ``lbfgs`` and ``serial`` beneath it), ``pair`` (one pair's loop and its
stop rule), ``loop`` (the pair queue and the entry points), ``k_policy`` (how many directions
are used). Both splits balance the classes to the smaller one; ``stratified=False``,
``absolute_stop`` and ``keep_failing`` are the published code's rules.
"""

from refusal_jax.directions.inlp.k_policy import K_POLICIES, leading_basis, select_k
from refusal_jax.directions.inlp.logistic import (
    SOLVERS,
    LogisticRegressionFit,
    fit_logistic_regression,
)
from refusal_jax.directions.inlp.loop import (
    DEFAULT_PAIRS_IN_FLIGHT,
    fit_inlp,
    fit_inlp_split,
    pair_major,
)
from refusal_jax.directions.inlp.result import INLPResult
from refusal_jax.directions.inlp.split import TrainDevSplit, train_dev_split

__all__ = [
    "DEFAULT_PAIRS_IN_FLIGHT",
    "INLPResult",
    "K_POLICIES",
    "LogisticRegressionFit",
    "SOLVERS",
    "TrainDevSplit",
    "fit_inlp",
    "fit_inlp_split",
    "fit_logistic_regression",
    "leading_basis",
    "pair_major",
    "select_k",
    "train_dev_split",
]
