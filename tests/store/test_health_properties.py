"""The health rules' invariants on generated series (hypothesis): a constant series never warns; no entropy rule fires
before min_steps; NaN, ±inf, missing columns and logging every N steps never crash a rule and never make a run
healthy by omission; rows given out of order or twice give the verdict of the sorted, deduplicated series; and the
live monitor, fed in hand-offs of any size, raises exactly the flags `judge` (what `check` runs) finds."""

from __future__ import annotations

import math

import numpy as np
from forkwatch.store.health import HealthRules, LiveMonitor, judge
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

COLUMNS = ("entropy_mean", "entropy_p90", "reward_mean", "completion_length_mean", "truncated_fraction")
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

rules_st = st.builds(
    HealthRules,
    early_steps=st.integers(1, 5), min_steps=st.integers(1, 10), sustain_steps=st.integers(1, 4),
    evidence_window=st.integers(2, 20), saturation_window=st.integers(2, 10), alarm_needs_evidence=st.booleans(),
    law_min_points=st.integers(3, 10),
)


@st.composite
def series_st(draw, *, max_steps: int = 120, holes: bool = True) -> dict[str, np.ndarray]:
    """A run's step series: entropy trending down (a collapse), up (an explosion) or flat, with noise, a reward,
    length and truncation that may follow; optionally NaN/±inf sprinkled in, a column dropped, a non-finite loss."""
    n = draw(st.integers(0, max_steps))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    u = np.linspace(0, 1, n)
    e0 = draw(st.floats(0.02, 3.0))
    trend = draw(st.sampled_from([-5.0, -2.0, 0.0, 1.0, 2.5]))
    ent = e0 * np.exp(trend * u) * np.exp(rng.normal(0, draw(st.floats(0, 0.3)), n))
    data = {
        "step": np.arange(1, n + 1, dtype=np.float64) * draw(st.integers(1, 10)),  # logged every N steps
        "entropy_mean": ent,
        "entropy_p90": ent * draw(st.floats(1.0, 3.0)),
        "reward_mean": draw(st.floats(-1, 1)) + draw(st.floats(-1, 1)) * u + rng.normal(0, draw(st.floats(0, 0.2)), n),
        "completion_length_mean": 300 * np.exp(draw(st.floats(-1.5, 1.5)) * u),
        "truncated_fraction": np.clip(0.02 + draw(st.floats(-0.1, 0.6)) * u, 0, 1),
    }
    if holes:
        for name in COLUMNS:
            if n and draw(st.booleans()):
                bad = rng.random(n) < draw(st.floats(0, 0.5))
                data[name][bad] = rng.choice([np.nan, np.inf, -np.inf], bad.sum())
        for name in draw(st.lists(st.sampled_from(COLUMNS), max_size=3, unique=True)):
            del data[name]
        if n and draw(st.booleans()):  # the trainer's own scalars, with a non-finite one somewhere
            grad = np.full(n, 0.5)
            grad[rng.integers(0, n)] = draw(st.sampled_from([np.nan, np.inf]))
            data["grad_norm"] = grad
            data["non_finite"] = (~np.isfinite(grad)).astype(np.float64)
    return data


def _rows(data: dict[str, np.ndarray]) -> list[dict[str, float]]:
    return [{k: float(v[i]) for k, v in data.items()} for i in range(data["step"].size)]


def _keys(report) -> list[tuple]:
    return sorted(f.key for f in report.flags)


@SETTINGS
@given(n=st.integers(0, 150), level=st.floats(0.01, 5), reward=st.floats(-2, 2), rules=rules_st,
       vocab=st.sampled_from([None, 10**6]))
def test_a_constant_series_never_warns_or_alarms(n, level, reward, rules, vocab):
    data = {"step": np.arange(n), "entropy_mean": np.full(n, level), "entropy_p90": np.full(n, 2 * level),
            "reward_mean": np.full(n, reward), "completion_length_mean": np.full(n, 100.0),
            "truncated_fraction": np.full(n, 0.1), "grad_norm": np.full(n, 1.0), "non_finite": np.zeros(n)}
    assert judge(data, rules, vocab_size=vocab).flags == []


@SETTINGS
@given(data=series_st(), rules=rules_st)
def test_no_entropy_rule_fires_before_min_steps_logged_steps(data, rules):
    report = judge(data, rules)
    order = np.argsort(data["step"], kind="stable")
    ent = data.get("entropy_mean")
    finite_steps = [] if ent is None else [data["step"][i] for i in order if math.isfinite(np.float32(ent[i]))]
    for f in report.flags:
        if f.rule == "explosion.non_finite":
            continue  # needs no history: the step it appears
        assert len(finite_steps) >= rules.min_steps and f.fired_at >= finite_steps[rules.min_steps - 1], f


