"""The Law page's figure: mean reward against mean entropy with the fitted R = −a·exp(H) + b and its ceiling.
Drawing only: every number comes in through the arguments."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from forkwatch.dashboard.charts import COLORS
from forkwatch.store.law import LawFit


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
