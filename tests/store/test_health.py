"""Health rules on synthetic step series with a known fate (tests/synthetic.py)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
from forkwatch.store.health import HealthRules, LiveMonitor, fit_entropy_law, judge
from forkwatch.store.run_meta import rules_of_run
from synthetic import LAW_A, LAW_B, step_series


def test_clean_collapse_is_flagged_with_evidence():
    report = judge(step_series("collapse", 60))
    assert report.verdict == "collapse"
    flag = next(f for f in report.flags if f.rule == "collapse.mean")
    early = report.early_entropy
    assert flag.threshold == pytest.approx(0.2 * early, rel=1e-5)
    assert all(v < flag.threshold for v in flag.values)
    assert len(flag.steps) == len(flag.values) >= HealthRules().sustain_steps
    assert flag.fired_at == flag.steps[HealthRules().sustain_steps - 1]
    assert "collapse_fraction" in flag.message


def test_collapse_tail_rule_fires_when_the_p90_vanishes():
    report = judge(step_series("collapse", 60))
    tail = next(f for f in report.flags if f.rule == "collapse.tail")
    assert all(v < 0.05 for v in tail.values)


def test_clean_explosion_is_flagged_with_supporting_evidence():
    report = judge(step_series("explosion", 60))
    assert report.verdict == "explosion"
    flag = next(f for f in report.flags if f.rule == "explosion.mean")
    assert all(v > flag.threshold for v in flag.values)
    s = flag.supporting
    assert s["completion_length_mean_at_flag"] > s["completion_length_mean_early"]
    assert s["truncated_fraction_at_flag"] > s["truncated_fraction_early"]
    assert s["reward_mean_at_flag"] < s["reward_mean_early"]


def test_explosion_towards_log_vocab_needs_the_vocab_size():
    series = step_series("healthy", 40)
    series["entropy_mean"] = np.full(40, 3.0, dtype=np.float32)  # flat: not "above its early level"
    assert judge(series).verdict == "healthy"
    report = judge(series, vocab_size=100)  # 0.5 × ln 100 = 2.3 < 3.0
    assert report.verdict == "explosion"
    assert report.flags[0].rule == "explosion.log_vocab"


@pytest.mark.parametrize("seed", range(10))
def test_healthy_noisy_run_raises_no_alarm(seed):
    report = judge(step_series("healthy", 200, seed=seed))
    assert report.verdict == "healthy", [f.message for f in report.flags]
    assert report.flags == []


def test_run_too_short_for_a_verdict():
    report = judge(step_series("collapse", 5))
    assert report.verdict == "insufficient_data"
    assert report.flags == []
    assert report.law.ceiling is None and "fewer than" in report.law.reason


def test_nan_and_inf_are_ignored_and_reported():
    series = step_series("collapse", 60)
    series["entropy_mean"][[3, 30]] = np.nan
    series["entropy_mean"][31] = np.inf
    series["reward_mean"][10] = -np.inf
    report = judge(series)
    assert report.verdict == "collapse"
    assert report.ignored == {"entropy_mean": [3, 30, 31], "reward_mean": [10]}
    assert report.law.n_points == 56
    json.dumps(report.to_dict(), allow_nan=False)  # evidence stays printable


def test_all_nan_series_does_not_crash():
    series = {"step": np.arange(20), "entropy_mean": np.full(20, np.nan)}
    report = judge(series)
    assert report.verdict == "insufficient_data"
    # a column never finite is a missing one: its rules are not evaluated (and not listed step by step as ignored)
    assert report.not_evaluated["collapse.mean"] == "no entropy_mean logged in the series"
    assert "entropy_mean" not in report.ignored


def test_repeated_steps_keep_the_last_value():
    series = {"step": np.array([0, 1, 1, 2]), "entropy_mean": np.array([1.0, 9.0, 1.0, 1.0])}
    assert judge(series, HealthRules(min_steps=1, sustain_steps=1)).flags == []


def test_law_fit_recovers_a_b_and_ceiling():
    series = step_series("collapse", 60)
    fit = fit_entropy_law(series["entropy_mean"], series["reward_mean"])
    assert fit.ok
    assert fit.a == pytest.approx(LAW_A, rel=0.05)
    assert fit.b == pytest.approx(LAW_B, rel=0.05)
    assert fit.ceiling == pytest.approx(fit.b - fit.a)
    assert fit.r2 > 0.95 and fit.n_points == 60


def test_law_fit_refuses_too_few_points():
    fit = fit_entropy_law([1.0, 0.8, 0.5], [0.1, 0.3, 0.5], min_points=8)
    assert fit.ceiling is None and fit.n_points == 3 and "fewer than 8" in fit.reason


def test_law_fit_refuses_a_poor_fit():
    series = step_series("healthy", 100)
    fit = fit_entropy_law(series["entropy_mean"], series["reward_mean"])
    assert fit.ceiling is None and fit.reason is not None
    assert fit.r2 is not None and fit.r2 < 0.6 or "a =" in fit.reason


def test_law_fit_refuses_when_reward_falls_with_entropy():
    h = np.linspace(1.0, 0.1, 20)
    fit = fit_entropy_law(h, np.exp(h), min_points=5)  # a = -1: reward falls as entropy falls
    assert fit.ceiling is None and "a =" in fit.reason


def test_law_fit_on_the_first_fraction_only():
    series = step_series("collapse", 100)
    fit = fit_entropy_law(series["entropy_mean"], series["reward_mean"], fraction=0.15)
    assert fit.n_points == 15 and fit.ceiling == pytest.approx(LAW_B - LAW_A, abs=0.05)


def test_saturation_when_reward_reaches_the_ceiling_while_entropy_falls():
    series = step_series("collapse", 60)
    rules = HealthRules(collapse_fraction=0.001, tail_floor=0.0)  # silence collapse: look at saturation alone
    report = judge(series, rules)
    assert report.verdict == "healthy" and report.severity == "warning", "saturation is a warning, never an alarm"
    flag = report.flags[0]
    assert flag.rule == "saturation" and flag.severity == "warning"
    assert all(v >= flag.threshold for v in flag.values)


def test_rules_validate_their_thresholds():
    with pytest.raises(ValueError, match="collapse_fraction"):
        HealthRules(collapse_fraction=1.5)
    assert "collapse_fraction" in HealthRules.help()


def test_live_monitor_reports_each_episode_once_at_the_step_it_fires():
    series = step_series("collapse", 60)
    monitor = LiveMonitor()
    seen = []
    for i in range(60):
        row = {k: v[i].item() for k, v in series.items()}
        seen += [(f.rule, f.fired_at, i) for f in monitor.update(row)]
    assert all(fired == i for _, fired, i in seen), "a flag is returned at the step it fires"
    # Every condition is causal (the law too is fitted on the steps so far): live and batch agree on every flag.
    batch = judge(series)
    assert sorted((r, s) for r, s, _ in seen) == sorted((f.rule, f.fired_at) for f in batch.flags)
    assert len({(r, s) for r, s, _ in seen}) == len(seen), "no episode is reported twice"
    assert monitor.active_kinds()["collapse"] is True
    assert monitor.active_kinds()["explosion"] is False


@pytest.mark.parametrize("kind", ["collapse", "explosion"])
def test_live_monitor_in_batches_reports_the_same_alarms_as_step_by_step(kind):
    series = step_series(kind, 60)
    rows = [{k: v[i].item() for k, v in series.items()} for i in range(60)]
    one = LiveMonitor()
    by_step = [(f.rule, f.fired_at) for row in rows for f in one.update(row)]
    batched = LiveMonitor()
    by_batch = [(f.rule, f.fired_at) for i in range(0, 60, 7) for f in batched.update_many(rows[i : i + 7])]
    assert any(kind in r for r, _ in by_step), "the series must raise a flag of its kind for this test to mean anything"
    assert sorted(by_batch) == sorted(by_step)
    assert batched.active_kinds() == one.active_kinds()
    with pytest.raises(ValueError, match="step"):
        batched.update_many([{"step": 61, "entropy_mean": 1.0}, {"entropy_mean": 1.0}])
    assert len(batched._series["step"]) == 60, "a batch with a bad row is refused whole"


def test_live_monitor_batch_reports_an_episode_that_fired_and_cleared_inside_it():
    monitor = LiveMonitor(HealthRules(min_steps=1, sustain_steps=2, early_steps=1))
    entropy = [1.0, 1.0, 3.0, 3.0, 1.0, 1.0]  # above 2x the early level at steps 2-3 only
    flags = monitor.update_many([{"step": i, "entropy_mean": e} for i, e in enumerate(entropy)])
    assert [(f.rule, f.fired_at, f.until) for f in flags] == [("explosion.mean", 3, 3)]
    assert monitor.active_kinds()["explosion"] is False  # over by the end of the batch


def test_live_monitor_tolerates_missing_and_non_numeric_values():
    monitor = LiveMonitor(HealthRules(min_steps=1, sustain_steps=1))
    assert monitor.update({"step": 0, "select_method": "ict"}) == []
    assert monitor.update({"step": 1, "entropy_mean": math.nan}) == []
    assert monitor.update({"step": 2, "entropy_mean": 1.0, "reward_mean": None}) == []
    assert monitor.report.verdict == "healthy"


def _rising_from_low(reward_slope: float, truncated_end: float = 0.0, n: int = 200) -> dict[str, np.ndarray]:
    """Entropy 0.12 → 0.28 nats (more than 2× its early level); reward and truncation as given."""
    t = np.linspace(0, 1, n)
    return {"step": np.arange(n), "entropy_mean": 0.12 + 0.16 * (1 - np.exp(-5 * t)),
            "reward_mean": 0.4 + reward_slope * t, "completion_length_mean": 300 + 100 * t,
            "truncated_fraction": 0.01 + truncated_end * t}


def test_a_rise_from_a_tiny_level_with_reward_rising_is_a_warning_not_an_alarm():
    report = judge(_rising_from_low(+0.3))
    assert report.verdict == "healthy" and report.severity == "warning" and not report.alarm
    flag = report.deciding
    assert flag.rule == "explosion.mean" and flag.severity == "warning"
    assert "no evidence of harm" in flag.evidence[0]


@pytest.mark.parametrize(("slope", "trunc", "evidence"), [(-0.3, 0.0, "reward falling"),
                                                          (0.0, 0.5, "length cap")])
def test_the_same_rise_with_evidence_of_harm_is_an_alarm(slope, trunc, evidence):
    report = judge(_rising_from_low(slope, trunc))
    assert report.verdict == "explosion" and report.alarm
    alarm = report.deciding
    assert alarm.severity == "alarm" and any(evidence in e for e in alarm.evidence), alarm.evidence
    same = [f for f in report.flags if f.rule == alarm.rule and f.fired_at == alarm.fired_at]
    assert same == [alarm], "a signal with its evidence already there is an alarm only, not also a warning"


def test_without_required_evidence_the_signal_alone_is_an_alarm():
    report = judge(_rising_from_low(+0.3), HealthRules(alarm_needs_evidence=False))
    assert report.verdict == "explosion" and report.deciding.rule == "explosion.mean"


def test_a_collapse_with_reward_still_rising_and_the_tail_kept_is_a_warning():
    n = 300
    t = np.linspace(0, 1, n)
    ent = 0.05 + 0.95 * np.exp(-4 * t)  # below 0.2 × the early level from step ~130
    data = {"step": np.arange(n), "entropy_mean": ent, "entropy_p90": np.full(n, 0.5),
            "reward_mean": 0.2 + 0.8 * t, "completion_length_mean": np.full(n, 300.0)}
    report = judge(data)
    assert report.severity == "warning" and report.deciding.rule == "collapse.mean"
    data["reward_mean"] = np.minimum(0.2 + 0.8 * t, 0.5)  # the reward stalls: harm
    assert judge(data).verdict == "collapse"


def test_rules_refuse_a_misspelt_name_and_every_field_has_help():
    with pytest.raises(ValueError, match="colapse_fraction.*valid names"):
        HealthRules.from_dict({"colapse_fraction": 0.1})
    assert HealthRules.from_dict({"sustain_steps": 5}).sustain_steps == 5
    helps = HealthRules.help()
    assert all(text.strip() for text in helps.values()) and "alarm_needs_evidence" in helps


def test_a_stored_run_is_judged_with_its_own_rules_or_the_defaults_saying_so():
    own = rules_of_run(json.dumps({"config": {"health_rules": {**asdict(HealthRules()), "sustain_steps": 1}}}))
    assert own.source == "run" and own.rules.sustain_steps == 1 and "sustain_steps=1" in own.note
    old = rules_of_run(json.dumps({"config": {}}))
    assert old.source == "default" and old.rules == HealthRules() and "default rules" in old.note
    bad = rules_of_run(json.dumps({"config": {"health_rules": {"nope": 1}}}))
    assert bad.source == "default" and "nope" in bad.note


@pytest.mark.parametrize("n", [3, 30])
def test_trailing_median_is_the_same_with_and_without_gaps_in_the_series(n):
    from forkwatch.store.health import trailing_median

    x = np.random.default_rng(0).normal(size=n)
    expected = [np.median(x[max(0, i - 9) : i + 1]) for i in range(n)]
    assert trailing_median(x, 10) == pytest.approx(expected)  # the fast path (no NaN)
    x[1] = np.nan
    with_gap = [np.nanmedian(x[max(0, i - 9) : i + 1]) for i in range(n)]
    assert trailing_median(x, 10) == pytest.approx(with_gap, nan_ok=True)


def _saturating_reward_collapse(noise: float, n: int = 300) -> dict[str, np.ndarray]:
    """Entropy drains below a fifth of its start (the tail kept), while the reward keeps rising ever more slowly:
    late in the run a window gains ~0.008, under 5 % of the reward's move so far (~0.78)."""
    u = np.linspace(0, 1, n)
    rng = np.random.default_rng(0)
    return {"step": np.arange(n), "entropy_mean": 0.04 + 0.96 * np.exp(-6 * u), "entropy_p90": np.full(n, 0.5),
            "reward_mean": 0.2 + 0.8 * (1 - np.exp(-5 * u)) + rng.normal(0, noise, n),
            "completion_length_mean": np.full(n, 300.0)}


