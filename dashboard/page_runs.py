"""Runs: every run with its health badge, entropy and reward curves, steps, tokens, selection method and status; a
picture per run with its alarms marked; choose one or several."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from forkwatch.dashboard import cached_queries, lens_views, page_frame
from forkwatch.dashboard.charts import flag_lines


def render() -> None:
    st.title("Runs")
    log_dir, runs = page_frame.require_runs()
    reports = {r.run_id: cached_queries.health(log_dir, r.run_id, r.meta) for r in runs.itertuples(index=False)}
    entropy_curves, reward_curves = lens_views.curve_columns(log_dir, runs["run_id"].tolist())
    table = pd.DataFrame(
        {
            "health": [page_frame.badge(reports[r].verdict) for r in runs["run_id"]],
            "run": runs["run_id"],
            "name": runs["name"],
            "status": runs["status"],
            "entropy": entropy_curves,
            "reward": reward_curves,
            "steps": runs["n_steps"],
            "last step": runs["max_step"],
            "tokens": runs["n_tokens"],
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
                       "reward": st.column_config.LineChartColumn("reward", help="mean reward per step")},
    )  # fmt: skip
    lens_views.run_pictures(log_dir, runs["run_id"].tolist(), reports)
    for r in runs[runs["faults"] > 0].itertuples(index=False):
        st.warning(f"Run `{r.run_id}`: {r.faults} recording fault(s) — {r.faults_detail}. Training was not affected; "
                   "the records of those places may have gaps (run.json has the counts).")
    picked = page_frame.pick_runs(runs, key="runs_pick", multi=True)
    if not picked:
        st.info("Choose one or more runs above: the other pages show the runs chosen here.")
        return
    for run_id in picked:
        report = reports[run_id]
        with st.expander(f"{run_id}: {page_frame.badge(report.verdict)}", expanded=report.verdict != "healthy"):
            if report.verdict == "insufficient_data":
                st.write(f"{report.n_steps} step(s) with a finite mean entropy: too few for a verdict yet.")
            for f in report.flags:
                st.markdown(f"**{f.rule}** fired at step {f.fired_at}  \n" + "  \n".join(flag_lines(f)))
            law = report.law
            if law.ok:
                st.write(
                    f"Entropy–reward law: a = {law.a:.4g}, b = {law.b:.4g}, ceiling {law.ceiling:.4g}, "
                    f"R² {law.r2:.3f}, {law.n_points} points."
                )
            else:
                st.write(f"Entropy–reward law: no ceiling ({law.reason}).")
            for note in report.notes:
                st.caption(note)
    page_frame.run_notes(runs, picked)
