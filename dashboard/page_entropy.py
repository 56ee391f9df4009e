"""Entropy: mean entropy with its p10–p90 band, Rényi-2 and group JS, the selection's gradient share, reward and
completion length aligned below, the steps where a health rule fired marked with their severity and evidence, and
gaps (with their reason) where a diagnostic is undefined; several runs overlaid. Below: the entropy spectrum
(step × entropy bin) and the hidden states' effective rank beside entropy."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from forkwatch.dashboard import cached_queries, entropy_charts, page_frame
from forkwatch.dashboard.charts import undefined_note
from forkwatch.store.run_meta import parse_meta


def render() -> None:
    st.title("Entropy")
    log_dir, runs, shown = page_frame.chosen_runs("entropy_runs")
    if not shown:
        return
    meta = dict(zip(runs["run_id"], runs["meta"], strict=True))
    series = {r: cached_queries.steps(log_dir, r) for r in shown}
    reports = {r: cached_queries.health(log_dir, r, meta[r]) for r in shown}
    st.plotly_chart(
        entropy_charts.entropy_figure(series, {r: rep.flags for r, rep in reports.items()}), key="entropy_chart",
        width="stretch",
    )  # fmt: skip
    group_js_note(series)
    note = undefined_note(series, ["select_grad_share", "reward_mean"])
    if note:
        st.caption(note)
    flags = [
        {"run": r, "severity": f.severity, "rule": f.rule, "fired at step": f.fired_at,
         "steps": f"{f.steps[0]}–{f.steps[-1]}", "threshold": f.threshold, "message": f.message,
         "evidence": "; ".join(f.evidence)}
        for r, rep in reports.items() for f in rep.flags
    ]  # fmt: skip
    if flags:
        st.subheader("Health flags")
        st.caption("An alarm is an entropy signal with evidence of harm (it fails `forkwatch check` and stops "
                   "training under on_alarm=\"stop\"); a warning is the signal alone.")
        st.dataframe(pd.DataFrame(flags), hide_index=True, width="stretch", key="entropy_flags")
    else:
        st.success("No health rule fired on " + ", ".join(f"`{r}`" for r in shown) + ".")
    for r in shown:
        st.caption(f"`{r}`: {reports[r].notes[0]}")
    spectrum_section(log_dir, runs, shown)
    effective_rank_section(log_dir, runs, shown)


def spectrum_section(log_dir: str, runs: pd.DataFrame, shown: list[str]) -> None:
    st.subheader("Entropy spectrum")
    st.caption("Share of each step's response tokens per entropy bin (log-spaced, nats; log colour scale): the "
               "high-entropy tail draining is collapse at token level.")
    meta = dict(zip(runs["run_id"], runs["meta"], strict=True))
    for r in shown:
        spectrum = cached_queries.entropy_spectrum(log_dir, r)
        if spectrum.empty:
            st.info(f"Run `{r}`: no entropy spectrum recorded (runs written by a forkwatch without "
                    "`steps.entropy_spectrum` have none).")
            continue
        if len(shown) > 1:
            st.markdown(f"**{r}**")
        st.plotly_chart(entropy_charts.spectrum_figure(spectrum, parse_meta(meta[r]).get("vocab_size")),
                        key=f"entropy_spectrum_{r}", width="stretch")


def effective_rank_section(log_dir: str, runs: pd.DataFrame, shown: list[str]) -> None:
    st.subheader("Effective rank of hidden states")
    series = {r: cached_queries.effective_rank_series(log_dir, r) for r in shown}
    missing = [r for r, df in series.items() if df.empty]
    drawn = {r: df for r, df in series.items() if not df.empty}
    if drawn:
        st.caption("Mean effective rank of recorded completions' final-layer hidden states (arXiv:2509.23808), "
                   "beside mean token entropy: exploration seen without going through the token distribution.")
        st.plotly_chart(entropy_charts.effective_rank_figure(drawn), key="entropy_rank_chart", width="stretch")
    for r in missing:
        every = parse_meta(runs.set_index("run_id").loc[r, "meta"]).get("config", {}).get("effective_rank_every")
        why = ("it was turned off (effective_rank_every=0)" if every == 0 else
               f"none measured yet (every {every} steps)" if every else "the run was written without it")
        st.info(f"Run `{r}`: no effective rank to draw: {why}.")


def group_js_note(series: dict[str, pd.DataFrame]) -> None:
    """Say which runs have no group JS, and why (their group-JS panel is left out of the chart)."""
    missing = [r for r, df in series.items() if "group_js_mean" not in df or df["group_js_mean"].isna().all()]
    if missing:
        st.caption("group JS not recorded for " + ", ".join(f"`{r}`" for r in missing) + ": it is computed when "
                   "`group_js=True` or when a selector needs it (e.g. `select='ict'`).")
