"""The pages' only way to the store: one cached connection per log directory, bounded caches over named queries,
and the SQL page's sandbox.

Every cached function takes all its inputs as arguments (the log directory included), so a cache never answers
for another directory or run. The connection's views are a snapshot of the parts on disk: it is rebuilt every
`TTL_S` seconds (and on "Reload"), so a run still being written shows its new steps without a restart.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import duckdb
import pandas as pd
import streamlit as st
from forkwatch.dashboard.launch import LOG_DIR_ENV
from forkwatch.store import connect, queries
from forkwatch.store.check import judge_run
from forkwatch.store.health import HealthReport
from forkwatch.store.law import LawFit, fit_entropy_law
from forkwatch.store.run_meta import rules_of_run
from forkwatch.store.sandbox import SandboxedConnection, SandboxError, open_sandboxed

TTL_S = 15  # seconds a snapshot (and a query result) is reused: new steps of a live run appear within this


def log_dir() -> str | None:
    return os.environ.get(LOG_DIR_ENV) or None


@st.cache_resource(ttl=TTL_S, max_entries=4, show_spinner=False)
def _connection(log_dir: str) -> duckdb.DuckDBPyConnection:
    return connect(log_dir)


def _run(query: Callable[..., pd.DataFrame], log_dir: str, *args: Any) -> pd.DataFrame:
    # A DuckDB connection is not thread-safe and Streamlit serves each session in its own thread: one cursor per call.
    cur = _connection(log_dir).cursor()
    try:
        return query(cur, *args)
    finally:
        cur.close()


def reload() -> None:
    """Forget every snapshot and cached result (the sidebar's Reload button)."""
    _connection.clear()
    st.cache_data.clear()


@st.cache_data(ttl=TTL_S, max_entries=8, show_spinner=False)
def runs(log_dir: str) -> pd.DataFrame:
    return _run(queries.run_overview, log_dir)


@st.cache_data(ttl=TTL_S, max_entries=64, show_spinner=False)
def steps(log_dir: str, run_id: str) -> pd.DataFrame:
    return _run(queries.step_series, log_dir, run_id)


@st.cache_data(ttl=TTL_S, max_entries=64, show_spinner=False)
def health(log_dir: str, run_id: str, meta: str | None) -> HealthReport:
    """The run's verdict as `forkwatch check` gives it: judged with the rules it was trained under (`meta`, its
    run.json), the defaults when it has none (the report's first note says which)."""
    return judge_run(steps(log_dir, run_id), meta)[0]


@st.cache_data(ttl=TTL_S, max_entries=64, show_spinner=False)
def law(log_dir: str, run_id: str, meta: str | None, fraction: float) -> LawFit:
    s = steps(log_dir, run_id)
    r = rules_of_run(meta).rules
    return fit_entropy_law(
        s["entropy_mean"], s["reward_mean"], min_points=r.law_min_points, min_r2=r.law_min_r2, fraction=fraction
    )


@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner=False)
def token_steps(log_dir: str, run_id: str) -> pd.DataFrame:
    return _run(queries.token_steps, log_dir, run_id)


@st.cache_data(ttl=TTL_S, max_entries=64, show_spinner=False)
def completions(log_dir: str, run_id: str, step: int) -> pd.DataFrame:
    return _run(queries.completions_at_step, log_dir, run_id, step)


@st.cache_data(ttl=TTL_S, max_entries=64, show_spinner=False)
def completion_tokens(log_dir: str, run_id: str, step: int, completion_id: int) -> pd.DataFrame:
    """One completion's tokens with, at forks, the top-k alternatives (alt_texts, alt_probs)."""
    tokens = _run(queries.completion_tokens, log_dir, run_id, step, completion_id)
    forks = _run(queries.fork_alternatives, log_dir, run_id, step, completion_id)
    return tokens.merge(forks[["position", "sampled_rank", "alt_texts", "alt_probs"]], on="position", how="left")


@st.cache_data(ttl=TTL_S, max_entries=64, show_spinner=False)
def truth_marks(log_dir: str, run_id: str, step: int, completion_id: int) -> pd.DataFrame:
    """Ground-truth decision points of one completion, where the run's task wrote them (the demo's does)."""
    return _run(queries.truth_marks, log_dir, run_id, step, completion_id)


@st.cache_data(ttl=TTL_S, max_entries=16, show_spinner=False)
def top_fork_tokens(log_dir: str, run_id: str, steps: tuple[int, ...], limit: int) -> pd.DataFrame:
    return _run(queries.top_fork_tokens, log_dir, run_id, list(steps), limit)


@st.cache_data(ttl=TTL_S, max_entries=16, show_spinner=False)
def fork_tokens_by_step(log_dir: str, run_id: str, steps: tuple[int, ...], texts: tuple[str, ...]) -> pd.DataFrame:
    return _run(queries.fork_tokens_by_step, log_dir, run_id, list(steps), list(texts))


@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner=False)
def find_prompts(log_dir: str, run_id: str, text: str) -> pd.DataFrame:
    return _run(queries.find_prompts, log_dir, run_id, text)


@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner=False)
def prompt_history(log_dir: str, run_id: str, prompt: str) -> pd.DataFrame:
    return _run(queries.prompt_history, log_dir, run_id, prompt)


# --- the collapse lenses ---


@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner=False)
def entropy_spectrum(log_dir: str, run_id: str) -> pd.DataFrame:
    return _run(queries.entropy_spectrum, log_dir, run_id)


@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner=False)
def effective_rank_series(log_dir: str, run_id: str) -> pd.DataFrame:
    return _run(queries.effective_rank_series, log_dir, run_id)


@st.cache_data(ttl=TTL_S, max_entries=16, show_spinner=False)
def fork_roles_by_step(log_dir: str, run_id: str) -> pd.DataFrame:
    return _run(queries.fork_roles_by_step, log_dir, run_id)


@st.cache_data(ttl=TTL_S, max_entries=16, show_spinner=False)
def probe_list(log_dir: str, run_id: str) -> pd.DataFrame:
    return _run(queries.probe_list, log_dir, run_id)


@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner=False)
def probe_tokens(log_dir: str, run_id: str, probe_id: int) -> pd.DataFrame:
    return _run(queries.probe_tokens, log_dir, run_id, probe_id)


@st.cache_data(ttl=TTL_S, max_entries=16, show_spinner=False)
def probe_top_overlap(log_dir: str, run_id: str, fraction: float) -> pd.DataFrame:
    return _run(queries.probe_top_overlap, log_dir, run_id, fraction)


@st.cache_data(ttl=TTL_S, max_entries=8, show_spinner=False)
def run_curves(log_dir: str) -> pd.DataFrame:
    return _run(queries.run_curves, log_dir)


# --- the SQL page: text a person typed, run only through the sandbox ---



@dataclass(frozen=True)
class SqlResult:
    frame: pd.DataFrame
    truncated: bool
    error: str | None = None


@st.cache_resource(ttl=TTL_S, max_entries=2, show_spinner=False)
def _sandbox(log_dir: str) -> SandboxedConnection:
    return open_sandboxed(log_dir)  # the sandbox's own limits (time, rows): the same as `forkwatch sql`


@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner="Running the query…")
def run_sql(log_dir: str, sql: str) -> SqlResult:
    """The result, or the sandbox's one-line message when it refused or failed the statement (cached too, so a
    rerun such as a download click does not run it again)."""
    try:
        df = _sandbox(log_dir).query(sql)
    except SandboxError as e:
        return SqlResult(pd.DataFrame(), False, str(e))
    return SqlResult(df, bool(df.attrs.get("truncated")))
