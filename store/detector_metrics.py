"""How well a per-token score finds the tokens that matter, against any boolean target: AUROC, average precision,
and precision among the tokens it flags against the best any score could reach there, with three baselines, per
step. numpy and pandas only (no sklearn, no torch): each metric is a few lines, tested against hand-computed cases
(tests/store/test_detector_metrics.py). A generic scorer: it knows no target. The demo's ground truth
(store/ground_truth.py) is one target, a measured fork value significantly above 0 (store/fork_values.py) another.

A score predicts a boolean target per token (e.g. "this token is a consequential decision"); higher means "more
likely a target". Ties are handled as the standard definitions say: AUROC counts a tied positive/negative pair as
one half (the Mann-Whitney statistic), and average precision steps through distinct score values (all tied tokens
enter the flagged set together), as scikit-learn's `average_precision_score` does.

AUROC and average precision take an optional design: the inclusion probability of each token in a stratified sample
(and its stratum), when the tokens scored are a sample of a step's tokens (fork value measures a sample). Each token
then stands for 1/p tokens (Horvitz–Thompson):

- AUROC is a sum over (positive, negative) pairs: each sampled pair is weighted by 1/p_ij, its chance of being in
  the sample together (p_i·p_j across strata, n_h(n_h − 1)/(N_h(N_h − 1)) within one), so that numerator and
  denominator are each unbiased for their population sums; their ratio is consistent, with a bias of order 1/n;
- average precision uses the weights 1/p in place of counts (precision at each positive's score, each token counting
  itself once): a ratio estimator, consistent, with a bias of order 1/n.

Without a design (every token scored: p = 1, one stratum) both are the plain metrics above; one implementation
serves both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

# Precision is measured among the share of tokens forkwatch flags as forks: a run's own `fork_fraction` (run.json;
# store/ground_truth.py passes it), or this, the option's default, for a run that does not say.
FLAG_RATE = 0.2
SCORES = ("entropy", "renyi2", "group_js")  # the per-token statistics forkwatch records


def _clean(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must have the same shape")
    keep = np.isfinite(s)  # a token without a score (e.g. group_js not computed) is left out
    return s[keep], y[keep]


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
        big_n = n / float(inclusion[sel][0])
        out[h] = n * (big_n - 1) / (big_n * (n - 1)) - 1.0 if n >= 2 and big_n > 1 else 0.0
    return out


def _design(n: int, inclusion: np.ndarray | None, strata: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(inclusion probabilities, strata) of `n` tokens: every token scored (1, one stratum) unless given."""
    p = np.ones(n) if inclusion is None else np.asarray(inclusion, dtype=np.float64)
    h = np.zeros(n, dtype=np.int64) if strata is None else np.asarray(strata)
    if p.shape != (n,) or h.shape != (n,):
        raise ValueError(f"inclusion {p.shape} and strata {h.shape} must have one value per token ({n})")
    return p, h


def auroc(scores: np.ndarray, labels: np.ndarray, *, inclusion: np.ndarray | None = None,
          strata: np.ndarray | None = None) -> float:
    """P(score of a random positive > score of a random negative) + ½ P(tie), over the population a stratified
    sample stands for when `inclusion` (and `strata`) are given (module docstring); NaN without both classes."""
    s = np.asarray(scores, dtype=np.float64)
    p, h = _design(s.size, inclusion, strata)
    keep = np.isfinite(s)  # a token without a score (e.g. group_js not computed) is left out
    s, p, h = s[keep], p[keep], h[keep]
    y = _labels(labels, keep)
    if not y.any() or y.all():
        return math.nan
    w = 1.0 / p
    num = _pair_sum(s, y, w)
    den = (w * y).sum() * (w * ~y).sum()
    for stratum, c in _stratum_correction(h, p).items():
        if c == 0.0:
            continue
        sel = h == stratum
        num += c * _pair_sum(s[sel], y[sel], w[sel])
        den += c * (w[sel] * y[sel]).sum() * (w[sel] * ~y[sel]).sum()
    return float(num / den) if den > 0 else math.nan


def average_precision(scores: np.ndarray, labels: np.ndarray, *, inclusion: np.ndarray | None = None) -> float:
    """The mean over the positives of the precision among the tokens scoring at least as high (ties enter together);
    NaN without positives. A constant score gives the base rate. With `inclusion`, over the population a sample
    stands for: each sampled positive weighted 1/p; a sampled token stands for 1/p tokens but is itself one of them,
    so in its own precision it counts once and the others by their weights (the weighted plug-in would let a heavily
    weighted positive vouch for its own precision 1/p times)."""
    s = np.asarray(scores, dtype=np.float64)
    p, _ = _design(s.size, inclusion, None)
    keep = np.isfinite(s)
    s, w = s[keep], 1.0 / p[keep]
    y = _labels(labels, keep)
    if not y.any():
        return math.nan
    values, inverse = np.unique(-s, return_inverse=True)  # ascending in -s: highest score first
    at_least_w = np.cumsum(np.bincount(inverse, weights=w, minlength=values.size))[inverse]
    at_least_tp = np.cumsum(np.bincount(inverse, weights=w * y, minlength=values.size))[inverse]
    precision = (at_least_tp - w + 1.0) / (at_least_w - w + 1.0)
    return float((w * precision)[y].sum() / w[y].sum())


