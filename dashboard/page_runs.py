"""Runs: every run with its health badge (the verdict of `forkwatch check`, judged with the run's own rules), entropy
and reward curves, steps, trained tokens, selection method and status; a picture per run with its alarms and
warnings marked; choose one or several."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from forkwatch.dashboard import frame
from forkwatch.dashboard.cache import cached
from forkwatch.dashboard.frame import COLORS, FLAG_COLORS, FLAG_SYMBOLS, flag_lines
from forkwatch.store.check import verdict_label
from forkwatch.store.health import Flag, HealthReport
from plotly.subplots import make_subplots

MAX_PICTURES = 12  # runs drawn as small multiples
# One mark per severity: an alarm red, a warning yellow (shown with its rule, never as a plain "healthy").
SEVERITY_MARKS = {"alarm": "🔴", "warning": "🟡", "none": "🟢"}


def render() -> None:
    st.title("Runs")
    log_dir, runs = frame.require_runs()
    reports = {r.run_id: cached("run_health", log_dir, r.run_id, r.meta) for r in runs.itertuples(index=False)}
    entropy_curves, reward_curves = curve_columns(log_dir, runs["run_id"].tolist())
    table = pd.DataFrame(
        {
            "health": [badge(reports[r]) for r in runs["run_id"]],
            "run": runs["run_id"],
            "name": runs["name"],
            "status": runs["status"],
            "entropy": entropy_curves,
            "reward": reward_curves,
            "steps": runs["n_steps"],
            "last step": runs["last_step"],
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
    picked = frame.pick_runs(runs, key="runs_pick", multi=True)
    if not picked:
        st.info("Choose one or more runs above: the other pages show the runs chosen here.")
        return
    for run_id in picked:
        report = reports[run_id]
        with st.expander(f"{run_id}: {badge(report)}", expanded=report.severity != "none"):
            if report.verdict == "insufficient_data":
                st.write(f"{report.n_steps} step(s) with a finite mean entropy: too few for a verdict yet.")
            for f in report.flags:
                st.markdown(f"**{f.rule}** ({f.severity}) fired at step {f.fired_at}  \n" + "  \n".join(flag_lines(f)))
            st.write(f"Entropy–reward law: {report.law.describe()}.")
            for note in report.notes:
                st.caption(note)
    frame.run_notes(runs, picked)


def curve_columns(log_dir: str, run_ids: list[str]) -> tuple[list[list[float | None]], list[list[float | None]]]:
    """Each run's entropy and reward curve as lists, for the Runs table's sparklines (an undefined step is None)."""
    curves = cached("run_curves", log_dir)
    by_run = {r: df for r, df in curves.groupby("run_id")}
    empty = pd.DataFrame({"entropy_mean": [], "reward_mean": []})

    def values(r: str, col: str) -> list[float | None]:
        s = by_run.get(r, empty)[col].astype(float)
        return [None if pd.isna(v) else float(v) for v in s]

    return [values(r, "entropy_mean") for r in run_ids], [values(r, "reward_mean") for r in run_ids]


def run_pictures(log_dir: str, run_ids: list[str], reports: dict[str, HealthReport]) -> None:
    st.subheader("Each run at a glance")
    curves = cached("run_curves", log_dir)
    drawn = [r for r in run_ids if r in set(curves["run_id"])][:MAX_PICTURES]
    if not drawn:
        st.info("No run has steps yet: the pictures appear with the first steps.")
        return
    if len(drawn) < len(run_ids):
        st.caption(f"{len(drawn)} of {len(run_ids)} runs drawn (the ones with steps, at most {MAX_PICTURES}).")
    st.caption("Mean entropy (left) and mean reward (right) per step; × marks an alarm, ○ a warning, at the step "
               "its rule fired (the same rule and step as `forkwatch check`).")
    fig = run_pictures_figure(curves, {r: reports[r].flags for r in drawn}, drawn)
    st.plotly_chart(fig, key="runs_pictures", width="stretch")


def badge(report: HealthReport) -> str:
    """The run's verdict as the Runs table and its expanders show it: the same words as `forkwatch check`."""
    if report.verdict == "insufficient_data":
        return "⚪ too few steps"
    return f"{SEVERITY_MARKS[report.severity]} {verdict_label(report).lower()}"


# --- the figure: drawing only, every number comes in through the arguments ---


def run_pictures_figure(curves: pd.DataFrame, flags: dict[str, list[Flag]], runs: list[str]) -> go.Figure:
    """Small multiples, one row per run: mean entropy (left) and mean reward (right), health flags marked where
    they fired on the entropy curve, in the flag's colour: × an alarm, ○ a warning."""
    fig = make_subplots(rows=len(runs), cols=2, shared_xaxes=False, vertical_spacing=min(0.3 / max(len(runs), 1), 0.08),
                        horizontal_spacing=0.08,
                        subplot_titles=[t for r in runs for t in (f"{r}: entropy", f"{r}: reward")])  # fmt: skip
    for i, run_id in enumerate(runs, start=1):
        df = curves[curves["run_id"] == run_id]
        fig.add_trace(go.Scatter(x=df["step"], y=df["entropy_mean"], mode="lines", line={"color": COLORS[0]},
                                 showlegend=False, name="entropy"), row=i, col=1)
        fig.add_trace(go.Scatter(x=df["step"], y=df["reward_mean"], mode="lines", line={"color": COLORS[2]},
                                 showlegend=False, name="reward"), row=i, col=2)
        at = df.set_index("step")["entropy_mean"]
        marks = list(flags.get(run_id, []))
        if marks:
            fig.add_trace(
                go.Scatter(
                    x=[f.fired_at for f in marks], y=[nearest(at, f.fired_at) for f in marks], mode="markers",
                    marker={"symbol": [FLAG_SYMBOLS[f.severity] for f in marks], "size": 11,
                            "color": [FLAG_COLORS.get(f.kind, "#333") for f in marks]},
                    text=[f"{f.rule} ({f.severity}) at step {f.fired_at}" for f in marks], hoverinfo="text", showlegend=False,
                    name="flags",
                ),
                row=i, col=1,
            )  # fmt: skip
    fig.update_layout(height=150 * len(runs) + 60, margin={"t": 30, "b": 20, "l": 40, "r": 10})
    return fig


def nearest(series: pd.Series, step: int) -> float:
    """The value at `step`, or at the nearest step drawn (the curves are subsampled on long runs)."""
    if series.empty:
        return float("nan")
    idx = series.index.to_numpy()
    return float(series.iloc[int(np.abs(idx - step).argmin())])
