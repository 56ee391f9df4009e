"""Fork detection judged per step against a run's ground truth (the `truth` view, store/ground_truth.py): the named
query that joins the recorded tokens with their roles, and the per-step table of detector metrics
(store/detector_metrics.py) for entropy, Rényi-2 and group-JS next to three baselines.

Two targets: "decision" (the task's consequential decisions) and "consequential_or_mistake" (decisions,
confident-consequential tokens and mistakes: every token where the outcome is decided). Every recorded token of the
step counts, tokens after a mistake as negatives.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd

from .detector_metrics import FLAG_RATE, baselines, judge

SCORES = ("entropy", "renyi2", "group_js")  # the per-token statistics forkwatch records
BASELINES = ("all", "random", "position")
TARGETS = {
    "decision": ("decision",),
    "consequential_or_mistake": ("decision", "confident_consequential", "mistake"),
}

# the named query: one row per recorded token of a run that has a ground truth, in step order
DETECTOR_TOKENS_SQL = """
SELECT t.step, t.position, t.entropy, t.renyi2, t.group_js, x.role
FROM tokens t JOIN truth x USING (run_id, step, completion_id, position)
WHERE t.run_id = ? AND x.role IS NOT NULL
ORDER BY t.step, t.completion_id, t.position
"""


def detector_tokens(con: duckdb.DuckDBPyConnection, run_id: str) -> pd.DataFrame:
    """Every recorded token of `run_id` with its scores and its ground-truth role (no rows without a truth)."""
    return con.execute(DETECTOR_TOKENS_SQL, [run_id]).df()


def step_metrics(tokens: pd.DataFrame, *, rate: float = FLAG_RATE, seed: int = 0) -> pd.DataFrame:
    """Per step, target and predictor (a score or a baseline): auroc, average_precision, precision among the top
    `rate` of tokens, its ceiling, the target's base rate and the token count. Long format, one row each."""
    rows = []
    for step, g in tokens.groupby("step", sort=True):
        for target, roles in TARGETS.items():
            y = g["role"].isin(roles).to_numpy()
            predictors = {s: g[s].to_numpy(dtype=np.float64, na_value=np.nan) for s in SCORES}
            predictors.update(baselines(g["position"].to_numpy(), y, seed=seed + int(step)))
            for name, score in predictors.items():
                if not np.isfinite(score).any():
                    continue  # e.g. group_js, recorded only when a selector or `group_js=True` asked for it
                m = judge(score, y, rate)
                rows.append({"step": int(step), "target": target, "predictor": name, "auroc": m.auroc,
                             "average_precision": m.average_precision, "precision": m.precision,
                             "ceiling": m.ceiling, "base_rate": float(y.mean()), "tokens": int(y.size)})
    return pd.DataFrame(rows, columns=["step", "target", "predictor", "auroc", "average_precision", "precision",
                                       "ceiling", "base_rate", "tokens"])


def detector_by_step(con: duckdb.DuckDBPyConnection, run_id: str, *, rate: float = FLAG_RATE) -> pd.DataFrame:
    """`step_metrics` of a run's recorded tokens (empty when the run has no ground truth)."""
    return step_metrics(detector_tokens(con, run_id), rate=rate)
