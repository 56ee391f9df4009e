"""Law: mean reward against mean entropy with the fitted R = −a·exp(H) + b, its ceiling b − a and R², or the
reason no fit is shown (arXiv:2505.22617)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from forkwatch.dashboard import frame
from forkwatch.dashboard.cache import cached
from forkwatch.dashboard.frame import COLORS
from forkwatch.store.law import LawFit


def render() -> None:
    st.title("Entropy–reward law")
    log_dir, runs, shown = frame.chosen_runs("law_runs")
    if not shown:
        return
    fraction = st.slider(
        "Fit on the first fraction of steps", 0.05, 1.0, 1.0, 0.05, key="law_fraction",
        help="The paper found the first ~15 % of steps enough to predict the ceiling.",
    )  # fmt: skip
    points = {r: cached("step_series", log_dir, r) for r in shown}
    meta = dict(zip(runs["run_id"], runs["meta"], strict=True))
    fits = {r: cached("law_fit", log_dir, r, meta[r], fraction) for r in shown}
    cols = st.columns(len(shown))
    for col, r in zip(cols, shown, strict=True):
        fit = fits[r]
        with col:
            st.markdown(f"**{r}**")
            if fit.ok:
                st.metric("ceiling b − a", f"{fit.ceiling:.4g}")
                st.caption(fit.describe())
            else:
                st.warning(f"No fit shown: {fit.describe()}.")
    st.plotly_chart(law_figure(points, fits), key="law_chart", width="stretch")


# --- the figure: drawing only, every number comes in through the arguments ---


def law_figure(points: dict[str, pd.DataFrame], fits: dict[str, LawFit]) -> go.Figure:
    """Mean reward against mean entropy per step, and where the law was fitted its curve R = −a·exp(H) + b drawn
    down to H = 0, where it meets its ceiling b − a."""
    fig = go.Figure()
    for i, (run_id, df) in enumerate(points.items()):
        c = COLORS[i % len(COLORS)]
        fig.add_trace(
            go.Scatter(
                x=df["entropy_mean"], y=df["reward_mean"], mode="markers", name=f"{run_id} steps",
                marker={"color": c, "size": 6, "opacity": 0.75}, customdata=df["step"],
                hovertemplate="step %{customdata}<br>entropy %{x:.4g}<br>reward %{y:.4g}<extra>" + run_id + "</extra>",
            )
        )  # fmt: skip
        fit = fits.get(run_id)
        if fit is not None and fit.ok:
            h_max = float(np.nanmax(df["entropy_mean"].to_numpy(dtype=float)))
            h = np.linspace(0.0, h_max, 100)
            fig.add_trace(
                go.Scatter(
                    x=h, y=fit.predict(h), mode="lines", line={"color": c},
                    name=f"{run_id} fit: R = −{fit.a:.3g}·exp(H) + {fit.b:.3g}  (R² {fit.r2:.3f})",
                )
            )  # fmt: skip
            fig.add_hline(
                y=fit.ceiling, line={"color": c, "dash": "dot"}, annotation_text=f"ceiling {fit.ceiling:.3g}"
            )
    fig.update_layout(
        height=520, xaxis_title="mean entropy H (nats)", yaxis_title="mean reward R",
        margin={"t": 30, "b": 40, "l": 50, "r": 20},
    )  # fmt: skip
    return fig