def test_a_small_gain_beyond_noise_is_improving_one_within_noise_is_not():
    # the help of reward_stall_fraction: "not improving" needs the gain below its share of the largest move AND not
    # distinguishable from noise. A smooth reward's small late gain is far beyond its noise: improving (a warning);
    # the same curve with noisy steps cannot be told from a stall: an alarm.
    smooth = judge(_saturating_reward_collapse(noise=0.0005))
    assert smooth.deciding.rule == "collapse.mean" and smooth.severity == "warning", smooth.flags
    noisy = judge(_saturating_reward_collapse(noise=0.05))
    assert noisy.verdict == "collapse" and "reward_not_improving" in noisy.deciding.harm
    stall = next(e for e in noisy.deciding.evidence if e.startswith("reward not improving"))
    assert "beyond noise" in stall


def test_the_law_fitted_on_the_first_15_percent_extrapolates_a_run_that_follows_it_and_not_a_collapse():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "corpus"))
    import shapes

    def late_error(name: str) -> float:
        data = shapes.series(name, 0)
        h, r = data["entropy_mean"], data["reward_mean"]
        fit = fit_entropy_law(h, r, fraction=0.15)
        assert fit.ok and fit.n_points == math.ceil(0.15 * h.size), fit
        late = slice(int(0.9 * h.size), None)
        return float(np.median(fit.predict(h[late])) - np.median(r[late]))

    assert abs(late_error("mechanism_collapse")) < 0.03  # reward = 0.8 − 0.3·exp(H) + noise: the law itself
    assert late_error("plateau_below_ceiling_drain") > 0.1  # the reward stopped following it: over-predicted
