"""Entropy: mean entropy with its p10–p90 band, Rényi-2 and group JS, reward and completion length aligned below,
the steps where a health rule fired marked with their evidence; several runs overlaid. Below: the entropy spectrum
(step × entropy bin) and the hidden states' effective rank beside entropy."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from forkwatch.dashboard import cached_queries, charts, lens_views, page_frame


def render() -> None:
    st.title("Entropy")
    log_dir, runs, shown = page_frame.chosen_runs("entropy_runs")
    if not shown:
        return
    meta = dict(zip(runs["run_id"], runs["meta"], strict=True))
    series = {r: cached_queries.steps(log_dir, r) for r in shown}
    reports = {r: cached_queries.health(log_dir, r, meta[r]) for r in shown}
    st.plotly_chart(
        charts.entropy_figure(series, {r: rep.flags for r, rep in reports.items()}), key="entropy_chart",
        width="stretch",
    )  # fmt: skip
    lens_views.group_js_note(series)
    flags = [
        {"run": r, "rule": f.rule, "fired at step": f.fired_at, "steps": f"{f.steps[0]}–{f.steps[-1]}",
         "threshold": f.threshold, "message": f.message}
        for r, rep in reports.items() for f in rep.flags
    ]  # fmt: skip
    if flags:
        st.subheader("Health flags")
        st.dataframe(pd.DataFrame(flags), hide_index=True, width="stretch", key="entropy_flags")
    else:
        st.success("No health rule fired on " + ", ".join(f"`{r}`" for r in shown) + ".")
    lens_views.spectrum_section(log_dir, runs, shown)
    lens_views.effective_rank_section(log_dir, runs, shown)