def _labels(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    y = np.asarray(labels, dtype=bool)
    if y.shape != keep.shape:
        raise ValueError(f"scores {keep.shape} and labels {y.shape} must have the same shape")
    return y[keep]


def precision_at(scores: np.ndarray, labels: np.ndarray, rate: float = FLAG_RATE) -> tuple[float, float]:
    """(precision, its ceiling) when the top ⌈rate·N⌉ tokens by score are flagged (ties at the cut-off broken by
    token order, as a top-k is). The ceiling min(1, positives / flagged) is what a perfect score reaches."""
    s, y = _clean(scores, labels)
    if s.size == 0:
        return math.nan, math.nan
    k = max(1, math.ceil(round(rate * s.size, 9)))
    top = np.argsort(-s, kind="mergesort")[:k]
    return float(y[top].mean()), min(1.0, float(y.sum()) / k)


def position_score(positions: np.ndarray, labels: np.ndarray, *, inclusion: np.ndarray | None = None
                   ) -> np.ndarray:
    """The position-only baseline: each token scored by the share of targets among the tokens at its position, on
    the same tokens (weighted 1/p when they are a sample: `inclusion`); `labels` may also be a number per token (the
    mean at each position). The best any rule that sees only the position could do (it is fitted on the very tokens
    it is judged on, so it is an upper bound for such rules, not a fair competitor)."""
    pos = np.asarray(positions, dtype=np.int64)
    y = np.asarray(labels, dtype=np.float64)
    w = np.ones(pos.size) if inclusion is None else 1.0 / np.asarray(inclusion, dtype=np.float64)
    n = np.bincount(pos, weights=w)
    hits = np.bincount(pos, weights=w * y, minlength=n.size)
    return (hits / np.where(n > 0, n, 1.0))[pos]


@dataclass(frozen=True)
class DetectorScore:
    auroc: float
    average_precision: float
    precision: float  # among the top `rate` of tokens by score
    ceiling: float  # the precision a perfect score reaches there


def judge(scores: np.ndarray, labels: np.ndarray, rate: float = FLAG_RATE) -> DetectorScore:
    """All three metrics of one score against one target."""
    p, c = precision_at(scores, labels, rate)
    return DetectorScore(auroc(scores, labels), average_precision(scores, labels), p, c)


def baselines(positions: np.ndarray, labels: np.ndarray, *, seed: int = 0) -> dict[str, np.ndarray]:
    """The three baselines' scores for these tokens: every token alike ("all": flags everything, so its precision is
    the base rate), a uniform random score ("random": flags at the same rate by chance, seeded), the position-only
    rule ("position", `position_score`)."""
    n = np.asarray(labels).size
    return {
        "all": np.zeros(n),
        "random": np.random.default_rng(seed).random(n),
        "position": position_score(positions, labels),
    }


STEP_COLUMNS = ["step", "target", "predictor", "auroc", "average_precision", "precision", "ceiling", "rate",
                "base_rate", "tokens"]


def step_metrics(tokens: pd.DataFrame, targets: dict[str, str], *, rate: float = FLAG_RATE, seed: int = 0,
                 scores: tuple[str, ...] = SCORES) -> pd.DataFrame:
    """Per step, target and predictor (a score or a baseline): auroc, average_precision, precision among the top
    `rate` of tokens, its ceiling, the rate, the target's base rate and the token count. Long format, one row each.

    `tokens` has a `step`, a `position`, the `scores` columns and one boolean column per target; `targets` maps a
    target's name to its column. A score with no finite value at a step (not recorded) is left out there."""
    rows = []
    for step, g in tokens.groupby("step", sort=True):
        for target, column in targets.items():
            y = g[column].to_numpy(dtype=bool)
            predictors = {s: g[s].to_numpy(dtype=np.float64, na_value=np.nan) for s in scores}
            predictors.update(baselines(g["position"].to_numpy(), y, seed=seed + int(step)))
            for name, score in predictors.items():
                if not np.isfinite(score).any():
                    continue  # e.g. group_js, recorded only when a selector or `group_js=True` asked for it
                m = judge(score, y, rate)
                rows.append({"step": int(step), "target": target, "predictor": name, "auroc": m.auroc,
                             "average_precision": m.average_precision, "precision": m.precision,
                             "ceiling": m.ceiling, "rate": rate, "base_rate": float(y.mean()), "tokens": int(y.size)})
    return pd.DataFrame(rows, columns=STEP_COLUMNS)
