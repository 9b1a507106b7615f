"""Ranking, the lowest-bypass fallback and the number of components, on hand-made scores.

Every expected answer is written out literally, derived by hand from the rules of
`selection.ranking` (docs/method.md section 4): a pair survives when its bypass is finite, its layer
is below (1 - prune_layer_fraction) L, its KL is at most kl_threshold and its best steering
score is at least min_steering_score; DiM survivors are ranked by bypass (lower first), INLP
ones by first-classifier dev accuracy (higher first), then bypass.
"""

import types

import numpy as np
import pytest

from refusal_jax.selection.ranking import (
    CandidateScores,
    lowest_bypass_fallback,
    n_components,
    rank,
    rank_order,
)

nan = np.nan
# 2 EOI positions x 5 layers. prune_layer_fraction 0.2: layers >= 0.8 * 5 = 4 are late.
SELECT = types.SimpleNamespace(prune_layer_fraction=0.2, kl_threshold=0.1,
                               min_steering_score=0.0)
BYPASS = np.array([[nan, 0.5, -1.0, 2.0, -3.0],
                   [0.1, -0.5, 0.3, -2.0, 1.0]])
KL = np.array([[0.0, 0.05, 0.2, 0.01, 0.01],     # (0, 2): KL 0.2 > 0.1
               [0.01, 0.3, 0.02, 0.05, 0.0]])    # (1, 1): KL 0.3 > 0.1
STEERING = np.ones((2, 5, 2))                    # two multipliers; the max counts
STEERING[1, 3] = [-1.0, -0.5]                    # (1, 3): best steering -0.5 < 0
STEERING[0, 1] = [-4.0, 0.25]                    # (0, 1): best 0.25 >= 0 survives
# INLP first-classifier dev accuracy of each pair.
ACCURACY = np.array([[0.9, 0.6, 0.99, 0.8, 1.0],
                     [0.7, 0.95, 0.8, 0.5, 0.9]])


def scores(filtered=None):
    return CandidateScores(bypass=BYPASS.copy(), steering=STEERING.copy(), kl=KL.copy(),
                           filtered=np.ones((2, 5), bool) if filtered is None else filtered)


def test_dim_survivors_rank_by_lowest_bypass_and_each_filter_is_counted():
    # NaN bypass: (0, 0); late layer 4: (0, 4), (1, 4); KL: (0, 2), (1, 1); steering: (1, 3).
    # Left: (0, 1) 0.5, (0, 3) 2.0, (1, 0) 0.1, (1, 2) 0.3 -> by bypass.
    survivors, discarded = rank(scores(), select_config=SELECT)
    assert survivors == [(1, 0), (1, 2), (0, 1), (0, 3)]
    assert discarded == {"nan": 1, "late_layer": 2, "kl": 2, "steering": 1}


def test_inlp_survivors_rank_by_highest_accuracy_then_lowest_bypass():
    # Same survivors; accuracies (0, 1) 0.6, (0, 3) 0.8, (1, 0) 0.7, (1, 2) 0.8: the tie at 0.8
    # goes to the lower bypass, (1, 2) at 0.3 before (0, 3) at 2.0.
    survivors, _ = rank(scores(), select_config=SELECT, accuracy=ACCURACY)
    assert survivors == [(1, 2), (0, 3), (1, 0), (0, 1)]


def test_pairs_whose_filters_were_not_scored_do_not_survive_and_are_counted():
    filtered = np.ones((2, 5), bool)
    filtered[0, 3] = filtered[1, 2] = False  # scored until a survivor was found
    unscored = scores(filtered)
    unscored.kl[~filtered] = nan
    unscored.steering[~filtered] = nan
    survivors, discarded = rank(unscored, select_config=SELECT)
    assert survivors == [(1, 0), (0, 1)]
    assert discarded == {"nan": 1, "late_layer": 2, "kl": 2, "steering": 1, "not_scored": 2}


def test_a_scored_nan_kl_or_steering_discards_the_pair():
    nan_scores = scores()
    nan_scores.kl[1, 0] = nan
    nan_scores.steering[0, 1, 1] = nan  # one multiplier NaN: the max is NaN
    survivors, discarded = rank(nan_scores, select_config=SELECT)
    assert survivors == [(1, 2), (0, 3)]
    assert discarded["nan"] == 3


def test_rank_order_lists_every_eligible_pair_in_ranking_order():
    # Eligible (finite bypass, layer < 4): (0,1) 0.5, (0,2) -1.0, (0,3) 2.0, (1,0) 0.1,
    # (1,1) -0.5, (1,2) 0.3, (1,3) -2.0.
    assert rank_order(BYPASS, select_config=SELECT) == [
        (1, 3), (0, 2), (1, 1), (1, 0), (1, 2), (0, 1), (0, 3)]
    # Accuracies 0.6, 0.99, 0.8, 0.7, 0.95, 0.8, 0.5 of the same pairs.
    assert rank_order(BYPASS, select_config=SELECT, accuracy=ACCURACY) == [
        (0, 2), (1, 1), (1, 2), (0, 3), (1, 0), (0, 1), (1, 3)]


def test_fallback_takes_the_lowest_bypass_pair_outside_the_late_layers():
    # (0, 4) has the lowest bypass, -3.0, but layer 4 is late; (1, 3) at -2.0 is next.
    chosen, note = lowest_bypass_fallback(scores(), {"kl": 9}, select_config=SELECT)
    assert chosen == [(1, 3)]
    assert "no candidate passed the filters (discarded per filter: {'kl': 9})" in note
    # Only pairs whose filters were scored count: without (1, 3), (0, 2) at -1.0.
    filtered = np.ones((2, 5), bool)
    filtered[1, 3] = False
    chosen, _ = lowest_bypass_fallback(scores(filtered), {}, select_config=SELECT)
    assert chosen == [(0, 2)]


def test_fallback_without_any_eligible_pair_raises():
    hopeless = scores()
    hopeless.bypass[:, :4] = nan  # what is left is at the late layer 4
    with pytest.raises(ValueError, match="no candidate to fall back on"):
        lowest_bypass_fallback(hopeless, {}, select_config=SELECT)


@pytest.mark.parametrize("just_one, top_percentage, n_survivors, expected", [
    (True, 0.5, 10, 1),     # just_one wins over the percentage
    (False, 0.25, 10, 3),   # ceil(2.5)
    (False, 0.5, 10, 5),
    (False, 0.0, 10, 1),    # at least one
    (False, 0.5, 1, 1),     # ceil(0.5)
    (False, 1.0, 7, 7),
    (False, 0.3, 0, 1),
])
def test_n_components(just_one, top_percentage, n_survivors, expected):
    config = types.SimpleNamespace(just_one=just_one, top_percentage=top_percentage)
    assert n_components(n_survivors, config) == expected
