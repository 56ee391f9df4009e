"""The collapse-lens sections the pages draw: the entropy spectrum and the effective rank (Entropy page), the roles of
forking tokens and the probes across training (Forks page), a picture per run (Runs page). Each section says in
words why it has nothing to draw instead of drawing empty axes."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st
from forkwatch.dashboard import cached_queries, lens_charts
from forkwatch.store.health import HealthReport

TOP_FRACTION = 0.2  # the overlap figure's top-entropy share (the 80/20 paper's)
MAX_PICTURES = 12  # runs drawn as small multiples on the Runs page


def _meta(raw: str | None) -> dict:
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {}


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
        st.plotly_chart(lens_charts.spectrum_figure(spectrum, _meta(meta[r]).get("vocab_size")),
                        key=f"entropy_spectrum_{r}", width="stretch")


def effective_rank_section(log_dir: str, runs: pd.DataFrame, shown: list[str]) -> None:
    st.subheader("Effective rank of hidden states")
    series = {r: cached_queries.effective_rank_series(log_dir, r) for r in shown}
    missing = [r for r, df in series.items() if df.empty]
    drawn = {r: df for r, df in series.items() if not df.empty}
    if drawn:
        st.caption("Mean effective rank of recorded completions' final-layer hidden states (arXiv:2509.23808), "
                   "beside mean token entropy: exploration seen without going through the token distribution.")
        st.plotly_chart(lens_charts.effective_rank_figure(drawn), key="entropy_rank_chart", width="stretch")
    for r in missing:
        every = _meta(runs.set_index("run_id").loc[r, "meta"]).get("config", {}).get("effective_rank_every")
        why = ("it was turned off (effective_rank_every=0)" if every == 0 else
               f"none measured yet (every {every} steps)" if every else "the run was written without it")
        st.info(f"Run `{r}`: no effective rank to draw: {why}.")


def group_js_note(series: dict[str, pd.DataFrame]) -> None:
    """Say which runs have no group JS, and why (their group-JS panel is left out of the chart)."""
    missing = [r for r, df in series.items() if "group_js_mean" not in df or df["group_js_mean"].isna().all()]
    if missing:
        st.caption("group JS not recorded for " + ", ".join(f"`{r}`" for r in missing) + ": it is computed when "
                   "`group_js=True` or when a selector needs it (e.g. `select='ict'`).")


def fork_roles_section(log_dir: str, run: str) -> None:
    st.subheader("Roles of forking tokens")
    roles = cached_queries.fork_roles_by_step(log_dir, run)
    if roles.empty:
        st.info(f"Run `{run}` has no fork recorded: fork roles need per-token records (record_tokens=True, "
                "fork_fraction > 0).")
        return
    st.caption("Share of each step's forks by functional role of the token (number, operator, connective and "
               "meta-discourse, grammar, formatting, other): which roles keep their forks as training goes on.")
    st.plotly_chart(lens_charts.fork_roles_figure(roles), key="forks_roles_chart", width="stretch")


def probes_section(log_dir: str, runs: pd.DataFrame, run: str) -> None:
    st.subheader("Probes: the same tokens across training")
    probes = cached_queries.probe_list(log_dir, run)
    if probes.empty:
        st.info(f"Run `{run}` has no probe scores: probes are scored every `probe_every` steps (0 turns them "
                "off), from the probes given to `attach(..., probes=[(prompt, completion), ...])` or the first "
                "recorded completions.")
        return
    texts = {p.get("probe_id"): p for p in _meta(runs.set_index("run_id").loc[run, "meta"]).get("probes", [])}

    sizes = dict(zip(probes["probe_id"], probes["n_tokens"], strict=True))

    def label(pid: int) -> str:
        p = texts.get(pid)
        if not p or "completion" not in p:
            return f"#{pid} ({sizes[pid]} tokens)"
        return f"#{pid}: {str(p.get('prompt', ''))[-40:]!r} → {str(p['completion'])[:40]!r}"

    left, right = st.columns([3, 1])
    with left:
        pid = st.selectbox("Probe", probes["probe_id"].tolist(), key=f"forks_probe_{run}", format_func=label)
    with right:
        stat = st.radio("Colour by", ["entropy", "renyi2", "logprob"], horizontal=True, key="forks_probe_stat")
    tokens = cached_queries.probe_tokens(log_dir, run, int(pid))
    st.plotly_chart(lens_charts.probe_heatmap_figure(tokens, stat), key="forks_probe_chart", width="stretch")
    overlap = cached_queries.probe_top_overlap(log_dir, run, TOP_FRACTION)
    if len(overlap) < 2:
        st.info("The overlap of top-entropy positions needs two scorings of the probes; one so far.")
        return
    last = overlap.iloc[-1]
    st.caption(f"Top {TOP_FRACTION:.0%} entropy positions of all probes shared with their first scoring: "
               f"{last['overlap']:.0%} at step {int(last['step'])} (the 80/20 paper reports 86 % before vs after RLVR).")
    st.plotly_chart(lens_charts.probe_overlap_figure(overlap, TOP_FRACTION), key="forks_overlap_chart",
                    width="stretch")


def curve_columns(log_dir: str, run_ids: list[str]) -> tuple[list[list[float]], list[list[float]]]:
    """Each run's entropy and reward curve as lists, for the Runs table's sparklines."""
    curves = cached_queries.run_curves(log_dir)
    by_run = {r: df for r, df in curves.groupby("run_id")}
    empty = pd.DataFrame({"entropy_mean": [], "reward_mean": []})
    ent = [by_run.get(r, empty)["entropy_mean"].fillna(float("nan")).tolist() for r in run_ids]
    rew = [by_run.get(r, empty)["reward_mean"].fillna(float("nan")).tolist() for r in run_ids]
    return ent, rew


def run_pictures(log_dir: str, run_ids: list[str], reports: dict[str, HealthReport]) -> None:
    st.subheader("Each run at a glance")
    curves = cached_queries.run_curves(log_dir)
    drawn = [r for r in run_ids if r in set(curves["run_id"])][:MAX_PICTURES]
    if not drawn:
        st.info("No run has steps yet: the pictures appear with the first steps.")
        return
    if len(drawn) < len(run_ids):
        st.caption(f"{len(drawn)} of {len(run_ids)} runs drawn (the ones with steps, at most {MAX_PICTURES}).")
    st.caption("Mean entropy (left) and mean reward (right) per step; × marks where a health rule fired.")
    fig = lens_charts.run_pictures_figure(curves, {r: reports[r].flags for r in drawn}, drawn)
    st.plotly_chart(fig, key="runs_pictures", width="stretch")
