"""Forks: where the model is still deciding. One completion's tokens coloured by a statistic, gradient tokens
marked, exact values and top-k alternatives on hover; the token texts that fork most often and how that changes
over steps; the same prompt followed across steps; the roles of forking tokens per step; the probes' tokens across
steps and the overlap of their top-entropy positions with the first scoring."""

from __future__ import annotations

import html

import pandas as pd
import streamlit as st
from forkwatch.dashboard import cached_queries, forks_charts, forks_sections, page_frame, url_state
from forkwatch.dashboard.step_sample import sample_steps
from forkwatch.dashboard.token_html import STATS, legend_html, token_html


def _choose_completion(log_dir: str, run: str, steps: list[int]) -> tuple[int, pd.Series] | None:
    """Step and completion, either browsing steps or searching a prompt; both kept in the URL."""
    mode = st.radio("Find a completion by", ["step", "prompt"], horizontal=True, key="forks_mode")
    prompt = None
    if mode == "prompt":
        text = st.text_input("Prompt contains", key="forks_prompt_query", placeholder="a few words of the prompt")
        if not text:
            st.info("Type part of a prompt to find it.")
            return None
        matches = cached_queries.find_prompts(log_dir, run, text)
        if matches.empty:
            st.warning(f"No prompt of run `{run}` contains {text!r}.")
            return None
        prompt = st.selectbox("Prompt", matches["prompt"].tolist(), key="forks_prompt")
        steps = cached_queries.prompt_history(log_dir, run, prompt)["step"].tolist()
    step = url_state.selected_step(steps)
    if len(steps) > 1:
        step = st.select_slider("Step", options=steps, value=step, key=f"forks_step_{run}_{mode}")
    else:
        st.caption(f"step {step} (the only step with records)")
    url_state.set_step(step)
    comps = cached_queries.completions(log_dir, run, step)
    if prompt is not None:
        comps = comps[comps["prompt"] == prompt]
    if comps.empty:
        st.warning(f"No completion recorded at step {step}.")
        return None
    rows = {int(r.completion_id): r for r in comps.itertuples(index=False)}
    ids = list(rows)
    wanted = st.query_params.get("completion")
    index = ids.index(int(wanted)) if wanted is not None and wanted.isdigit() and int(wanted) in ids else 0
    cid = st.selectbox(
        "Completion", ids, index=index, key=f"forks_completion_{run}_{step}",
        format_func=lambda c: f"#{c} · group {rows[c].group_id} · reward {rows[c].reward:.3g} · "
        f"advantage {rows[c].advantage:+.3g} · {str(rows[c].prompt)[:60]!r}",
    )  # fmt: skip
    st.query_params["completion"] = str(cid)
    return step, pd.Series(rows[cid]._asdict())


def _token_view(log_dir: str, run: str, step: int, completion: pd.Series) -> None:
    stat = st.radio("Colour tokens by", STATS, horizontal=True, key="forks_stat")
    tokens = cached_queries.completion_tokens(log_dir, run, step, int(completion["completion_id"]))
    st.markdown(f"**Prompt:** {completion['prompt']!r}")
    if tokens.empty:
        st.warning("No token records for this completion (the run records tokens for a sample of completions).")
        return
    st.html(legend_html(stat, tokens))
    st.html(token_html(tokens, stat))
    _truth_view(log_dir, run, step, int(completion["completion_id"]), tokens)


_TRUTH_STYLE = {  # (is_decision, is_fork) -> background: agreement green, a missed decision red, an extra fork grey
    (True, True): "#a1d99b", (True, False): "#fc9272", (False, True): "#d9d9d9", (False, False): "transparent",
}


def _truth_view(log_dir: str, run: str, step: int, completion_id: int, tokens: pd.DataFrame) -> None:
    """Where the run's task knows its decision points (a `truth` annotation, e.g. the demo's), the completion again
    with each decision point and each fork marked, so the two can be compared token by token."""
    marks = cached_queries.truth_marks(log_dir, run, step, completion_id)
    if marks.empty:
        return
    decision = dict(zip(marks["position"], marks["is_decision"], strict=True))
    spans, n_dec, n_hit = [], 0, 0
    for row in tokens.itertuples(index=False):
        is_dec, is_fork = bool(decision.get(row.position, False)), bool(row.is_fork)
        n_dec, n_hit = n_dec + is_dec, n_hit + (is_dec and is_fork)
        text = html.escape(str(row.text) if isinstance(row.text, str) else f"#{row.token_id}") or "∅"
        border = "border-bottom:2px solid #238b45;" if is_dec else ""
        spans.append(f'<span class="fw-truth" style="background:{_TRUTH_STYLE[is_dec, is_fork]};{border}" '
                     f'title="position {row.position}{" · decision point" if is_dec else ""}'
                     f'{" · fork" if is_fork else ""}">{text}</span>')
    st.markdown(f"**Ground truth:** {n_dec} decision point(s) in this completion (underlined), {n_hit} of them "
                "marked as forks by forkwatch. Green: decision point and fork; red: a decision point forkwatch "
                "missed; grey: a fork where only one token was correct.")
    st.html('<div class="fw-truth-view" style="font-family:monospace;line-height:1.8">' + "".join(spans) + "</div>")


def _fork_tokens(log_dir: str, run: str, steps: list[int]) -> None:
    st.subheader("Tokens that fork most often")
    n = st.slider("How many token texts", 5, 30, 10, key="forks_top_n")
    sample = sample_steps(steps)
    if len(sample) < len(steps):
        st.caption(f"counted over {len(sample)} of the run's {len(steps)} recorded steps, evenly spaced")
    top = cached_queries.top_fork_tokens(log_dir, run, sample, n)
    if top.empty:
        st.info("No fork recorded in this run yet.")
        return
    left, right = st.columns([2, 3])
    with left:
        st.plotly_chart(forks_charts.fork_share_figure(top), key="forks_top_chart", width="stretch")
    with right:
        trend = cached_queries.fork_tokens_by_step(log_dir, run, sample, tuple(top["text"].head(6)))
        st.caption("share of each step's forks taken by the 6 most frequent fork texts")
        st.plotly_chart(forks_charts.fork_trend_figure(trend), key="forks_trend_chart", width="stretch")


def render() -> None:
    st.title("Forks")
    log_dir, runs = page_frame.require_runs()
    [run] = page_frame.pick_runs(runs, key="forks_run", multi=False)
    page_frame.run_notes(runs, [run])
    tsteps = cached_queries.token_steps(log_dir, run)
    if tsteps.empty:
        st.info(f"Run `{run}` has no completion or token records yet: there is nothing to show at token level.")
        return
    steps = tsteps["step"].tolist()
    chosen = _choose_completion(log_dir, run, steps)
    if chosen is not None:
        step, completion = chosen
        _token_view(log_dir, run, step, completion)
        st.subheader("This prompt across steps")
        history = cached_queries.prompt_history(log_dir, run, completion["prompt"])
        st.plotly_chart(forks_charts.prompt_history_figure(history), key="forks_prompt_chart", width="stretch")
    _fork_tokens(log_dir, run, steps)
    from forkwatch.dashboard.detector_chart import detector_section

    detector_section(log_dir, run)  # only where the run's task wrote a ground truth (the demo's)
    forks_sections.fork_roles_section(log_dir, run)
    forks_sections.probes_section(log_dir, runs, run)
