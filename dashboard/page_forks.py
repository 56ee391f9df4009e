"""Forks: where the model is still deciding. One completion's tokens coloured by a statistic, gradient tokens
marked, exact values and top-k alternatives on hover; the token texts that fork most often and how that changes
over steps; the same prompt followed across steps; where the run's task wrote a ground truth (the demo's), its
decision points beside the forks and how well each score ranks them; the roles of forking tokens per step; the
probes' tokens across steps and the overlap of their top-entropy positions with the first scoring; where fork value was
measured (table fork_values), each measured position's value next to its entropy, the scatter of the two, and every
score judged against that truth. Each section says in words why it has nothing to draw instead of drawing empty
axes."""

from __future__ import annotations

import html

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from forkwatch.dashboard import frame
from forkwatch.dashboard.cache import cached
from forkwatch.dashboard.frame import COLORS
from forkwatch.dashboard.token_html import STATS, legend_html, token_html
from forkwatch.store.queries import sample_steps
from forkwatch.store.roles import ROLES
from forkwatch.store.run_meta import parse_meta
from plotly.subplots import make_subplots

TOP_FRACTION = 0.2  # the probe overlap figure's top-entropy share (the 80/20 paper's)
ROLE_COLORS = dict(zip(ROLES, ("#1f77b4", "#d62728", "#ff7f0e", "#7f7f7f", "#bcbd22", "#9467bd"), strict=True))
DETECTOR_COLORS = {"entropy": "#1f77b4", "renyi2": "#9467bd", "group_js": "#d62728", "position": "#7f7f7f",
                   "random": "#bcbd22", "all": "#c7c7c7"}
DETECTOR_TARGETS = {"decision": "consequential decisions",
                    "consequential_or_mistake": "decisions, confident-consequential tokens and mistakes"}


def _choose_completion(log_dir: str, run: str, steps: list[int]) -> tuple[int, pd.Series] | None:
    """Step and completion, either browsing steps or searching a prompt; both kept in the URL."""
    mode = st.radio("Find a completion by", ["step", "prompt"], horizontal=True, key="forks_mode")
    prompt = None
    if mode == "prompt":
        text = st.text_input("Prompt contains", key="forks_prompt_query", placeholder="a few words of the prompt")
        if not text:
            st.info("Type part of a prompt to find it.")
            return None
        matches = cached("find_prompts", log_dir, run, text)
        if matches.empty:
            st.warning(f"No prompt of run `{run}` contains {text!r}.")
            return None
        prompt = st.selectbox("Prompt", matches["prompt"].tolist(), key="forks_prompt")
        steps = cached("prompt_history", log_dir, run, prompt)["step"].tolist()
    step = frame.selected_step(steps)
    if len(steps) > 1:
        step = st.select_slider("Step", options=steps, value=step, key=f"forks_step_{run}_{mode}")
    else:
        st.caption(f"step {step} (the only step with records)")
    frame.set_step(step)
    comps = cached("completions_at_step", log_dir, run, step)
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
    tokens = cached("completion_view", log_dir, run, step, int(completion["completion_id"]))
    st.markdown(f"**Prompt:** {completion['prompt']!r}")
    if tokens.empty:
        st.warning("No token records for this completion (the run records tokens for a sample of completions).")
        return
    st.html(legend_html(stat, tokens))
    st.html(token_html(tokens, stat))
    _truth_view(log_dir, run, step, int(completion["completion_id"]), tokens)
    _value_view(log_dir, run, step, int(completion["completion_id"]), tokens)


_TRUTH_STYLE = {  # (is_decision, is_fork) -> background: agreement green, a missed decision red, an extra fork grey
    (True, True): "#a1d99b", (True, False): "#fc9272", (False, True): "#d9d9d9", (False, False): "transparent",
}


def _truth_view(log_dir: str, run: str, step: int, completion_id: int, tokens: pd.DataFrame) -> None:
    """Where the run's task knows its decision points (a `truth` annotation, e.g. the demo's), the completion again
    with each decision point and each fork marked, so the two can be compared token by token."""
    marks = cached("truth_marks", log_dir, run, step, completion_id)
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


