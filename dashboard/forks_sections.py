"""The Forks page's sections about the collapse lenses: the roles of forking tokens per step and the probes (the
same tokens scored across training). Each says in words why it has nothing to draw instead of drawing empty axes."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from forkwatch.dashboard import cached_queries, forks_charts
from forkwatch.store.run_meta import parse_meta

TOP_FRACTION = 0.2  # the overlap figure's top-entropy share (the 80/20 paper's)


def fork_roles_section(log_dir: str, run: str) -> None:
    st.subheader("Roles of forking tokens")
    roles = cached_queries.fork_roles_by_step(log_dir, run)
    if roles.empty:
        st.info(f"Run `{run}` has no fork recorded: fork roles need per-token records (record_tokens=True, "
                "fork_fraction > 0).")
        return
    st.caption("Share of each step's forks by functional role of the token (number, operator, connective and "
               "meta-discourse, grammar, formatting, other): which roles keep their forks as training goes on.")
    st.plotly_chart(forks_charts.fork_roles_figure(roles), key="forks_roles_chart", width="stretch")


def probes_section(log_dir: str, runs: pd.DataFrame, run: str) -> None:
    st.subheader("Probes: the same tokens across training")
    probes = cached_queries.probe_list(log_dir, run)
    if probes.empty:
        st.info(f"Run `{run}` has no probe scores: probes are scored every `probe_every` steps (0 turns them "
                "off), from the probes given to `attach(..., probes=[(prompt, completion), ...])` or the first "
                "recorded completions.")
        return
    texts = {p.get("probe_id"): p for p in parse_meta(runs.set_index("run_id").loc[run, "meta"]).get("probes", [])}

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
    st.plotly_chart(forks_charts.probe_heatmap_figure(tokens, stat), key="forks_probe_chart", width="stretch")
    overlap = cached_queries.probe_top_overlap(log_dir, run, TOP_FRACTION)
    if len(overlap) < 2:
        st.info("The overlap of top-entropy positions needs two scorings of the probes; one so far.")
        return
    last = overlap.iloc[-1]
    st.caption(f"Top {TOP_FRACTION:.0%} entropy positions of all probes shared with their first scoring: "
               f"{last['overlap']:.0%} at step {int(last['step'])} (the 80/20 paper reports 86 % before vs after RLVR).")
    st.plotly_chart(forks_charts.probe_overlap_figure(overlap, TOP_FRACTION), key="forks_overlap_chart",
                    width="stretch")
