"""Fork value as a truth for per-token scores and selectors: the named queries over the `fork_values` table, and
the metrics that turn a stratified sample of measured positions into estimates for every position of a step.

The measured positions are a stratified sample (plugin/fork_value_stats.py, `stratified_sample`): within stratum h
(forks, other positions, kept and dropped tokens of a selector, on the demo each ground-truth role), n_h of its N_h
positions drawn uniformly, so each has inclusion probability p = n_h / N_h, stored with it. Weighting each position
by 1/p (Horvitz–Thompson):

- a **mean** Σ y/p / Σ 1/p is unbiased for the mean over all N positions (Σ 1/p = N exactly in this design), and a
  **share of a total** (the fork value a selector's kept tokens hold) is a ratio of two such sums;
- **AUROC** and **average precision** are store/detector_metrics.py's, given the design (each sampled pair weighted by
  its chance of being sampled together; precision with weights in place of counts): consistent, with a bias of order
  1/n;
- **Spearman's ρ** uses the weights 1/p in place of counts (population ranks): a ratio estimator, consistent.

With every position measured (p = 1) each is the plain metric. Pure numpy and DuckDB: no torch.
"""

from __future__ import annotations

import math

import duckdb
import numpy as np
import pandas as pd

from .detector_metrics import auroc, average_precision, position_score

# the named queries (the dashboard reaches them by name, dashboard/cache.py; `forkwatch forks` calls top_fork_values)
__all__ = ["fork_value_detectors", "fork_value_marks", "fork_value_scatter", "fork_value_steps", "top_fork_values"]

# One row per measured position (its latest measurement when it was measured twice), its sampled branch's Q and the
# best and worst branch beside the position's own estimates.
POSITIONS_SQL = """
WITH latest AS (
    SELECT * FROM fork_values WHERE run_id = $run AND ($step IS NULL OR step = $step)
    QUALIFY measurement = max(measurement) OVER (PARTITION BY run_id, step, completion_id, position)
)
SELECT run_id, step, completion_id, position, any_value(token_id) AS token_id,
       any_value(value) AS value, any_value(value_se) AS value_se, any_value(p_value) AS p_value,
       any_value(consequential) AS consequential, any_value(v) AS v, any_value(v_se) AS v_se,
       any_value(spread) AS spread, any_value(sampled_advantage) AS sampled_advantage, any_value(mass) AS mass,
       max(q) FILTER (WHERE branch = 'sampled') AS q_sampled,
       arg_max(branch_token_id, q) AS best_token_id, max(q) AS best_q,
       arg_min(branch_token_id, q) AS worst_token_id, min(q) AS worst_q,
       count(*) AS branches, CAST(max(n) AS INTEGER) AS rollouts,
       any_value(stratum) AS stratum, any_value(inclusion_prob) AS inclusion_prob,
       any_value(source) AS source, any_value(measurement) AS measurement
FROM latest
GROUP BY ALL
ORDER BY step, completion_id, position
"""

# The measured positions with the per-token scores the run recorded there, and the text of the token before (for
# the lexical rule).
SCORED_SQL = f"""
WITH p AS ({POSITIONS_SQL})
SELECT p.*, t.entropy, t.renyi2, t.group_js, t.selected, prev.text AS previous_text
FROM p
JOIN tokens t USING (run_id, step, completion_id, position)
LEFT JOIN tokens tp ON tp.run_id = p.run_id AND tp.step = p.step AND tp.completion_id = p.completion_id
                   AND tp.position = p.position - 1
LEFT JOIN (SELECT DISTINCT ON (token_id) token_id, text FROM vocab WHERE run_id = $run) prev
       ON prev.token_id = tp.token_id
ORDER BY p.step, p.completion_id, p.position
"""


def fork_value_positions(con: duckdb.DuckDBPyConnection, run_id: str, step: int | None = None) -> pd.DataFrame:
    """One row per measured position of `run_id` (at `step`, or every step): the fork value and its SE, p-value,
    consequential, V, spread, the sampled token's Q and advantage, the best and worst branch, the stratum and the
    inclusion probability."""
    return con.execute(POSITIONS_SQL, {"run": run_id, "step": step}).df()


def scored_positions(con: duckdb.DuckDBPyConnection, run_id: str, step: int | None = None) -> pd.DataFrame:
    """`fork_value_positions` with the run's recorded scores at each position (entropy, renyi2, group_js), the
    selector's gradient weight there (`selected`) and the text of the preceding token."""
    return con.execute(SCORED_SQL, {"run": run_id, "step": step}).df()


