"""Plotly figures from query results. Drawing only: every number plotted comes in through the arguments."""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from forkwatch.store.health import Flag
from forkwatch.store.law import LawFit
from plotly.colors import qualitative
from plotly.subplots import make_subplots

COLORS = qualitative.Plotly
FLAG_COLORS = {"collapse": "#d62728", "explosion": "#9467bd", "saturation": "#e7a100"}


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def flag_lines(f: Flag) -> list[str]:
    """A flag's evidence as short lines of text: the message, the steps and threshold, the supporting values."""
    lines = [f.message, f"evidence: steps {f.steps[0]}–{f.steps[-1]}, threshold {f.threshold:.4g}"]
    return lines + [f"{k} = {v:.4g}" for k, v in f.supporting.items()]


def flag_hover(run_id: str, f: Flag) -> str:
    head = f"<b>{run_id}: {f.rule}</b> fired at step {f.fired_at}"
    return "<br>".join([head, *(w for line in flag_lines(f) for w in textwrap.wrap(line, 70))])


def entropy_figure(series: dict[str, pd.DataFrame], flags: dict[str, list[Flag]]) -> go.Figure:
    """Mean entropy with its p10–p90 band and Rényi-2; group JS (only when a run has it: an empty panel would only
    show axes), reward and completion length aligned below; the steps where a health rule fired marked on every
    panel, with the evidence on hover. One colour per run."""
    has_gjs = any("group_js_mean" in df and df["group_js_mean"].notna().any() for df in series.values())
    panels = ["entropy (nats): mean, p10–p90 band, Rényi-2 dashed", *(["group JS (mean)"] if has_gjs else []),
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
                x=np.concatenate([x, x[::-1]]), y=band_y, fill="toself", fillcolor=_rgba(c, 0.15),
                line={"width": 0}, hoverinfo="skip", legendgroup=run_id, showlegend=False, name=f"{run_id} p10–p90",
            ),
            row=1, col=1,
        )  # fmt: skip
        lines = [
            (1, "entropy_mean", f"{run_id} entropy", "solid", True),
            (1, "renyi2_mean", f"{run_id} Rényi-2", "dash", False),
            *([(row_of["group"], "group_js_mean", f"{run_id} group JS", "solid", False)] if has_gjs else []),
            (row_of["reward"], "reward_mean", f"{run_id} reward", "solid", False),
            (row_of["completion"], "completion_length_mean", f"{run_id} length", "solid", False),
        ]
        for row, col, name, dash, legend in lines:
            fig.add_trace(
                go.Scatter(
                    x=x, y=df[col], name=name if legend else run_id, mode="lines", line={"color": c, "dash": dash},
                    legendgroup=run_id, showlegend=legend, hovertemplate=f"{name}<br>step %{{x}}: %{{y:.4g}}<extra></extra>",
                ),
                row=row, col=1,
            )  # fmt: skip
        _mark_flags(fig, run_id, df, flags.get(run_id, []))
    fig.update_layout(height=760 if has_gjs else 640, margin={"t": 40, "b": 30, "l": 50, "r": 20}, hovermode="closest")
    fig.update_xaxes(title_text="step", row=n, col=1)
    return fig


def _mark_flags(fig: go.Figure, run_id: str, df: pd.DataFrame, flags: list[Flag]) -> None:
    if not flags:
        return
    at = df.set_index("step")["entropy_mean"]
    for f in flags:
        color = FLAG_COLORS.get(f.kind, "#333")
        fig.add_vline(x=f.fired_at, line={"color": color, "dash": "dot", "width": 1}, row="all", col=1)
    fig.add_trace(
        go.Scatter(
            x=[f.fired_at for f in flags],
            y=[float(at.get(f.fired_at, np.nan)) for f in flags],
            mode="markers", text=[f.rule for f in flags],
            marker={"symbol": "x", "size": 13, "color": [FLAG_COLORS.get(f.kind, "#333") for f in flags]},
            hovertext=[flag_hover(run_id, f) for f in flags], hoverinfo="text",
            name=f"{run_id} health flags", legendgroup=run_id,
        ),
        row=1, col=1,
    )  # fmt: skip


def law_figure(points: dict[str, pd.DataFrame], fits: dict[str, LawFit]) -> go.Figure:
    """Mean reward against mean entropy per step, and where the law was fitted its curve R = −a·exp(H) + b drawn
    down to H = 0, where it meets its ceiling b − a."""
    fig = go.Figure()
    for i, (run_id, df) in enumerate(points.items()):
        c = COLORS[i % len(COLORS)]
        fig.add_trace(
            go.Scatter(
                x=df["entropy_mean"], y=df["reward_mean"], mode="markers", name=f"{run_id} steps",
                marker={"color": c, "size": 6, "opacity": 0.75}, customdata=df["step"],
                hovertemplate="step %{customdata}<br>entropy %{x:.4g}<br>reward %{y:.4g}<extra>" + run_id + "</extra>",
            )
        )  # fmt: skip
        fit = fits.get(run_id)
        if fit is not None and fit.ok:
            h_max = float(np.nanmax(df["entropy_mean"].to_numpy(dtype=float)))
            h = np.linspace(0.0, h_max, 100)
            fig.add_trace(
                go.Scatter(
                    x=h, y=fit.predict(h), mode="lines", line={"color": c},
                    name=f"{run_id} fit: R = −{fit.a:.3g}·exp(H) + {fit.b:.3g}  (R² {fit.r2:.3f})",
                )
            )  # fmt: skip
            fig.add_hline(
                y=fit.ceiling, line={"color": c, "dash": "dot"}, annotation_text=f"ceiling {fit.ceiling:.3g}"
            )
    fig.update_layout(
        height=520, xaxis_title="mean entropy H (nats)", yaxis_title="mean reward R",
        margin={"t": 30, "b": 40, "l": 50, "r": 20},
    )  # fmt: skip
    return fig


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