def _value_view(log_dir: str, run: str, step: int, completion_id: int, tokens: pd.DataFrame) -> None:
    """Where fork value was measured in this completion, the completion again with each measured position shaded
    by its value (outlined when consequential), and its numbers beside its entropy."""
    marks = cached("fork_value_marks", log_dir, run, step, completion_id)
    if marks.empty:
        return
    by_position = marks.set_index("position")
    top = max(float(marks["value"].max()), 1e-9)
    spans = []
    for row in tokens.itertuples(index=False):
        text = html.escape(str(row.text) if isinstance(row.text, str) else f"#{row.token_id}") or "∅"
        if row.position not in by_position.index:
            spans.append(f'<span style="color:#888">{text}</span>')
            continue
        m = by_position.loc[row.position]
        alpha = min(1.0, max(0.0, float(m["value"])) / top)
        border = "outline:2px solid #d62728;" if m["consequential"] else ""
        spans.append(
            f'<span class="fw-value" style="background:rgba(214,39,40,{0.15 + 0.6 * alpha:.2f});{border}" '
            f'title="position {row.position} · fork value {m["value"]:.3f} ± {m["value_se"]:.3f} · entropy '
            f'{m["entropy"]:.3f} · Q(sampled) {m["q_sampled"]:.3f} · best: {html.escape(str(m["best_text"]))!r} '
            f'Q {m["best_q"]:.3f}">{text}</span>')
    n_cons = int(marks["consequential"].sum())
    st.markdown(f"**Fork value:** {len(marks)} position(s) of this completion measured, {n_cons} consequential "
                "(outlined: the value is above its floor at one-sided 95 % confidence); the darker, the higher the "
                "value. Grey tokens were not measured.")
    st.html('<div class="fw-value-view" style="font-family:monospace;line-height:1.8">' + "".join(spans) + "</div>")
    texts = tokens.set_index("position")["text"]
    table = marks.assign(token=[texts.get(p, "") for p in marks["position"]])[
        ["position", "token", "entropy", "value", "value_se", "consequential", "q_sampled", "best_text", "best_q"]]
    st.dataframe(table.rename(columns={"value_se": "value SE", "q_sampled": "Q(sampled)", "best_text": "best branch",
                                       "best_q": "Q(best)"}), hide_index=True, key=f"forks_value_table_{step}")


def _fork_tokens(log_dir: str, run: str, steps: list[int]) -> None:
    st.subheader("Tokens that fork most often")
    n = st.slider("How many token texts", 5, 30, 10, key="forks_top_n")
    sample = sample_steps(steps)
    if len(sample) < len(steps):
        st.caption(f"counted over {len(sample)} of the run's {len(steps)} recorded steps, evenly spaced")
    top = cached("top_fork_tokens", log_dir, run, sample, n)
    if top.empty:
        st.info("No fork recorded in this run yet.")
        return
    left, right = st.columns([2, 3])
    with left:
        st.plotly_chart(fork_share_figure(top), key="forks_top_chart", width="stretch")
    with right:
        trend = cached("fork_tokens_by_step", log_dir, run, sample, tuple(top["text"].head(6)))
        st.caption("share of each step's forks taken by the 6 most frequent fork texts")
        st.plotly_chart(fork_trend_figure(trend), key="forks_trend_chart", width="stretch")


def render() -> None:
    st.title("Forks")
    log_dir, runs = frame.require_runs()
    [run] = frame.pick_runs(runs, key="forks_run", multi=False)
    frame.run_notes(runs, [run])
    tsteps = cached("token_steps", log_dir, run)
    if tsteps.empty:
        st.info(f"Run `{run}` has no completion or token records yet: there is nothing to show at token level.")
        return
    steps = tsteps["step"].tolist()
    chosen = _choose_completion(log_dir, run, steps)
    if chosen is not None:
        step, completion = chosen
        _token_view(log_dir, run, step, completion)
        st.subheader("This prompt across steps")
        history = cached("prompt_history", log_dir, run, completion["prompt"])
        st.plotly_chart(prompt_history_figure(history), key="forks_prompt_chart", width="stretch")
    _fork_tokens(log_dir, run, steps)
    detector_section(log_dir, run)  # only where the run's task wrote a ground truth (the demo's)
    fork_value_section(log_dir, run)
    fork_roles_section(log_dir, run)
    probes_section(log_dir, runs, run)