@SETTINGS
@given(data=series_st(), rules=rules_st)
def test_holes_and_missing_columns_never_crash_and_never_pass_a_rule_by_omission(data, rules):
    report = judge(data, rules)  # never raises
    ent = data.get("entropy_mean")
    if ent is None or not np.isfinite(ent).any():
        assert report.verdict != "healthy", "no entropy: no verdict, never healthy"
        assert {"collapse.mean", "explosion.mean", "saturation"} <= set(report.not_evaluated)
    for name, rules_needing in (("entropy_p90", ["collapse.tail"]), ("reward_mean", ["saturation"])):
        col = data.get(name)
        if col is None or not np.isfinite(col).any():
            assert set(rules_needing) <= set(report.not_evaluated), (name, report.not_evaluated)
    assert all(math.isfinite(v) for v in report.law.to_dict().values() if isinstance(v, float))


@SETTINGS
@given(data=series_st(holes=False), rules=rules_st, every=st.integers(2, 7), seed=st.integers(0, 2**32 - 1))
def test_logging_every_n_steps_or_rows_without_entropy_between_them_give_the_same_flags(data, rules, every, seed):
    base = judge(data, rules)
    spread = dict(data, step=data["step"] * every)  # the same rows, logged every `every` steps
    assert [(r, s, t * every) for r, s, t in _keys(base)] == _keys(judge(spread, rules))
    # rows that lack the entropy (another logger's rows, eval rows) between the logged ones change no flag
    rng = np.random.default_rng(seed)
    n = data["step"].size
    extra = rng.choice(np.arange(1, every) if every > 1 else [0], size=min(n, 20)) if n else np.zeros(0, int)
    at = rng.choice(n, size=extra.size, replace=False) if n else np.zeros(0, int)
    holes = {k: np.concatenate([v, np.full(extra.size, np.nan)]) for k, v in spread.items() if k != "step"}
    holes["step"] = np.concatenate([spread["step"], spread["step"][at] + extra])
    assert _keys(judge(holes, rules)) == _keys(judge(spread, rules))


@SETTINGS
@given(data=series_st(), rules=rules_st, seed=st.integers(0, 2**32 - 1))
def test_rows_out_of_order_or_given_twice_give_the_verdict_of_the_sorted_deduplicated_series(data, rules, seed):
    n = data["step"].size
    rng = np.random.default_rng(seed)
    expected = judge(data, rules)
    # shuffled, with some rows repeated: an earlier copy holding other values, the true row given last
    order = rng.permutation(n)
    twice = rng.choice(n, size=min(n, 5), replace=False) if n else np.zeros(0, int)
    shuffled = {k: v[order] for k, v in data.items()}
    stale = {k: (v[twice] if k == "step" else rng.normal(5, 1, twice.size)) for k, v in data.items()}
    rows = {k: np.concatenate([stale[k], shuffled[k]]) for k in data}  # stale copies first, so the true row wins
    got = judge(rows, rules)
    assert got.verdict == expected.verdict and _keys(got) == _keys(expected)
    assert got.not_evaluated == expected.not_evaluated


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # the slowest: judges often
@given(data=series_st(), rules=rules_st, chunks=st.lists(st.integers(1, 12), min_size=1, max_size=30),
       amend=st.booleans())
def test_the_live_monitor_raises_exactly_the_flags_judge_finds(data, rules, chunks, amend):
    rows = _rows(data)
    monitor = LiveMonitor(rules)
    live = []
    if amend:  # as the plugin feeds it: each step's row first without the trainer's scalars, then completed (on_log)
        for row in rows:
            live += [f.key for f in monitor.update({k: v for k, v in row.items() if k not in ("grad_norm",
                                                                                          "non_finite")})]
            live += [f.key for f in monitor.update(row)]
    else:  # hand-offs of any size
        i, k = 0, 0
        while i < len(rows):
            chunk = rows[i : i + chunks[k % len(chunks)]]
            live += [f.key for f in monitor.update_many(chunk)]
            i, k = i + len(chunk), k + 1
    expected = _keys(judge(data, rules))
    assert len(live) == len(set(live)), "a flag reported twice"
    assert sorted(live) == expected
