"""What every page starts with: the log directory and its runs, or a plain message saying why there is nothing to
show; the run picker; the notes for runs with no steps or still being written; the selected runs and step kept in
the URL (`?run=a&run=b&step=12`) so a view can be shared (and in the session, since a page switch drops the URL's
query); and what every chart shares: the palette and the marks and words of a health flag."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from forkwatch.dashboard import cache
from forkwatch.store.health import Flag
from forkwatch.store.location import LOG_DIR_ENV, resolve
from plotly.colors import qualitative


def require_runs() -> tuple[str, pd.DataFrame]:
    """The log directory and its runs; stops the page with a message when there is no run to show."""
    log_dir = cache.log_dir()
    if log_dir is None:
        st.error(f"No log directory given: start the app with `forkwatch dashboard LOG_DIR` (or set {LOG_DIR_ENV}).")
        st.stop()
    if not resolve(log_dir).exists():
        st.error(f"The log directory `{log_dir}` does not exist.")
        st.stop()
    try:
        runs = cache.cached("run_overview", log_dir)
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
    chosen = selected_runs(ids)
    names = dict(zip(runs["run_id"], runs["name"], strict=True))

    def label(r: str) -> str:
        return r if names.get(r) in (None, r) else f"{names[r]} ({r})"

    if multi:
        picked = st.multiselect("Runs", ids, default=chosen, key=key, format_func=label)
    else:
        picked = [st.selectbox("Run", ids, index=ids.index(chosen[0]), key=key, format_func=label)]
    set_runs(picked)
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
                f"Run `{r}` is still being written (last step {row['last_step']}): what is on disk is shown; new "
                f"steps appear within {cache.TTL_S} s, or press Reload."
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


# --- the URL's state ---


def selected_runs(available: list[str]) -> list[str]:
    """The runs chosen in the URL (`?run=a&run=b`), else the last choice of this browser tab, else the first run."""
    chosen = [r for r in st.query_params.get_all("run") if r in available]
    if not chosen:
        chosen = [r for r in st.session_state.get("fw_runs", []) if r in available]
    if not chosen and available:
        chosen = available[:1]
    return chosen


def set_runs(run_ids: list[str]) -> None:
    st.session_state["fw_runs"] = list(run_ids)
    st.query_params["run"] = list(run_ids)


def selected_step(available: list[int]) -> int | None:
    """The step in the URL (`?step=12`) when the run has it, else the last one chosen, else the run's last step."""
    for raw in (st.query_params.get("step"), st.session_state.get("fw_step")):
        try:
            if raw is not None and int(raw) in available:
                return int(raw)
        except ValueError:
            pass
    return available[-1] if available else None


def set_step(step: int | None) -> None:
    st.session_state["fw_step"] = step
    if step is None:
        st.query_params.pop("step", None)
    else:
        st.query_params["step"] = str(step)


# --- what every chart shares: the palette, the marks of health flags (by kind, × an alarm, ○ a warning) ---

COLORS = qualitative.Plotly
FLAG_COLORS = {"collapse": "#d62728", "explosion": "#9467bd", "saturation": "#e7a100"}
FLAG_SYMBOLS = {"alarm": "x", "warning": "circle-open"}  # an alarm is a cross, a warning an open circle


def flag_lines(f: Flag) -> list[str]:
    """A flag's evidence as short lines of text: severity and message, the steps and threshold, the evidence of harm
    (or what was missing, for a warning), the values at the flag."""
    lines = [f"{f.severity}: {f.message}", f"signal: steps {f.steps[0]}–{f.steps[-1]}, threshold {f.threshold:.4g}"]
    return lines + [f"evidence: {e}" for e in f.evidence] + [f"{k} = {v:.4g}" for k, v in f.supporting.items()]
