"""The Forks page's figures: the token texts that fork most often and their trend, one prompt across steps, the
roles of forking tokens per step, a probe's tokens across steps and the overlap of their top-entropy positions.
Drawing only: every number comes in through the arguments."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from forkwatch.dashboard.charts import COLORS
from forkwatch.store.roles import ROLES
from plotly.subplots import make_subplots

ROLE_COLORS = dict(zip(ROLES, ("#1f77b4", "#d62728", "#ff7f0e", "#7f7f7f", "#bcbd22", "#9467bd"), strict=True))


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