def detector_section(log_dir: str, run: str) -> None:
    """Per step, how well entropy, Rényi-2 and group-JS rank the tokens that matter (AUROC, average precision,
    precision among the run's fork share against its ceiling), next to the baselines (store/ground_truth.py). Shown
    only for runs whose task wrote a ground truth (the demo's)."""
    m = cached("detector_by_step", log_dir, run)
    if m.empty:
        return
    st.subheader("Fork detection against the ground truth")
    target = st.radio("Target", list(DETECTOR_TARGETS), format_func=DETECTOR_TARGETS.get, horizontal=True,
                      key="forks_detector_target")
    st.caption("Every recorded token of each step, ranked by each score. Baselines: `position` (the share of targets "
               "at each position, fitted on the same step: the best a position-only rule can do), `random`, `all`. "
               "Precision is measured among the run's `fork_fraction` of tokens, the share forkwatch marks as forks.")
    st.plotly_chart(detector_figure(m, target), key="forks_detector_chart", width="stretch")


def fork_value_section(log_dir: str, run: str) -> None:
    """Where fork value was measured: entropy against fork value per step, and every score judged against it."""
    st.subheader("Fork value: which forks changed the outcome")
    steps = cached("fork_value_steps", log_dir, run)
    if steps.empty:
        st.info(f"Run `{run}` has no fork value measured: measure it during training (`fork_value_every`) or after "
                f"it (`forkwatch forkvalue LOG_DIR/{run} --model CHECKPOINT --reward module:function`).")
        return
    points = cached("fork_value_scatter", log_dir, run)
    options = steps["step"].tolist()
    step = options[-1] if len(options) == 1 else st.select_slider("Measured step", options=options,
                                                                   value=options[-1], key=f"forks_value_step_{run}")
    row = steps.set_index("step").loc[step]
    st.caption(f"step {step}: {int(row['positions'])} positions measured (a stratified sample of the step's "
               f"recorded tokens), {int(row['consequential'])} consequential; measured with {row['sources']}. "
               "Fork value = Σ π |Q − V| over the branches, in reward units; bars are ± 1 SE.")
    st.plotly_chart(value_scatter_figure(points[points["step"] == step]), key="forks_value_scatter",
                    width="stretch")
    table = cached("fork_value_detectors", log_dir, run)
    table = table[table["step"] == step]
    if table.empty:
        st.info("No score can be judged at this step (no recorded scores at the measured positions).")
        return
    st.caption("Each score against this truth, for every recorded token of the step (the sample weighted by its "
               "inclusion probabilities): AUROC and average precision for \"consequential\", Spearman's ρ with "
               "the value. `position`: the share of consequential positions at each position, fitted on the same "
               "sample (an upper bound for position-only rules); `lexical`: position 0 or right after a separator.")
    st.dataframe(table[["predictor", "auroc", "average_precision", "spearman", "consequential_share", "positions"]],
                 hide_index=True, key="forks_value_detectors")


def fork_roles_section(log_dir: str, run: str) -> None:
    st.subheader("Roles of forking tokens")
    roles = cached("fork_roles_by_step", log_dir, run)
    if roles.empty:
        st.info(f"Run `{run}` has no fork recorded: fork roles need per-token records (record_tokens=True, "
                "fork_fraction > 0).")
        return
    st.caption("Share of each step's forks by functional role of the token (number, operator, connective and "
               "meta-discourse, grammar, formatting, other): which roles keep their forks as training goes on.")
    st.plotly_chart(fork_roles_figure(roles), key="forks_roles_chart", width="stretch")


