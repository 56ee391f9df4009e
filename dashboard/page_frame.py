"""What every page starts with: the log directory and its runs, or a plain message saying why there is nothing to
show; the run picker (kept in the URL); and the notes for runs with no steps or still being written."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from forkwatch.dashboard import cached_queries, url_state
from forkwatch.dashboard.launch import LOG_DIR_ENV
from forkwatch.store.check import verdict_label
from forkwatch.store.health import HealthReport
from forkwatch.store.location import resolve

# One mark per severity: an alarm red, a warning yellow (shown with its rule, never as a plain "healthy").
SEVERITY_MARKS = {"alarm": "🔴", "warning": "🟡", "none": "🟢"}


def require_runs() -> tuple[str, pd.DataFrame]:
    """The log directory and its runs; stops the page with a message when there is no run to show."""
    log_dir = cached_queries.log_dir()
    if log_dir is None:
        st.error(f"No log directory given: start the app with `forkwatch dashboard LOG_DIR` (or set {LOG_DIR_ENV}).")
        st.stop()
    if not resolve(log_dir).exists():
        st.error(f"The log directory `{log_dir}` does not exist.")
        st.stop()
    try:
        runs = cached_queries.runs(log_dir)
    except Exception as e:  # a page boundary: say what failed where the user can act, do not show a traceback
        st.error(f"Cannot read the runs in `{log_dir}`: {e}")
        st.stop()
    if runs.empty:
        st.info(
            f"No forkwatch run in `{log_dir}` yet. A run appears here as soon as a trainer with forkwatch attached "
            "writes its first records; press Reload in the sidebar then."
        )
        st.stop()
    return log_dir, runs


def pick_runs(runs: pd.DataFrame, *, key: str, multi: bool) -> list[str]:
    """A run picker whose choice is written to the URL (`?run=...`), so the view can be shared."""
    ids = runs["run_id"].tolist()
    chosen = url_state.selected_runs(ids)
    names = dict(zip(runs["run_id"], runs["name"], strict=True))

    def label(r: str) -> str:
        return r if names.get(r) in (None, r) else f"{names[r]} ({r})"

    if multi:
        picked = st.multiselect("Runs", ids, default=chosen, key=key, format_func=label)
    else:
        picked = [st.selectbox("Run", ids, index=ids.index(chosen[0]), key=key, format_func=label)]
    url_state.set_runs(picked)
    return picked


def run_notes(runs: pd.DataFrame, run_ids: list[str]) -> list[str]:
    """Draws a note for each chosen run that has no steps or is still being written; returns the runs with steps."""
    with_steps = []
    rows = runs.set_index("run_id")
    for r in run_ids:
        row = rows.loc[r]
        if row["n_steps"] == 0:
            st.warning(f"Run `{r}` has no steps yet: nothing to draw for it.")
            continue
        if row["status"] == "running":
            st.info(
                f"Run `{r}` is still being written (last step {row['max_step']}): what is on disk is shown; new "
                f"steps appear within {cached_queries.TTL_S} s, or press Reload."
            )
        with_steps.append(r)
    return with_steps


def chosen_runs(key: str) -> tuple[str, pd.DataFrame, list[str]]:
    """The multi-run preamble of a chart page: pick runs (kept in the URL), note the empty or live ones.

    Returns the log dir, every run, and the chosen runs that have steps to draw (empty: the page has said why)."""
    log_dir, runs = require_runs()
    picked = pick_runs(runs, key=key, multi=True)
    if not picked:
        st.info("Choose at least one run.")
        return log_dir, runs, []
    return log_dir, runs, run_notes(runs, picked)


def badge(report: HealthReport) -> str:
    """The run's verdict as the Runs table and the pages show it: the same words as `forkwatch check`."""
    if report.verdict == "insufficient_data":
        return "⚪ too few steps"
    return f"{SEVERITY_MARKS[report.severity]} {verdict_label(report).lower()}"
