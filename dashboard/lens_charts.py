"""Plotly figures of the collapse lenses: the entropy spectrum, the hidden states' effective rank beside entropy, the
roles of forking tokens, a probe's tokens across steps and the overlap of their top-entropy positions, and one small
picture per run. Drawing only: every number comes in through the arguments (named queries of store/queries.py)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from forkwatch.dashboard.charts import COLORS, FLAG_COLORS
from forkwatch.store.health import Flag
from forkwatch.store.roles import ROLES
from forkwatch.store.spectrum import bin_label, bins_below
from plotly.subplots import make_subplots

ROLE_COLORS = dict(zip(ROLES, ("#1f77b4", "#d62728", "#ff7f0e", "#7f7f7f", "#bcbd22", "#9467bd"), strict=True))


def spectrum_figure(spectrum: pd.DataFrame, vocab_size: int | None) -> go.Figure:
    """Heat map step × entropy bin, colour = share of the step's tokens (log colour scale, so the thin high-entropy
    tail stays visible next to the confident bulk); bins above log V, empty by construction, are left out."""
    n_bins = bins_below(vocab_size)
    df = spectrum[spectrum["bin"] < n_bins]
    grid = df.pivot(index="bin", columns="step", values="share").reindex(range(n_bins))  # (bins, steps)
    share = grid.to_numpy(dtype=float)
    with np.errstate(divide="ignore"):
        z = np.where(share > 0, np.log10(np.where(share > 0, share, 1.0)), np.nan)
    labels = [bin_label(j) for j in range(n_bins)]
    fig = go.Figure(
        go.Heatmap(
            x=grid.columns.to_numpy(), y=labels, z=z, customdata=share, colorscale="Viridis", zmin=-4, zmax=0,
            colorbar={"title": "share", "tickvals": [-4, -3, -2, -1, 0], "ticktext": ["0.01%", "0.1%", "1%", "10%",
                                                                                      "100%"]},
            hovertemplate="step %{x}<br>entropy %{y} nats<br>%{customdata:.2%} of tokens<extra></extra>",
        )
    )  # fmt: skip
    fig.update_layout(
        height=420, xaxis_title="step", yaxis_title="token entropy (nats), log-spaced bins",
        margin={"t": 10, "b": 40, "l": 90, "r": 10},
    )  # fmt: skip
    return fig


def effective_rank_figure(series: dict[str, pd.DataFrame]) -> go.Figure:
    """Mean token entropy (left axis) and the hidden states' mean effective rank (right axis, markers where it was
    measured) per run: the two views of exploration side by side."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for i, (run_id, df) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        fig.add_trace(go.Scatter(x=df["step"], y=df["entropy_mean"], mode="lines", name=f"{run_id} entropy",
                                 line={"color": c}), secondary_y=False)
        fig.add_trace(go.Scatter(x=df["step"], y=df["effective_rank_mean"], mode="lines+markers",
                                 name=f"{run_id} effective rank", line={"color": c, "dash": "dot"},
                                 marker={"symbol": "diamond"}), secondary_y=True)  # fmt: skip
    fig.update_layout(height=340, margin={"t": 10, "b": 40, "l": 50, "r": 50}, xaxis_title="step")
    fig.update_yaxes(title_text="mean token entropy (nats)", secondary_y=False)
    fig.update_yaxes(title_text="effective rank of hidden states", secondary_y=True)
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


def run_pictures_figure(curves: pd.DataFrame, flags: dict[str, list[Flag]], runs: list[str]) -> go.Figure:
    """Small multiples, one row per run: mean entropy (left) and mean reward (right), health flags marked where
    they fired (× on the entropy curve, in the flag's colour)."""
    fig = make_subplots(rows=len(runs), cols=2, shared_xaxes=False, vertical_spacing=min(0.3 / max(len(runs), 1), 0.08),
                        horizontal_spacing=0.08,
                        subplot_titles=[t for r in runs for t in (f"{r}: entropy", f"{r}: reward")])  # fmt: skip
    for i, run_id in enumerate(runs, start=1):
        df = curves[curves["run_id"] == run_id]
        fig.add_trace(go.Scatter(x=df["step"], y=df["entropy_mean"], mode="lines", line={"color": COLORS[0]},
                                 showlegend=False, name="entropy"), row=i, col=1)
        fig.add_trace(go.Scatter(x=df["step"], y=df["reward_mean"], mode="lines", line={"color": COLORS[2]},
                                 showlegend=False, name="reward"), row=i, col=2)
        at = df.set_index("step")["entropy_mean"]
        marks = list(flags.get(run_id, []))
        if marks:
            fig.add_trace(
                go.Scatter(
                    x=[f.fired_at for f in marks], y=[_nearest(at, f.fired_at) for f in marks], mode="markers",
                    marker={"symbol": "x", "size": 11, "color": [FLAG_COLORS.get(f.kind, "#333") for f in marks]},
                    text=[f"{f.rule} at step {f.fired_at}" for f in marks], hoverinfo="text", showlegend=False,
                    name="flags",
                ),
                row=i, col=1,
            )  # fmt: skip
    fig.update_layout(height=150 * len(runs) + 60, margin={"t": 30, "b": 20, "l": 40, "r": 10})
    return fig


def _nearest(series: pd.Series, step: int) -> float:
    """The value at `step`, or at the nearest step drawn (the curves are subsampled on long runs)."""
    if series.empty:
        return math.nan
    idx = series.index.to_numpy()
    return float(series.iloc[int(np.abs(idx - step).argmin())])