def probes_section(log_dir: str, runs: pd.DataFrame, run: str) -> None:
    st.subheader("Probes: the same tokens across training")
    probes = cached("probe_list", log_dir, run)
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
    tokens = cached("probe_tokens", log_dir, run, int(pid))
    st.plotly_chart(probe_heatmap_figure(tokens, stat), key="forks_probe_chart", width="stretch")
    note = cached("lens_schedule", log_dir, run).get("probes")  # the steps scored and skipped (the lens budget)
    if note:
        st.caption(note)
    overlap = cached("probe_top_overlap", log_dir, run, TOP_FRACTION)
    if len(overlap) < 2:
        st.info("The overlap of top-entropy positions needs two scorings of the probes; one so far.")
        return
    last = overlap.iloc[-1]
    st.caption(f"Top {TOP_FRACTION:.0%} entropy positions of all probes shared with their first scoring: "
               f"{last['overlap']:.0%} at step {int(last['step'])} (the 80/20 paper reports 86 % before vs after RLVR).")
    st.plotly_chart(probe_overlap_figure(overlap, TOP_FRACTION), key="forks_overlap_chart",
                    width="stretch")


# --- the figures: drawing only, every number comes in through the arguments ---


def fork_share_figure(top: pd.DataFrame) -> go.Figure:
    fig = go.Figure(
        go.Bar(
            x=top["share"], y=[repr(t) for t in top["text"]], orientation="h", customdata=top["n_forks"],
            hovertemplate="%{y}: %{x:.1%} of forks (%{customdata} forks)<extra></extra>",
        )
    )  # fmt: skip
    fig.update_layout(
        height=max(240, 22 * len(top)), yaxis={"autorange": "reversed"}, xaxis={"tickformat": ".0%"},
        xaxis_title="share of the run's forks", margin={"t": 10, "b": 40, "l": 10, "r": 10},
    )  # fmt: skip
    return fig


def fork_trend_figure(by_step: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for i, (text, df) in enumerate(by_step.groupby("text", sort=False)):
        fig.add_trace(
            go.Scatter(
                x=df["step"], y=df["share"], mode="lines+markers", name=repr(text),
                line={"color": COLORS[i % len(COLORS)]}, customdata=df["n_forks"],
                hovertemplate=f"{text!r}<br>step %{{x}}: %{{y:.1%}} of forks (%{{customdata}})<extra></extra>",
            )
        )  # fmt: skip
    fig.update_layout(
        height=320, yaxis={"tickformat": ".0%"}, xaxis_title="step", yaxis_title="share of the step's forks",
        margin={"t": 10, "b": 40, "l": 50, "r": 10},
    )  # fmt: skip
    return fig


def prompt_history_figure(history: pd.DataFrame) -> go.Figure:
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("reward (mean over the prompt's completions)", "entropy (mean)"))  # fmt: skip
    fig.add_trace(go.Scatter(x=history["step"], y=history["reward_mean"], mode="lines+markers", name="reward"), 1, 1)
    fig.add_trace(go.Scatter(x=history["step"], y=history["entropy_mean"], mode="lines+markers", name="entropy"), 2, 1)
    fig.update_layout(height=380, showlegend=False, margin={"t": 30, "b": 30, "l": 50, "r": 10})
    fig.update_xaxes(title_text="step", row=2, col=1)
    return fig


def fork_roles_figure(roles: pd.DataFrame) -> go.Figure:
    """Share of each step's forks by functional role, stacked to 100 %."""
    fig = go.Figure()
    steps = sorted(roles["step"].unique())
    for role in ROLES:
        df = roles[roles["role"] == role].set_index("step").reindex(steps)
        if df["n_forks"].isna().all():
            continue
        fig.add_trace(
            go.Scatter(
                x=steps, y=df["share"].fillna(0.0), name=role, mode="lines", stackgroup="roles",
                line={"color": ROLE_COLORS[role], "width": 0.5}, customdata=df["n_forks"].fillna(0),
                hovertemplate=f"{role}<br>step %{{x}}: %{{y:.1%}} of forks (%{{customdata:.0f}})<extra></extra>",
            )
        )  # fmt: skip
    fig.update_layout(
        height=320, yaxis={"tickformat": ".0%", "range": [0, 1]}, xaxis_title="step", yaxis_title="share of forks",
        margin={"t": 10, "b": 40, "l": 50, "r": 10},
    )  # fmt: skip
    return fig


