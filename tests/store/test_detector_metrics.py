"""The detector metrics (store/detector_metrics.py) against cases computed by hand, and the per-step table against
the ground truth's roles (store/ground_truth.py) on a small hand-made set of tokens."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from forkwatch.store.detector_metrics import auroc, average_precision, judge, position_score, precision_at
from forkwatch.store.ground_truth import role_metrics


def test_auroc_counts_the_pairs_a_positive_wins():
    # pairs (positive, negative): (0.35, 0.1) won, (0.35, 0.4) lost, (0.8, 0.1) won, (0.8, 0.4) won -> 3 of 4
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)


def test_auroc_counts_a_tie_as_half_and_a_perfect_ranking_as_one():
    assert auroc(np.array([1.0, 1.0]), np.array([1, 0])) == pytest.approx(0.5)
    # positive 2 vs negatives (2, 1): one tie (½), one win (1) -> 1.5 / 2
    assert auroc(np.array([2.0, 2.0, 1.0]), np.array([1, 0, 0])) == pytest.approx(0.75)
    assert auroc(np.array([3.0, 2.0, 1.0]), np.array([1, 0, 0])) == pytest.approx(1.0)
    assert auroc(np.array([3.0, 2.0, 1.0]), np.array([0, 0, 1])) == pytest.approx(0.0)


def test_auroc_is_nan_with_one_class_and_ignores_missing_scores():
    assert math.isnan(auroc(np.array([1.0, 2.0]), np.array([1, 1])))
    assert auroc(np.array([np.nan, 0.1, 0.9]), np.array([1, 0, 1])) == pytest.approx(1.0)


def test_average_precision_steps_through_the_ranked_tokens():
    # ranked 0.8(+), 0.4(-), 0.35(+), 0.1(-): recall 0.5 at precision 1, recall 1 at precision 2/3 -> 0.5 + 1/3
    assert average_precision(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(5 / 6)


def test_average_precision_of_a_constant_score_is_the_base_rate_and_ties_enter_together():
    assert average_precision(np.zeros(5), np.array([1, 0, 0, 1, 0])) == pytest.approx(0.4)
    # 0.9(+), then a tie at 0.5 of (+, -): recall 0.5 at precision 1, recall 1 at precision 2/3
    assert average_precision(np.array([0.9, 0.5, 0.5]), np.array([1, 0, 1])) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert math.isnan(average_precision(np.array([0.1, 0.2]), np.array([0, 0])))


def _pairs_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The unweighted AUROC as the old implementation defined it, counted pair by pair: wins + ½ ties."""
    pos, neg = scores[labels], scores[~labels]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def _steps_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """The unweighted AP as the old implementation defined it: Σ over distinct values, highest first, of
    (recall gained) x (precision of flagging every token scoring at least that value)."""
    total, recall = 0.0, 0.0
    for v in np.unique(scores)[::-1]:
        flagged = scores >= v
        r = (flagged & labels).sum() / labels.sum()
        total += (r - recall) * (flagged & labels).sum() / flagged.sum()
        recall = r
    return total


@pytest.mark.parametrize("seed", range(5))
def test_one_implementation_gives_the_old_unweighted_values_with_ties_as_half(seed):
    # the design-weighted metrics (equal weights, one stratum) are the plain ones: scores on a coarse grid make ties
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.3
    scores = np.round(rng.normal(size=200) + labels, 1)
    assert auroc(scores, labels) == pytest.approx(_pairs_auroc(scores, labels))
    assert average_precision(scores, labels) == pytest.approx(_steps_average_precision(scores, labels))
    ones, one_stratum = np.ones(200), np.zeros(200)
    assert auroc(scores, labels, inclusion=ones, strata=one_stratum) == pytest.approx(_pairs_auroc(scores, labels))
    assert average_precision(scores, labels, inclusion=ones) == pytest.approx(_steps_average_precision(scores, labels))


