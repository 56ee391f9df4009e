"""The Runs page's picture per run: entropy and reward as small multiples, with the health flags marked. Drawing
only: every number comes in through the arguments."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from forkwatch.dashboard.charts import COLORS, FLAG_COLORS, FLAG_SYMBOLS, nearest
from forkwatch.store.health import Flag
from plotly.subplots import make_subplots


def run_pictures_figure(curves: pd.DataFrame, flags: dict[str, list[Flag]], runs: list[str]) -> go.Figure:
    """Small multiples, one row per run: mean entropy (left) and mean reward (right), health flags marked where
    they fired on the entropy curve, in the flag's colour: × an alarm, ○ a warning."""
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
                    x=[f.fired_at for f in marks], y=[nearest(at, f.fired_at) for f in marks], mode="markers",
                    marker={"symbol": [FLAG_SYMBOLS[f.severity] for f in marks], "size": 11,
                            "color": [FLAG_COLORS.get(f.kind, "#333") for f in marks]},
                    text=[f"{f.rule} ({f.severity}) at step {f.fired_at}" for f in marks], hoverinfo="text", showlegend=False,
                    name="flags",
                ),
                row=i, col=1,
            )  # fmt: skip
    fig.update_layout(height=150 * len(runs) + 60, margin={"t": 30, "b": 20, "l": 40, "r": 10})
    return fig
