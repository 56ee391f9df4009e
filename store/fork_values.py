"""Fork value as a truth for per-token scores: the named queries over the `fork_values` table, and the metrics that
turn a stratified sample of measured positions into estimates for every position of a step.

The measured positions are a stratified sample (plugin/fork_value_stats.py, `stratified_sample`): within stratum h
(forks, other positions, or on the demo each ground-truth role), n_h of its N_h positions drawn uniformly, so each
has inclusion probability p = n_h / N_h, stored with it. Weighting each position by 1/p (Horvitz–Thompson):

- a **mean** Σ y/p / Σ 1/p is unbiased for the mean over all N positions (Σ 1/p = N exactly in this design);
- **AUROC** is a sum over (positive, negative) pairs: each sampled pair is weighted by 1/p_ij, its chance of being in
  the sample together (p_i·p_j across strata, n_h(n_h − 1)/(N_h(N_h − 1)) within one), so that numerator and
  denominator are each unbiased for their population sums; their ratio is consistent, with a bias of order 1/n;
- **average precision** and **Spearman's ρ** use the weights 1/p in place of counts (precision at each positive's
  score, each position counting itself once; population ranks): ratio estimators, consistent, with a bias of order
  1/n.

With every position measured (p = 1) each is the plain metric (store/detector_metrics.py).
Pure numpy and DuckDB: no torch.
"""

from __future__ import annotations

import math

import duckdb
import numpy as np
import pandas as pd

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
SELECT p.*, t.entropy, t.renyi2, t.group_js, prev.text AS previous_text
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
    """`fork_value_positions` with the run's recorded scores at each position (entropy, renyi2, group_js) and the
    text of the preceding token."""
    return con.execute(SCORED_SQL, {"run": run_id, "step": step}).df()


# --- estimates for all positions from the stratified sample ---


def population_mean(y: np.ndarray, inclusion: np.ndarray) -> float:
    """Horvitz–Thompson mean of `y` over the population the sample was drawn from (NaN without units)."""
    y, w = np.asarray(y, dtype=np.float64), 1.0 / np.asarray(inclusion, dtype=np.float64)
    return float((w * y).sum() / w.sum()) if y.size else math.nan


def _pair_sum(score: np.ndarray, label: np.ndarray, w: np.ndarray) -> float:
    """Σ over (positive i, negative j) of w_i w_j (1[s_i > s_j] + ½ 1[s_i = s_j])."""
    values, inverse = np.unique(score, return_inverse=True)
    neg = np.bincount(inverse, weights=w * ~label, minlength=values.size)
    pos = np.bincount(inverse, weights=w * label, minlength=values.size)
    below = np.cumsum(neg) - neg  # negative weight strictly below each value
    return float((pos * (below + 0.5 * neg)).sum())


def _stratum_correction(strata: np.ndarray, inclusion: np.ndarray) -> dict[object, float]:
    """Per stratum, (1/p_ij) / (w_i w_j) − 1 for two units of it: n(N − 1) / (N(n − 1)) − 1 (0 when n < 2)."""
    out = {}
    for h in np.unique(strata):
        sel = strata == h
        n = int(sel.sum())
        big_n = n / float(np.asarray(inclusion)[sel][0])
        out[h] = n * (big_n - 1) / (big_n * (n - 1)) - 1.0 if n >= 2 and big_n > 1 else 0.0
    return out


def weighted_auroc(score: np.ndarray, label: np.ndarray, inclusion: np.ndarray, strata: np.ndarray) -> float:
    """AUROC over the population, from a stratified sample (module docstring); NaN without both classes or scores."""
    s = np.asarray(score, dtype=np.float64)
    y = np.asarray(label, dtype=bool)
    p = np.asarray(inclusion, dtype=np.float64)
    st = np.asarray(strata)
    keep = np.isfinite(s)
    s, y, p, st = s[keep], y[keep], p[keep], st[keep]
    if not y.any() or y.all():
        return math.nan
    w = 1.0 / p
    num = _pair_sum(s, y, w)
    den = (w * y).sum() * (w * ~y).sum()
    for h, c in _stratum_correction(st, p).items():
        if c == 0.0:
            continue
        sel = st == h
        num += c * _pair_sum(s[sel], y[sel], w[sel])
        den += c * (w[sel] * y[sel]).sum() * (w[sel] * ~y[sel]).sum()
    return float(num / den) if den > 0 else math.nan


def weighted_average_precision(score: np.ndarray, label: np.ndarray, inclusion: np.ndarray) -> float:
    """Average precision over the population: the mean over its positives of the precision among the positions
    scoring at least as high, each sampled positive weighted 1/p. A sampled position stands for 1/p positions but is
    itself one of them: in its own precision it counts once, the others by their weights (the weighted plug-in
    would let a heavily weighted positive vouch for its own precision 1/p times). NaN without positives."""
    s = np.asarray(score, dtype=np.float64)
    y = np.asarray(label, dtype=bool)
    w = 1.0 / np.asarray(inclusion, dtype=np.float64)
    keep = np.isfinite(s)
    s, y, w = s[keep], y[keep], w[keep]
    if not y.any():
        return math.nan
    values, inverse = np.unique(-s, return_inverse=True)  # ascending in -s: highest score first
    at_least_w = np.cumsum(np.bincount(inverse, weights=w, minlength=values.size))[inverse]
    at_least_tp = np.cumsum(np.bincount(inverse, weights=w * y, minlength=values.size))[inverse]
    precision = (at_least_tp - w + 1.0) / (at_least_w - w + 1.0)
    return float((w * precision)[y].sum() / w[y].sum())


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
    if x.size < 2:
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
    """Per step of `scored_positions`, each score and the lexical rule against fork value: the share of positions
    that are consequential (estimated for all positions), AUROC and AP for "consequential", Spearman's ρ with the
    value, and the number of positions measured. Long format, one row per (step, predictor)."""
    rows = []
    for step, g in scored.groupby("step", sort=True):
        p = g["inclusion_prob"].to_numpy(np.float64)
        strata = g["stratum"].astype(str).to_numpy()
        y = g["consequential"].to_numpy(bool)
        predictors = {s: g[s].to_numpy(np.float64, na_value=np.nan) for s in scores}
        predictors["lexical"] = lexical_score(g["position"].to_numpy(), g["previous_text"]).astype(np.float64)
        for name, s in predictors.items():
            if not np.isfinite(s).any():
                continue
            rows.append({"step": int(step), "predictor": name, "positions": len(g),
                         "consequential_share": population_mean(y, p),
                         "auroc": weighted_auroc(s, y, p, strata),
                         "average_precision": weighted_average_precision(s, y, p),
                         "spearman": weighted_spearman(s, g["value"].to_numpy(np.float64), p)})
    return pd.DataFrame(rows, columns=["step", "predictor", "positions", "consequential_share", "auroc",
                                       "average_precision", "spearman"])
