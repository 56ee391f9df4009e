"""The Forks page's "Fork detection against the ground truth" section: per step, how well entropy, Rényi-2 and
group-JS rank the tokens that matter (AUROC, average precision, precision among the top 20 % against its ceiling),
next to the baselines (store/detector_queries.py). Shown only for runs whose task wrote a ground truth (the demo's)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from forkwatch.dashboard import cached_queries
from forkwatch.store import detector_queries
from plotly.subplots import make_subplots

_COLOURS = {"entropy": "#1f77b4", "renyi2": "#9467bd", "group_js": "#d62728", "position": "#7f7f7f",
            "random": "#bcbd22", "all": "#c7c7c7"}
_TARGETS = {"decision": "consequential decisions",
            "consequential_or_mistake": "decisions, confident-consequential tokens and mistakes"}


@st.cache_data(ttl=cached_queries.TTL_S, max_entries=16, show_spinner=False)
def detector_by_step(log_dir: str, run_id: str) -> pd.DataFrame:
    return cached_queries._run(detector_queries.detector_by_step, log_dir, run_id)


def detector_figure(m: pd.DataFrame, target: str) -> go.Figure:
    """AUROC, average precision and precision (with the ceiling, dashed) per step, one line per predictor."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=("AUROC", "average precision", "precision of the top 20 %"))
    m = m[m["target"] == target]
    for col, metric in enumerate(("auroc", "average_precision", "precision"), start=1):
        for name, g in m.groupby("predictor", sort=False):
            if metric == "auroc" and name == "all":
                continue  # a constant score: 0.5 by definition
            fig.add_trace(go.Scatter(x=g["step"], y=g[metric], mode="lines", name=name, legendgroup=name,
                                     showlegend=col == 1, line={"color": _COLOURS.get(name)}), row=1, col=col)
        if metric == "precision" and not m.empty:
            c = m[m["predictor"] == m["predictor"].iloc[0]]
            fig.add_trace(go.Scatter(x=c["step"], y=c["ceiling"], mode="lines", name="ceiling",
                                     line={"color": "black", "dash": "dash"}), row=1, col=col)
    fig.update_xaxes(title_text="step")
    fig.update_layout(height=320, margin={"t": 40, "b": 40, "l": 40, "r": 10})
    return fig


def detector_section(log_dir: str, run: str) -> None:
    m = detector_by_step(log_dir, run)
    if m.empty:
        return
    st.subheader("Fork detection against the ground truth")
    target = st.radio("Target", list(_TARGETS), format_func=_TARGETS.get, horizontal=True, key="forks_detector_target")
    st.caption("Every recorded token of each step, ranked by each score. Baselines: `position` (the share of targets "
               "at each position, fitted on the same step: the best a position-only rule can do), `random`, `all`.")
    st.plotly_chart(detector_figure(m, target), key="forks_detector_chart", width="stretch")