def fork_value_steps(con: duckdb.DuckDBPyConnection, run_id: str) -> pd.DataFrame:
    """The steps of `run_id` with measured positions: step, positions, consequential (how many), sources (the
    policies that measured them: a checkpoint path, or "training")."""
    return con.execute(
        f"WITH p AS ({POSITIONS_SQL}) SELECT step, count(*) AS positions, "
        "count(*) FILTER (WHERE consequential) AS consequential, string_agg(DISTINCT source, ', ') AS sources "
        "FROM p GROUP BY step ORDER BY step", {"run": run_id, "step": None}).df()


def fork_value_marks(con: duckdb.DuckDBPyConnection, run_id: str, step: int, completion_id: int) -> pd.DataFrame:
    """The measured positions of one completion: position, value, value_se, consequential, the sampled token's Q,
    the best branch's token text and Q, V, and the recorded entropy (the Forks page marks them in the token view)."""
    return con.execute(
        f"""WITH p AS ({POSITIONS_SQL})
        SELECT p.position, p.value, p.value_se, p.consequential, p.q_sampled, p.best_q, p.v,
               CASE WHEN p.best_token_id IS NULL THEN '(any other token)' ELSE v.text END AS best_text,
               t.entropy
        FROM p
        JOIN tokens t USING (run_id, step, completion_id, position)
        LEFT JOIN (SELECT DISTINCT ON (token_id) token_id, text FROM vocab WHERE run_id = $run) v
               ON v.token_id = p.best_token_id
        WHERE p.completion_id = $completion
        ORDER BY p.position""", {"run": run_id, "step": step, "completion": completion_id}).df()


def fork_value_scatter(con: duckdb.DuckDBPyConnection, run_id: str) -> pd.DataFrame:
    """Every measured position of `run_id` with its entropy and value (the scatter of entropy against fork value):
    step, completion_id, position, entropy, value, value_se, consequential, inclusion_prob."""
    cols = ["step", "completion_id", "position", "entropy", "value", "value_se", "consequential", "inclusion_prob"]
    return scored_positions(con, run_id)[cols]


def fork_value_detectors(con: duckdb.DuckDBPyConnection, run_id: str) -> pd.DataFrame:
    """`detector_vs_value` over every step of `run_id` with measured positions."""
    return detector_vs_value(scored_positions(con, run_id))


def top_fork_values(con: duckdb.DuckDBPyConnection, run_id: str, *, limit: int = 10, step: int | None = None,
                    before: int = 24, after: int = 8) -> pd.DataFrame:
    """The `limit` measured positions of `run_id` (at `step`, or any) with the highest fork value, each with its
    text context: the text of the `before` tokens before it (`prefix`), of the token (`token`) and of the `after`
    tokens after it (`suffix`), the sampled token's Q, the best branch's text and Q, V, the value with its SE,
    consequential, and the recorded entropy."""
    top = con.execute(
        f"""WITH p AS ({POSITIONS_SQL})
        SELECT p.step, p.completion_id, p.position, p.value, p.value_se, p.consequential, p.q_sampled, p.best_q,
               p.v, p.best_token_id, t.entropy
        FROM p JOIN tokens t USING (run_id, step, completion_id, position)
        ORDER BY p.value DESC, p.step, p.completion_id, p.position LIMIT $limit""",
        {"run": run_id, "step": step, "limit": limit}).df()
    if top.empty:
        return top.assign(prefix=[], token=[], suffix=[], best_text=[])
    context = con.execute(
        """SELECT w.step, w.completion_id, w.position AS at, t.position, t.text
        FROM (SELECT unnest($steps) AS step, unnest($completions) AS completion_id, unnest($positions) AS position) w
        JOIN token_text t ON t.run_id = $run AND t.step = w.step AND t.completion_id = w.completion_id
                         AND t.position BETWEEN w.position - $before AND w.position + $after
        ORDER BY t.position""",
        {"run": run_id, "steps": top["step"].tolist(), "completions": top["completion_id"].tolist(),
         "positions": top["position"].tolist(), "before": before, "after": after}).df()
    texts = dict(con.execute("SELECT DISTINCT ON (token_id) token_id, text FROM vocab WHERE run_id = ?",
                             [run_id]).fetchall())
    parts: dict[str, list[str]] = {"prefix": [], "token": [], "suffix": [], "best_text": []}
    for r in top.itertuples(index=False):
        c = context[(context["step"] == r.step) & (context["completion_id"] == r.completion_id)
                    & (context["at"] == r.position)]
        text = c["text"].fillna("")
        parts["prefix"].append("".join(text[c["position"] < r.position]))
        parts["token"].append("".join(text[c["position"] == r.position]))
        parts["suffix"].append("".join(text[c["position"] > r.position]))
        parts["best_text"].append("(any other token)" if pd.isna(r.best_token_id)
                                  else texts.get(int(r.best_token_id), f"#{int(r.best_token_id)}"))
    return top.assign(**parts)


# --- estimates for all positions from the stratified sample ---


