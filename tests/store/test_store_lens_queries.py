"""The collapse-lens named queries (store/queries.py) on small hand-built tables with known answers."""

from __future__ import annotations

import math

import duckdb
import pandas as pd
import pytest
from forkwatch.store import queries
from forkwatch.store.spectrum import N_BINS


@pytest.fixture
def con():
    c = duckdb.connect()
    t = pd.Timestamp("2026-11-30", tz="UTC")
    h1, h2 = [0] * N_BINS, [0] * N_BINS
    h1[0], h1[10] = 3, 1
    h2[0], h2[10] = 4, 0
    c.execute("CREATE TABLE steps (run_id VARCHAR, step INTEGER, time TIMESTAMPTZ, entropy_spectrum INTEGER[], "
              "effective_rank_mean FLOAT, entropy_mean FLOAT, reward_mean FLOAT)")
    c.executemany("INSERT INTO steps VALUES (?, ?, ?, ?, ?, ?, ?)", [
        ("r", 1, t, h1, 5.0, 1.0, 0.1),
        ("r", 2, t, h2, None, 0.5, 0.4),
        ("r", 3, t, None, 3.0, 0.2, 0.6),
        ("q", 1, t, h1, None, 2.0, 0.0),
    ])
    c.execute("CREATE TABLE vocab (run_id VARCHAR, step INTEGER, token_id INTEGER, text VARCHAR, role VARCHAR)")
    c.executemany("INSERT INTO vocab VALUES (?, ?, ?, ?, ?)", [
        ("r", None, 1, " wait", "connective"), ("r", None, 2, "7", "number"), ("r", None, 3, "+", None),
        ("r", 5, 3, "+", None),  # a token written twice (lazy vocab) counts once
    ])
    c.execute("CREATE TABLE tokens (run_id VARCHAR, step INTEGER, completion_id BIGINT, position INTEGER, "
              "token_id INTEGER, is_fork BOOLEAN)")
    c.executemany("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?)", [
        ("r", 1, 0, 0, 1, True), ("r", 1, 0, 1, 2, True), ("r", 1, 0, 2, 3, True), ("r", 1, 0, 3, 3, True),
        ("r", 1, 0, 4, 2, False), ("r", 2, 1, 0, 2, True),
    ])
    c.execute("CREATE TABLE probes (run_id VARCHAR, step INTEGER, probe_id INTEGER, position INTEGER, "
              "token_id INTEGER, logprob FLOAT, entropy FLOAT, renyi2 FLOAT, top_ids INTEGER[], top_probs FLOAT[])")
    rows = []
    # probe 0, 10 tokens: top-2 at step 1 = positions {3, 7}; at step 5 = {3, 9} (half shared)
    for step, hot in ((1, {3: 2.0, 7: 1.5}), (5, {3: 2.0, 9: 1.8})):
        for pos in range(10):
            rows.append(("r", step, 0, pos, 2, -0.1, hot.get(pos, 0.01 * pos), 0.0, [2], [0.9]))
    c.executemany("INSERT INTO probes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    return c


def test_entropy_spectrum_unnests_bins_with_shares(con):
    df = queries.entropy_spectrum(con, "r")
    assert sorted(df["step"].unique()) == [1, 2]  # step 3 has no spectrum
    assert len(df) == 2 * N_BINS
    s1 = df[df["step"] == 1].set_index("bin")
    assert s1.loc[0, "count"] == 3 and s1.loc[10, "count"] == 1
    assert s1.loc[0, "share"] == pytest.approx(0.75) and s1["share"].sum() == pytest.approx(1.0)


def test_effective_rank_series_keeps_measured_steps_only(con):
    df = queries.effective_rank_series(con, "r")
    assert df["step"].tolist() == [1, 3]
    assert df["effective_rank_mean"].tolist() == [5.0, 3.0]


def test_fork_roles_by_step_counts_and_fills_missing_roles_from_text(con):
    df = queries.fork_roles_by_step(con, "r")
    s1 = df[df["step"] == 1].set_index("role")
    assert s1["n_forks"].to_dict() == {"connective": 1, "number": 1, "operator": 2}  # '+' role computed from text
    assert s1["share"].sum() == pytest.approx(1.0)
    assert df[df["step"] == 2].set_index("role")["share"].to_dict() == {"number": 1.0}


def test_fork_roles_by_step_on_a_run_without_forks_is_empty(con):
    assert queries.fork_roles_by_step(con, "q").empty


def test_probe_top_overlap_compares_with_the_first_scoring(con):
    df = queries.probe_top_overlap(con, "r", fraction=0.2)
    assert df["step"].tolist() == [1, 5]
    assert df["overlap"].tolist() == [1.0, 0.5]
    assert df["n_top"].tolist() == [2, 2]


def test_probe_tokens_and_list(con):
    df = queries.probe_tokens(con, "r", 0)
    assert len(df) == 20 and df["text"].iloc[0] == "7"
    lst = queries.probe_list(con, "r")
    assert lst.iloc[0][["n_tokens", "n_steps", "first_step", "last_step"]].tolist() == [10, 2, 1, 5]


def test_run_curves_subsample_long_runs_keeping_first_and_last():
    c = duckdb.connect()
    c.execute("CREATE TABLE steps AS SELECT 'long' AS run_id, range::INTEGER AS step, now() AS time, "
              "1.0 / (range + 1) AS entropy_mean, 0.0 AS reward_mean FROM range(1, 1001)")
    df = queries.run_curves(c, points=50)
    assert 40 <= len(df) <= 60
    assert df["step"].iloc[0] == 1 and df["step"].iloc[-1] == 1000
    assert not any(math.isnan(x) for x in df["entropy_mean"])


def test_probe_top_overlap_keeps_the_plugins_count_of_top_positions():
    # 0.07 × 100 is 7.000000000000001 in floating point: the top set still has 7 positions, as the plugin keeps;
    # and a fraction too small for one position keeps one.
    c = duckdb.connect()
    c.execute("CREATE TABLE probes AS SELECT 'r' AS run_id, 1 AS step, 0 AS probe_id, range::INTEGER AS position, "
              "range * 0.01 AS entropy FROM range(100)")
    assert queries.probe_top_overlap(c, "r", fraction=0.07)["n_top"].tolist() == [7]
    assert queries.probe_top_overlap(c, "r", fraction=0.001)["n_top"].tolist() == [1]


def test_prompt_history_skips_an_undefined_value_instead_of_returning_nan():
    c = duckdb.connect()
    c.execute("CREATE TABLE completions (run_id VARCHAR, step INTEGER, completion_id BIGINT, prompt VARCHAR, "
              "reward FLOAT, entropy_mean FLOAT, length INTEGER, truncated BOOLEAN)")
    c.executemany("INSERT INTO completions VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
        ("r", 1, 0, "p", 1.0, 0.5, 3, False), ("r", 1, 1, "p", float("nan"), None, 3, False),
        ("r", 1, 2, "p", 0.0, 0.7, 3, True),
    ])
    df = queries.prompt_history(c, "r", "p")
    assert df["reward_mean"].tolist() == [0.5] and df["entropy_mean"].tolist() == pytest.approx([0.6])
