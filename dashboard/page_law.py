"""Law: mean reward against mean entropy with the fitted R = −a·exp(H) + b, its ceiling b − a and R², or the
reason no fit is shown (arXiv:2505.22617)."""

from __future__ import annotations

import streamlit as st
from forkwatch.dashboard import cached_queries, law_charts, page_frame


def render() -> None:
    st.title("Entropy–reward law")
    log_dir, runs, shown = page_frame.chosen_runs("law_runs")
    if not shown:
        return
    fraction = st.slider(
        "Fit on the first fraction of steps", 0.05, 1.0, 1.0, 0.05, key="law_fraction",
        help="The paper found the first ~15 % of steps enough to predict the ceiling.",
    )  # fmt: skip
    points = {r: cached_queries.steps(log_dir, r) for r in shown}
    meta = dict(zip(runs["run_id"], runs["meta"], strict=True))
    fits = {r: cached_queries.law(log_dir, r, meta[r], fraction) for r in shown}
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
    st.plotly_chart(law_charts.law_figure(points, fits), key="law_chart", width="stretch")
