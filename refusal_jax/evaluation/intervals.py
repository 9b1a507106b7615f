"""95% intervals for the study's rates and means, and the test that a difference is resolved.

Rates (k of n completions) get the Wilson score interval, which stays inside [0, 1] and is not
degenerate at k = 0 or k = n; means over prompts get a percentile bootstrap; the difference of two
independent rates gets Newcombe's hybrid score interval (method 10 of Newcombe 1998), built from
the two Wilson intervals. An `Estimate` carries a value with its interval, so a metric can return
both and the evaluate stage records the interval beside the value.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A point estimate with its interval [low, high]."""

    value: float
    low: float
    high: float

    @property
    def interval(self) -> list[float]:
        return [self.low, self.high]


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE
                    ) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate ``successes / n``."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"a rate needs 0 <= successes <= n and n >= 1; got {successes} of {n}")
    z = _z(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At k = 0 (k = n) the bound is 0 (1) exactly; the formula leaves a rounding residue.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def rate_estimate(flags: Sequence[bool], confidence: float = CONFIDENCE) -> Estimate:
    """The fraction of true ``flags`` with its Wilson interval."""
    n, successes = len(flags), int(sum(bool(flag) for flag in flags))
    return Estimate(successes / max(n, 1), *wilson_interval(successes, n, confidence))


def mean_estimate(values: Sequence[float], confidence: float = CONFIDENCE, *,
                  n_resamples: int = 2000, seed: int = 0) -> Estimate:
    """The mean of ``values`` with a percentile-bootstrap interval (``n_resamples`` resamples
    drawn with ``seed``, so the interval is reproducible)."""
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"a mean needs a non-empty 1-D list of values, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("cannot bootstrap a mean of values that hold NaN or inf")
    rng = np.random.default_rng(seed)
    resampled = values[rng.integers(0, values.size, (n_resamples, values.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    return Estimate(float(values.mean()), float(low), float(high))


def rate_difference_interval(successes_a: int, n_a: int, successes_b: int, n_b: int,
                             confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Newcombe's hybrid score interval of ``successes_a / n_a - successes_b / n_b`` for two
    independent samples."""
    p_a, p_b = successes_a / n_a, successes_b / n_b
    low_a, high_a = wilson_interval(successes_a, n_a, confidence)
    low_b, high_b = wilson_interval(successes_b, n_b, confidence)
    difference = p_a - p_b
    return (difference - math.sqrt((p_a - low_a) ** 2 + (high_b - p_b) ** 2),
            difference + math.sqrt((high_a - p_a) ** 2 + (p_b - low_b) ** 2))
