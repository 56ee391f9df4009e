"""Entropy: mean entropy with its p10–p90 band, Rényi-2 and group JS, the selection's gradient share, reward and
completion length aligned below, the steps where a health rule fired marked with their severity and evidence, and
gaps (with their reason) where a diagnostic is undefined; several runs overlaid. Below: the entropy spectrum
(step × entropy bin) and the hidden states' effective rank beside entropy."""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from forkwatch.dashboard import frame
from forkwatch.dashboard.cache import cached
from forkwatch.dashboard.frame import COLORS, FLAG_COLORS, FLAG_SYMBOLS
from forkwatch.store.health import Flag
from forkwatch.store.run_meta import config_of, vocab_size_from_meta
from forkwatch.store.spectrum import bin_label, bins_below
from plotly.subplots import make_subplots

FLAG_DASHES = {"alarm": "dot", "warning": "dash"}  # the vertical line at a flag's step
# Why a stored diagnostic can be NULL at a step (the plugin writes NULL, not NaN, for "undefined"): the note shown
# at the gap it leaves in a chart.
UNDEFINED_REASONS = {
    "select_grad_share": "no policy gradient this step: every advantage is 0",
    "select_kept_p_mean": "no token kept this step",
    "select_kept_entropy_mean": "no token kept this step",
    "select_entropy_overlap": "no token kept this step",
    "group_js_mean": "group JS not computed at this step",
    "reward_mean": "no reward recorded at this step",
}


def render() -> None:
    st.title("Entropy")
    log_dir, runs, shown = frame.chosen_runs("entropy_runs")
    if not shown:
        return
    meta = dict(zip(runs["run_id"], runs["meta"], strict=True))
    series = {r: cached("step_series", log_dir, r) for r in shown}
    reports = {r: cached("run_health", log_dir, r, meta[r]) for r in shown}
    st.plotly_chart(
        entropy_figure(series, {r: rep.flags for r, rep in reports.items()}), key="entropy_chart",
        width="stretch",
    )  # fmt: skip
    group_js_note(series)
    note = undefined_note(series, ["select_grad_share", "reward_mean"])
    if note:
        st.caption(note)
    flags = [
        {"run": r, "severity": f.severity, "rule": f.rule, "fired at step": f.fired_at,
         "flag": f.describe()}
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
        spectrum = cached("entropy_spectrum", log_dir, r)
        if spectrum.empty:
            st.info(f"Run `{r}`: no entropy spectrum recorded (runs written by a forkwatch without "
                    "`steps.entropy_spectrum` have none).")
            continue
        if len(shown) > 1:
            st.markdown(f"**{r}**")
        st.plotly_chart(spectrum_figure(spectrum, vocab_size_from_meta(meta[r])),
                        key=f"entropy_spectrum_{r}", width="stretch")


def effective_rank_section(log_dir: str, runs: pd.DataFrame, shown: list[str]) -> None:
    st.subheader("Effective rank of hidden states")
    series = {r: cached("effective_rank_series", log_dir, r) for r in shown}
    missing = [r for r, df in series.items() if df.empty]
    drawn = {r: df for r, df in series.items() if not df.empty}
    if drawn:
        st.caption("Mean effective rank of recorded completions' final-layer hidden states (arXiv:2509.23808), "
                   "beside mean token entropy: exploration seen without going through the token distribution.")
        st.plotly_chart(effective_rank_figure(drawn), key="entropy_rank_chart", width="stretch")
    for r in missing:
        every = config_of(runs.set_index("run_id").loc[r, "meta"]).get("effective_rank_every")
        why = ("it was turned off (effective_rank_every=0)" if every == 0 else
               f"none measured yet (every {every} steps)" if every else "the run was written without it")
        st.info(f"Run `{r}`: no effective rank to draw: {why}.")
    for r in shown:  # which steps the lens budget let it run at, and which it skipped
        note = cached("lens_schedule", log_dir, r).get("effective_rank")
        if note:
            st.caption(f"`{r}`: {note}")


def group_js_note(series: dict[str, pd.DataFrame]) -> None:
    """Say which runs have no group JS, and why (their group-JS panel is left out of the chart)."""
    missing = [r for r, df in series.items() if "group_js_mean" not in df or df["group_js_mean"].isna().all()]
    if missing:
        st.caption("group JS not recorded for " + ", ".join(f"`{r}`" for r in missing) + ": it is computed when "
                   "`group_js=True` or when a selector needs it (e.g. `select='ict'`).")


# --- the figures: drawing only, every number comes in through the arguments ---


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


def rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def flag_hover(run_id: str, f: Flag) -> str:
    first, *rest = f.describe_lines()
    return "<br>".join([f"<b>{run_id}: {first}</b>", *(w for line in rest for w in textwrap.wrap(line, 70))])


def undefined_marks(df: pd.DataFrame, column: str, name: str) -> go.Scatter | None:
    """Markers on the steps where `column` is undefined (NULL) although the run has it at other steps, each with its
    reason on hover; the line itself is left with a gap there (plotly does not connect across a missing value)."""
    if column not in df or df[column].notna().sum() == 0:
        return None
    values = df[column].astype(float)
    missing = values.isna().to_numpy()
    if not missing.any():
        return None
    at = values.ffill().bfill().to_numpy()[missing]  # drawn at the level of the last defined value
    reason = UNDEFINED_REASONS.get(column, "undefined at this step")
    steps = df["step"].to_numpy()[missing]
    return go.Scatter(
        x=steps, y=at, mode="markers", name=f"{name}: undefined", showlegend=False,
        marker={"symbol": "line-ns-open", "size": 12, "color": "#999"},
        hovertext=[f"step {s}: {column} undefined ({reason})" for s in steps], hoverinfo="text",
    )  # fmt: skip


def undefined_note(series: dict[str, pd.DataFrame], columns: list[str]) -> str | None:
    """One sentence per column for the steps a chart leaves as gaps, with the reason (None when there are none)."""
    parts = []
    for col in columns:
        counts = {r: int(df[col].isna().sum()) for r, df in series.items()
                  if col in df and df[col].notna().any() and df[col].isna().any()}
        if counts:
            runs = ", ".join(f"{r} ({n} steps)" for r, n in counts.items())
            parts.append(f"{col} is undefined at some steps of {runs}: {UNDEFINED_REASONS.get(col, 'undefined')}; "
                         "the chart leaves a gap there")
    return ". ".join(parts) + "." if parts else None