def population_mean(y: np.ndarray, inclusion: np.ndarray) -> float:
    """Horvitz–Thompson mean of `y` over the population the sample was drawn from (NaN without units)."""
    y, w = np.asarray(y, dtype=np.float64), 1.0 / np.asarray(inclusion, dtype=np.float64)
    return float((w * y).sum() / w.sum()) if y.size else math.nan


def _population_ranks(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Each unit's mid-rank among the population the weights stand for: Σ w below + ½ Σ w tied."""
    values, inverse = np.unique(x, return_inverse=True)
    mass = np.bincount(inverse, weights=w, minlength=values.size)
    return (np.cumsum(mass) - 0.5 * mass)[inverse]


def weighted_spearman(x: np.ndarray, y: np.ndarray, inclusion: np.ndarray) -> float:
    """Spearman's ρ over the population: the weighted Pearson correlation of population ranks; NaN if either is
    constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    w = 1.0 / np.asarray(inclusion, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y, w = x[keep], y[keep], w[keep]
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:  # a constant: rounding would make its spread non-zero
        return math.nan
    rx, ry = _population_ranks(x, w), _population_ranks(y, w)
    mx, my = np.average(rx, weights=w), np.average(ry, weights=w)
    cov = np.average((rx - mx) * (ry - my), weights=w)
    sx, sy = np.average((rx - mx) ** 2, weights=w), np.average((ry - my) ** 2, weights=w)
    return float(cov / math.sqrt(sx * sy)) if sx > 0 and sy > 0 else math.nan


SEPARATORS = frozenset(",.;:!?\n")


def lexical_score(position: np.ndarray, previous_text: pd.Series) -> np.ndarray:
    """The lexical rule: 1 at position 0 or right after a token that ends in a separator (, . ; : ! ? newline)."""
    after = previous_text.fillna("").map(lambda t: bool(t) and t.rstrip(" ")[-1:] in SEPARATORS).to_numpy(bool)
    return (np.asarray(position) == 0) | after


def detector_vs_value(scored: pd.DataFrame, scores: tuple[str, ...] = ("entropy", "renyi2", "group_js")
                      ) -> pd.DataFrame:
    """Per step of `scored_positions`, each score, the position-only rule (fitted on the same positions:
    store/detector_metrics.py `position_score`) and the lexical rule against fork value: the share of positions that
    are consequential (estimated for all positions), AUROC and AP for "consequential", Spearman's ρ with the value,
    and the number of positions measured. A score absent from `scored`, or never finite at a step, is left out.
    Long format, one row per (step, predictor)."""
    rows = []
    for step, g in scored.groupby("step", sort=True):
        p = g["inclusion_prob"].to_numpy(np.float64)
        strata = g["stratum"].astype(str).to_numpy()
        y = g["consequential"].to_numpy(bool)
        value = g["value"].to_numpy(np.float64)
        position = g["position"].to_numpy()
        predictors = {s: (g[s].to_numpy(np.float64, na_value=np.nan),) * 2 for s in scores if s in g}
        # the position rule ranks by the share of consequential positions for the target, by the mean value for ρ
        predictors["position"] = (position_score(position, y, inclusion=p),
                                  position_score(position, value, inclusion=p))
        predictors["lexical"] = (lexical_score(position, g["previous_text"]).astype(np.float64),) * 2
        for name, (s, s_rho) in predictors.items():
            if not np.isfinite(s).any():
                continue
            rows.append({"step": int(step), "predictor": name, "positions": len(g),
                         "consequential_share": population_mean(y, p),
                         "auroc": auroc(s, y, inclusion=p, strata=strata),
                         "average_precision": average_precision(s, y, inclusion=p),
                         "spearman": weighted_spearman(s_rho, value, p)})
    return pd.DataFrame(rows, columns=["step", "predictor", "positions", "consequential_share", "auroc",
                                       "average_precision", "spearman"])


def selector_vs_value(scored: pd.DataFrame) -> dict[str, float]:
    """What a selector kept (`selected` > 0) against fork value, over every position the sample stands for: the
    share of tokens kept, the share of the kept tokens that are consequential (beside the share of all tokens), and
    the share of the total fork value the kept tokens hold (Σ_kept value/p / Σ value/p). NaN where undefined."""
    p = scored["inclusion_prob"].to_numpy(np.float64)
    w = 1.0 / p
    kept = scored["selected"].fillna(1.0).to_numpy(np.float64) > 0
    y = scored["consequential"].to_numpy(np.float64)
    value = scored["value"].to_numpy(np.float64)
    total = float((w * value).sum())
    return {"positions": int(len(scored)), "kept_measured": int(kept.sum()),
            "kept_share": population_mean(kept.astype(np.float64), p),
            "consequential_share": population_mean(y, p),
            "kept_consequential": population_mean(y[kept], p[kept]),
            "value_kept": float((w * value)[kept].sum()) / total if total > 0 else math.nan}
