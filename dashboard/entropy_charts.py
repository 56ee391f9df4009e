"""The Entropy page's figures: mean entropy with its band, Rényi-2, group JS, the selection's gradient share,
reward and length aligned below with the health flags marked; the entropy spectrum; the hidden states' effective
rank beside entropy. Drawing only: every number comes in through the arguments."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from forkwatch.dashboard.charts import (
    COLORS,
    FLAG_COLORS,
    FLAG_DASHES,
    FLAG_SYMBOLS,
    flag_hover,
    rgba,
    undefined_marks,
)  # fmt: skip
from forkwatch.store.health import Flag
from forkwatch.store.spectrum import bin_label, bins_below
from plotly.subplots import make_subplots


def entropy_figure(series: dict[str, pd.DataFrame], flags: dict[str, list[Flag]]) -> go.Figure:
    """Mean entropy with its p10–p90 band and Rényi-2; group JS (only when a run has it: an empty panel would only
    show axes), reward and completion length aligned below; the steps where a health rule fired marked on every
    panel, with the evidence on hover. One colour per run."""
    has_gjs = any("group_js_mean" in df and df["group_js_mean"].notna().any() for df in series.values())
    has_sel = any("select_grad_share" in df and df["select_grad_share"].notna().any() for df in series.values())
    panels = ["entropy (nats): mean, p10–p90 band, Rényi-2 dashed", *(["group JS (mean)"] if has_gjs else []),
              *(["selection: kept tokens' gradient share"] if has_sel else []),
              "reward (mean)", "completion length (mean tokens)"]
    n = len(panels)
    fig = make_subplots(
        rows=n, cols=1, shared_xaxes=True, vertical_spacing=0.05, row_heights=[0.4] + [0.6 / (n - 1)] * (n - 1),
        subplot_titles=panels,
    )  # fmt: skip
    row_of = {title.split(" ")[0]: i + 1 for i, title in enumerate(panels)}
    for i, (run_id, df) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        x = df["step"].to_numpy()
        band_y = np.concatenate([df["entropy_p90"].to_numpy(), df["entropy_p10"].to_numpy()[::-1]])
        fig.add_trace(
            go.Scatter(
                x=np.concatenate([x, x[::-1]]), y=band_y, fill="toself", fillcolor=rgba(c, 0.15),
                line={"width": 0}, hoverinfo="skip", legendgroup=run_id, showlegend=False, name=f"{run_id} p10–p90",
            ),
            row=1, col=1,
        )  # fmt: skip
        lines = [
            (1, "entropy_mean", f"{run_id} entropy", "solid", True),
            (1, "renyi2_mean", f"{run_id} Rényi-2", "dash", False),
            *([(row_of["group"], "group_js_mean", f"{run_id} group JS", "solid", False)] if has_gjs else []),
            *([(row_of["selection:"], "select_grad_share", f"{run_id} grad share", "solid", False)] if has_sel else []),
            (row_of["reward"], "reward_mean", f"{run_id} reward", "solid", False),
            (row_of["completion"], "completion_length_mean", f"{run_id} length", "solid", False),
        ]
        for row, col, name, dash, legend in lines:
            if col not in df:
                continue
            gaps = undefined_marks(df, col, name)  # a NULL step is a gap in the line, marked with its reason
            if gaps is not None:
                fig.add_trace(gaps, row=row, col=1)
            fig.add_trace(
                go.Scatter(
                    x=x, y=df[col], name=name if legend else run_id, mode="lines", line={"color": c, "dash": dash},
                    legendgroup=run_id, showlegend=legend, hovertemplate=f"{name}<br>step %{{x}}: %{{y:.4g}}<extra></extra>",
                ),
                row=row, col=1,
            )  # fmt: skip
        _mark_flags(fig, run_id, df, flags.get(run_id, []))
    fig.update_layout(height=640 + 120 * (has_gjs + has_sel), margin={"t": 40, "b": 30, "l": 50, "r": 20}, hovermode="closest")
    fig.update_xaxes(title_text="step", row=n, col=1)
    return fig


def _mark_flags(fig: go.Figure, run_id: str, df: pd.DataFrame, flags: list[Flag]) -> None:
    """Each flag at the step it fired: a vertical line on every panel (dotted for an alarm, dashed for a warning)
    and a marker on the entropy curve (× an alarm, ○ a warning) with the evidence on hover."""
    if not flags:
        return
    at = df.set_index("step")["entropy_mean"]
    for f in flags:
        color = FLAG_COLORS.get(f.kind, "#333")
        fig.add_vline(x=f.fired_at, line={"color": color, "dash": FLAG_DASHES[f.severity], "width": 1}, row="all",
                      col=1)
    fig.add_trace(
        go.Scatter(
            x=[f.fired_at for f in flags],
            y=[float(at.get(f.fired_at, np.nan)) for f in flags],
            mode="markers", text=[f"{f.rule} ({f.severity})" for f in flags],
            marker={"symbol": [FLAG_SYMBOLS[f.severity] for f in flags], "size": 13,
                    "color": [FLAG_COLORS.get(f.kind, "#333") for f in flags]},
            hovertext=[flag_hover(run_id, f) for f in flags], hoverinfo="text",
            name=f"{run_id} health flags", legendgroup=run_id,
        ),
        row=1, col=1,
    )  # fmt: skip


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
