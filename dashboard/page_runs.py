"""Runs: every run with its health badge (the verdict of `forkwatch check`, judged with the run's own rules), entropy
and reward curves, steps, trained tokens, selection method and status; a picture per run with its alarms and
warnings marked; choose one or several."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from forkwatch.dashboard import cached_queries, page_frame, runs_charts
from forkwatch.dashboard.charts import flag_lines
from forkwatch.store.health import HealthReport

MAX_PICTURES = 12  # runs drawn as small multiples


def render() -> None:
    st.title("Runs")
    log_dir, runs = page_frame.require_runs()
    reports = {r.run_id: cached_queries.health(log_dir, r.run_id, r.meta) for r in runs.itertuples(index=False)}
    entropy_curves, reward_curves = curve_columns(log_dir, runs["run_id"].tolist())
    table = pd.DataFrame(
        {
            "health": [page_frame.badge(reports[r]) for r in runs["run_id"]],
            "run": runs["run_id"],
            "name": runs["name"],
            "status": runs["status"],
            "entropy": entropy_curves,
            "reward": reward_curves,
            "steps": runs["n_steps"],
            "last step": runs["max_step"],
            "trained tokens": runs["trained_tokens"],
            "selection": runs["select_method"].fillna("—"),
            "model": runs["model"].fillna("—"),
            "faults": runs["faults"],
            "dropped": runs["dropped"],
            "updated": runs["updated_at"],
        }
    )
    st.dataframe(
        table, hide_index=True, width="stretch", key="runs_table",
        column_config={"entropy": st.column_config.LineChartColumn("entropy", help="mean token entropy per step"),
                       "reward": st.column_config.LineChartColumn("reward", help="mean reward per step"),
                       "trained tokens": st.column_config.NumberColumn(
                           "trained tokens", help="every response token trained on (sum of steps.n_tokens); "
                           "`forkwatch runs` lists the recorded token rows")},
    )  # fmt: skip
    run_pictures(log_dir, runs["run_id"].tolist(), reports)
    for r in runs[runs["faults"] > 0].itertuples(index=False):
        st.warning(f"Run `{r.run_id}`: {r.faults} recording fault(s) — {r.faults_detail}. Training was not affected; "
                   "the records of those places may have gaps (run.json has the counts).")
    picked = page_frame.pick_runs(runs, key="runs_pick", multi=True)
    if not picked:
        st.info("Choose one or more runs above: the other pages show the runs chosen here.")
        return
    for run_id in picked:
        report = reports[run_id]
        with st.expander(f"{run_id}: {page_frame.badge(report)}", expanded=report.severity != "none"):
            if report.verdict == "insufficient_data":
                st.write(f"{report.n_steps} step(s) with a finite mean entropy: too few for a verdict yet.")
            for f in report.flags:
                st.markdown(f"**{f.rule}** ({f.severity}) fired at step {f.fired_at}  \n" + "  \n".join(flag_lines(f)))
            st.write(f"Entropy–reward law: {report.law.describe()}.")
            for note in report.notes:
                st.caption(note)
    page_frame.run_notes(runs, picked)


def curve_columns(log_dir: str, run_ids: list[str]) -> tuple[list[list[float | None]], list[list[float | None]]]:
    """Each run's entropy and reward curve as lists, for the Runs table's sparklines (an undefined step is None)."""
    curves = cached_queries.run_curves(log_dir)
    by_run = {r: df for r, df in curves.groupby("run_id")}
    empty = pd.DataFrame({"entropy_mean": [], "reward_mean": []})

    def values(r: str, col: str) -> list[float | None]:
        s = by_run.get(r, empty)[col].astype(float)
        return [None if pd.isna(v) else float(v) for v in s]

    return [values(r, "entropy_mean") for r in run_ids], [values(r, "reward_mean") for r in run_ids]


def run_pictures(log_dir: str, run_ids: list[str], reports: dict[str, HealthReport]) -> None:
    st.subheader("Each run at a glance")
    curves = cached_queries.run_curves(log_dir)
    drawn = [r for r in run_ids if r in set(curves["run_id"])][:MAX_PICTURES]
    if not drawn:
        st.info("No run has steps yet: the pictures appear with the first steps.")
        return
    if len(drawn) < len(run_ids):
        st.caption(f"{len(drawn)} of {len(run_ids)} runs drawn (the ones with steps, at most {MAX_PICTURES}).")
    st.caption("Mean entropy (left) and mean reward (right) per step; × marks an alarm, ○ a warning, at the step "
               "its rule fired (the same rule and step as `forkwatch check`).")
    fig = runs_charts.run_pictures_figure(curves, {r: reports[r].flags for r in drawn}, drawn)
    st.plotly_chart(fig, key="runs_pictures", width="stretch")