def probe_heatmap_figure(tokens: pd.DataFrame, stat: str = "entropy") -> go.Figure:
    """One probe: token (x, in order, labelled by its text) × step (y), colour = the token's `stat` at that step."""
    grid = tokens.pivot(index="step", columns="position", values=stat)  # (steps, T)
    texts = tokens.drop_duplicates("position").set_index("position")["text"].reindex(grid.columns)
    labels = [f"{p}:{t!r}" for p, t in zip(grid.columns, texts, strict=True)]
    fig = go.Figure(
        go.Heatmap(
            x=labels, y=grid.index.to_numpy(), z=grid.to_numpy(dtype=float), colorscale="Magma", reversescale=True,
            colorbar={"title": stat}, hovertemplate="token %{x}<br>step %{y}<br>" + stat + " %{z:.4g}<extra></extra>",
        )
    )  # fmt: skip
    fig.update_layout(
        height=max(260, 22 * len(grid.index) + 120), xaxis={"tickangle": -60, "type": "category"},
        yaxis={"title": "step", "type": "category"}, margin={"t": 10, "b": 100, "l": 50, "r": 10},
    )  # fmt: skip
    return fig


def probe_overlap_figure(overlap: pd.DataFrame, fraction: float) -> go.Figure:
    """Share of each step's top-entropy probe positions that were top positions at the first scoring."""
    fig = go.Figure(
        go.Scatter(
            x=overlap["step"], y=overlap["overlap"], mode="lines+markers", customdata=overlap["n_top"],
            hovertemplate="step %{x}: %{y:.0%} of %{customdata} top positions shared<extra></extra>",
        )
    )  # fmt: skip
    fig.update_layout(
        height=280, yaxis={"tickformat": ".0%", "range": [0, 1.05]}, xaxis_title="step",
        yaxis_title=f"top {fraction:.0%} shared with first", margin={"t": 10, "b": 40, "l": 60, "r": 10},
    )  # fmt: skip
    return fig


def value_scatter_figure(points: pd.DataFrame) -> go.Figure:
    """Entropy (x) against fork value (y) at each measured position, consequential ones in red, ± 1 SE bars."""
    fig = go.Figure()
    for consequential, g in points.groupby("consequential", sort=True):
        fig.add_trace(go.Scatter(
            x=g["entropy"], y=g["value"], mode="markers", name="consequential" if consequential else "not",
            error_y={"type": "data", "array": g["value_se"], "thickness": 0.6, "width": 0},
            marker={"color": "#d62728" if consequential else "#1f77b4", "size": 6},
            customdata=g[["completion_id", "position"]].to_numpy(),
            hovertemplate="completion %{customdata[0]} · position %{customdata[1]}<br>entropy %{x:.3f}<br>"
                          "fork value %{y:.3f}<extra></extra>"))
    fig.update_layout(height=340, xaxis_title="entropy (nats)", yaxis_title="fork value (reward units)",
                      margin={"t": 10, "b": 40, "l": 60, "r": 10})
    return fig


def detector_figure(m: pd.DataFrame, target: str) -> go.Figure:
    """AUROC, average precision and precision among the top `rate` of tokens (with the ceiling, dashed) per step, one
    line per predictor."""
    m = m[m["target"] == target]
    top = f"the top {m['rate'].iloc[0]:.0%}" if not m.empty else "the flagged tokens"
    fig = make_subplots(rows=1, cols=3, subplot_titles=("AUROC", "average precision", f"precision of {top}"))
    for col, metric in enumerate(("auroc", "average_precision", "precision"), start=1):
        for name, g in m.groupby("predictor", sort=False):
            if metric == "auroc" and name == "all":
                continue  # a constant score: 0.5 by definition
            fig.add_trace(go.Scatter(x=g["step"], y=g[metric], mode="lines", name=name, legendgroup=name,
                                     showlegend=col == 1, line={"color": DETECTOR_COLORS.get(name)}), row=1, col=col)
        if metric == "precision" and not m.empty:
            c = m[m["predictor"] == m["predictor"].iloc[0]]
            fig.add_trace(go.Scatter(x=c["step"], y=c["ceiling"], mode="lines", name="ceiling",
                                     line={"color": "black", "dash": "dash"}), row=1, col=col)
    fig.update_xaxes(title_text="step")
    fig.update_layout(height=320, margin={"t": 40, "b": 40, "l": 40, "r": 10})
    return fig
