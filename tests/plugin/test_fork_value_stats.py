"""Fork value's statistics without a model (plugin/fork_value_stats.py) and the Horvitz–Thompson estimates that turn a
stratified sample of positions into metrics for every position (store/fork_values.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from forkwatch.plugin.fork_value_stats import (
    Z95,
    branch_estimates,
    cross_fit_value,
    delta_se,
    estimate_position,
    fork_value,
    permutation_p,
    strata_of,
    stratified_sample,
    weights,
)
from forkwatch.store.detector_metrics import auroc, average_precision
from forkwatch.store.fork_values import lexical_score, population_mean, weighted_spearman


def test_branch_estimates_are_the_mean_with_agresti_coull_interval_on_the_reward_range():
    r = np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
    b = branch_estimates(r, (0.0, 1.0))
    z2 = Z95**2
    p = (4 + z2 / 2) / (4 + z2)  # all four rollouts at the top of the range
    assert b.q.tolist() == [1.0, 0.5]
    assert b.se[0] == pytest.approx(math.sqrt(p * (1 - p) / (4 + z2)))
    assert b.lo[0] == pytest.approx(p - Z95 * math.sqrt(p * (1 - p) / (4 + z2)))
    assert b.hi[0] == 1.0  # clipped to the range
    assert b.se[0] > 0  # never 0, unlike s/sqrt(m) when every rollout agrees
    # rewards in [2, 4]: the same interval, scaled
    b2 = branch_estimates(2 + 2 * r, (2.0, 4.0))
    assert b2.se == pytest.approx(2 * b.se) and b2.lo == pytest.approx(2 + 2 * b.lo)


def test_fork_value_of_two_branches_is_twice_p_one_minus_p_times_the_gap():
    w = weights(np.array([0.3, 0.1]))  # normalised over the measured mass
    assert w.tolist() == pytest.approx([0.75, 0.25])
    assert fork_value(w, np.array([1.0, 0.2])) == pytest.approx(2 * 0.75 * 0.25 * 0.8)
    assert fork_value(w, np.array([0.5, 0.5])) == pytest.approx(0.0, abs=1e-15)


def test_cross_fit_equals_the_value_when_every_branch_is_deterministic():
    w = weights(np.array([0.5, 0.3, 0.2]))
    q = np.array([1.0, 0.0, 0.4])
    r = np.repeat(q[:, None], 6, axis=1)
    assert cross_fit_value(w, r, np.random.default_rng(0), 4) == pytest.approx(fork_value(w, q))


def test_cross_fit_is_centred_on_zero_where_no_branch_matters_and_the_plug_in_is_not():
    rng = np.random.default_rng(1)
    w = weights(np.array([0.5, 0.5]))
    r = (rng.random((2000, 2, 8)) < 0.6).astype(float)  # both branches Bernoulli(0.6): true value 0
    cf = cross_fit_value(w, r, rng, 4)
    plug_in = fork_value(w, r.mean(-1))
    assert abs(cf.mean()) < 3 * cf.std() / math.sqrt(len(cf))
    assert plug_in.mean() > 10 * plug_in.std() / math.sqrt(len(plug_in))  # noise alone makes the plug-in positive


def test_delta_se_takes_the_worst_sign_of_a_tied_branch():
    w = weights(np.array([0.5, 0.5]))
    se = np.array([0.1, 0.1])
    # tied: both signs of each branch are tried; the worst is (+, -): c = (0.5, -0.5)
    assert delta_se(w, np.array([0.7, 0.7]), se, 1.0) == pytest.approx(math.sqrt(2 * (0.5 * 0.1) ** 2))
    assert delta_se(w, np.array([0.9, 0.1]), se, 1.0) == pytest.approx(math.sqrt(2 * (0.5 * 0.1) ** 2))


def test_permutation_test_holds_its_level_under_no_effect_and_finds_a_real_one():
    rng = np.random.default_rng(2)
    w = weights(np.array([0.4, 0.35, 0.25]))
    null = [permutation_p(w, (rng.random((3, 8)) < 0.5).astype(float), rng, 200) for _ in range(300)]
    assert np.mean(np.asarray(null) < 0.05) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 300)
    effect = np.array([[1.0] * 8, [0.0] * 8, [1.0] * 8])
    assert permutation_p(w, effect, rng, 200) < 0.01


def test_a_tiny_but_certain_effect_is_significant_yet_not_consequential():
    """A token whose rare alternatives always fail (a comma the format needs): p-value small, value below the floor."""
    pi = np.array([0.997, 0.002, 0.001])
    r = np.stack([np.ones(16), np.zeros(16), np.zeros(16)])
    e = estimate_position(pi, r, sampled=0, reward_range=(0.0, 1.0), rng=np.random.default_rng(3))
    assert e.p_value < 0.01
    assert e.value == pytest.approx(fork_value(weights(pi), np.array([1.0, 0.0, 0.0])))
    assert not e.consequential
    assert e.sampled_advantage == pytest.approx(1.0 - 0.997)


def test_a_large_effect_is_consequential_with_its_spread_and_sampled_advantage():
    pi = np.array([0.5, 0.5])
    r = np.stack([np.ones(16), np.zeros(16)])
    e = estimate_position(pi, r, sampled=1, reward_range=(0.0, 1.0), rng=np.random.default_rng(4))
    assert e.value == pytest.approx(0.5) and e.consequential
    assert e.spread == 1.0 and e.sampled_advantage == pytest.approx(-0.5) and e.v == pytest.approx(0.5)
    assert e.mass == 1.0


def test_stratified_sample_shares_the_budget_equally_and_takes_small_strata_whole():
    strata = np.array(["a"] * 100 + ["b"] * 6 + ["c"] * 30)
    idx, p = stratified_sample(strata, 40, np.random.default_rng(0))
    took = {h: int((strata[idx] == h).sum()) for h in "abc"}
    assert took == {"a": 17, "b": 6, "c": 17}
    assert np.allclose(p[strata[idx] == "a"], 17 / 100) and np.allclose(p[strata[idx] == "b"], 1.0)
    assert (np.diff(idx) > 0).all()
    again, _ = stratified_sample(strata, 40, np.random.default_rng(0))
    assert (again == idx).all()
    assert (1 / p).sum() == pytest.approx(len(strata))  # Σ 1/p = N: the HT mean is the plain mean of a census


def _population(rng: np.random.Generator, n: int = 1500):
    """Positions in three strata of different sizes whose target rate and score differ: the unweighted sample is
    biased toward the small, oversampled strata."""
    strata = np.array(["fork"] * 150 + ["decision"] * 50 + ["other"] * (n - 200))
    rate = np.where(strata == "fork", 0.5, np.where(strata == "decision", 0.8, 0.05))
    label = rng.random(n) < rate
    score = rng.normal(0, 1, n) + 1.2 * label + np.where(strata == "fork", 0.8, 0.0)
    value = 0.3 * label + 0.1 * rng.random(n)
    return strata, label, score, value


def test_horvitz_thompson_estimates_match_the_population_on_average():
    rng = np.random.default_rng(5)
    strata, label, score, value = _population(rng)
    truth = {"mean": label.mean(), "auroc": auroc(score, label), "ap": average_precision(score, label)}
    est = {k: [] for k in truth} | {"naive_mean": [], "naive_ap": [], "spearman": []}
    for _ in range(300):
        idx, p = stratified_sample(strata, 120, rng)
        s, y, h = score[idx], label[idx], strata[idx]
        est["mean"].append(population_mean(y, p))
        est["auroc"].append(auroc(s, y, inclusion=p, strata=h))
        est["ap"].append(average_precision(s, y, inclusion=p))
        est["spearman"].append(weighted_spearman(s, value[idx], p))
        est["naive_mean"].append(y.mean())
        est["naive_ap"].append(average_precision(s, y))
    for k, t in truth.items():
        e = np.asarray(est[k])
        # unbiased (the mean) or consistent with a bias of order 1/n (the ratio estimators): within 3 MC SE + 0.01
        assert abs(e.mean() - t) < 3 * e.std() / math.sqrt(len(e)) + (0 if k == "mean" else 0.01), k
    assert abs(np.mean(est["naive_mean"]) - truth["mean"]) > 0.1  # without the weights the sample misleads
    assert abs(np.mean(est["naive_ap"]) - truth["ap"]) > 0.2
    full = weighted_spearman(score, value, np.ones_like(score))
    assert abs(np.mean(est["spearman"]) - full) < 0.02


def test_weighted_metrics_of_a_census_are_the_plain_metrics():
    rng = np.random.default_rng(6)
    strata, label, score, value = _population(rng, 300)
    ones = np.ones(len(score))
    assert auroc(score, label, inclusion=ones, strata=strata) == pytest.approx(auroc(score, label))
    assert average_precision(score, label, inclusion=ones) == pytest.approx(average_precision(score, label))
    rank = np.argsort(np.argsort(score))
    assert weighted_spearman(score, rank * 2.0 + 1, ones) == pytest.approx(1.0)
    assert math.isnan(weighted_spearman(np.zeros_like(score), score, 1 / (1 + rank)))  # a constant has no ranks
    assert population_mean(label, ones) == pytest.approx(label.mean())


def test_lexical_rule_flags_position_zero_and_tokens_after_a_separator():
    import pandas as pd

    got = lexical_score(np.array([0, 1, 2, 3, 4]), pd.Series([None, "g", ",", "x", " ."]))
    assert got.tolist() == [True, False, True, False, True]


def test_strata_split_forks_roles_and_what_a_selector_kept():
    fork = np.array([True, False, True, False])
    assert strata_of(fork).tolist() == ["fork", "other", "fork", "other"]
    assert strata_of(fork, np.ones(4)).tolist() == ["fork", "other", "fork", "other"]  # nothing dropped: no split
    got = strata_of(fork, np.array([2.0, 0.0, 0.0, np.nan]), np.array(["decision", "forced", "decision", "forced"]))
    assert got.tolist() == ["decision/fork/kept", "forced/other/dropped", "decision/fork/dropped",
                            "forced/other/kept"]  # an unknown weight (NaN) counts as kept
