"""What every chart shares: the palette, the colours of health flags (by kind, dashed for warnings), a flag's
evidence as text, and how an undefined value is drawn (a gap, with its reason). Drawing only: every number plotted
comes in through the arguments."""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from forkwatch.store.health import Flag
from plotly.colors import qualitative

COLORS = qualitative.Plotly
FLAG_COLORS = {"collapse": "#d62728", "explosion": "#9467bd", "saturation": "#e7a100"}
FLAG_SYMBOLS = {"alarm": "x", "warning": "circle-open"}  # an alarm is a cross, a warning an open circle
FLAG_DASHES = {"alarm": "dot", "warning": "dash"}
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


def rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def flag_lines(f: Flag) -> list[str]:
    """A flag's evidence as short lines of text: severity and message, the steps and threshold, the evidence of harm
    (or what was missing, for a warning), the values at the flag."""
    lines = [f"{f.severity}: {f.message}", f"signal: steps {f.steps[0]}–{f.steps[-1]}, threshold {f.threshold:.4g}"]
    return lines + [f"evidence: {e}" for e in f.evidence] + [f"{k} = {v:.4g}" for k, v in f.supporting.items()]


def flag_hover(run_id: str, f: Flag) -> str:
    head = f"<b>{run_id}: {f.rule} ({f.severity})</b> fired at step {f.fired_at}"
    return "<br>".join([head, *(w for line in flag_lines(f) for w in textwrap.wrap(line, 70))])


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


def nearest(series: pd.Series, step: int) -> float:
    """The value at `step`, or at the nearest step drawn (the curves are subsampled on long runs)."""
    if series.empty:
        return float("nan")
    idx = series.index.to_numpy()
    return float(series.iloc[int(np.abs(idx - step).argmin())])