def test_a_sampled_token_stands_for_the_tokens_it_was_drawn_from():
    # a census of 4 tokens, and a sample of it: the negative 0.1 drawn with p = 1/3 stands for three negatives at 0.1
    census = auroc(np.array([0.5, 0.1, 0.1, 0.1, 0.9]), np.array([1, 0, 0, 0, 0]))
    sample = auroc(np.array([0.5, 0.1, 0.9]), np.array([1, 0, 0]), inclusion=np.array([1.0, 1 / 3, 1.0]),
                   strata=np.array(["a", "b", "a"]))
    assert sample == pytest.approx(census) == pytest.approx(0.75)


def test_precision_among_the_flagged_tokens_and_its_ceiling():
    scores, labels = np.array([5.0, 4.0, 3.0, 2.0, 1.0]), np.array([1, 0, 1, 0, 0])
    assert precision_at(scores, labels, 0.4) == (pytest.approx(0.5), pytest.approx(1.0))  # top 2: one hit
    # top 3 of 5 flagged, only 2 positives: a perfect score reaches 2/3
    assert precision_at(scores, labels, 0.6) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert judge(scores, labels, 0.4).auroc == pytest.approx(5 / 6)  # pairs won: 2 + 3 of 6


def test_position_score_is_the_share_of_targets_at_each_position():
    assert position_score(np.array([0, 0, 1, 1, 2]), np.array([1, 1, 0, 1, 0])).tolist() == [1, 1, 0.5, 0.5, 0]


def test_step_metrics_scores_each_step_and_skips_a_score_that_was_not_recorded():
    tokens = pd.DataFrame({
        "step": [1, 1, 1, 1, 2, 2, 2, 2],
        "position": [0, 1, 2, 3, 0, 1, 2, 3],
        "entropy": [1.2, 0.0, 0.7, 0.0, 0.0, 0.0, 0.0, 0.0],
        "renyi2": [0.9, 0.0, 0.7, 0.0, 0.0, 0.0, 0.0, 0.0],
        "group_js": [np.nan] * 8,
        "role": ["decision", "forced", "cosmetic", "mistake", "decision", "forced", "forced", "off_path"],
    })  # fmt: skip
    m = role_metrics(tokens, rate=0.25)
    assert "group_js" not in set(m["predictor"])
    one = m[(m.step == 1) & (m.target == "decision") & (m.predictor == "entropy")].iloc[0]
    assert (one.auroc, one.average_precision, one.precision, one.ceiling) == (1.0, 1.0, 1.0, 1.0)
    # consequential-or-mistake at step 1: decision (1.2) and mistake (0.0); negatives 0.0 (forced), 0.7 (cosmetic)
    both = m[(m.step == 1) & (m.target == "consequential_or_mistake") & (m.predictor == "entropy")].iloc[0]
    assert both.auroc == pytest.approx((2 + 0.5) / 4)  # 1.2 beats both; 0.0 ties the forced 0.0, loses to 0.7
    # step 2: every score is 0, so entropy ranks no better than chance
    flat = m[(m.step == 2) & (m.target == "decision") & (m.predictor == "entropy")].iloc[0]
    assert flat.auroc == pytest.approx(0.5) and flat.base_rate == pytest.approx(0.25)
    pos = m[(m.step == 1) & (m.target == "decision") & (m.predictor == "position")].iloc[0]
    assert pos.auroc == pytest.approx(1.0)  # fitted on the same tokens: the upper bound for position-only rules


def test_the_forks_page_chart_draws_each_predictor_and_the_ceiling():
    from forkwatch.dashboard.page_forks import detector_figure

    tokens = pd.DataFrame({"step": [1, 1, 2, 2], "position": [0, 1, 0, 1], "entropy": [1.0, 0.0, 0.5, 0.0],
                           "renyi2": [0.9, 0.0, 0.4, 0.0], "group_js": [np.nan] * 4,
                           "role": ["decision", "forced", "decision", "forced"]})
    fig = detector_figure(role_metrics(tokens, rate=0.5), "decision")
    names = {t.name for t in fig.data}
    assert {"entropy", "renyi2", "position", "random", "all", "ceiling"} <= names and "group_js" not in names
    ceiling = next(t for t in fig.data if t.name == "ceiling")
    assert list(ceiling.y) == [1.0, 1.0]
