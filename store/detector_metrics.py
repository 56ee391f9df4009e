"""How well a per-token score finds the tokens that matter, against any boolean target: AUROC, average precision,
and precision among the tokens it flags against the best any score could reach there, with three baselines, per
step. numpy and pandas only (no sklearn, no torch): each metric is a few lines, tested against hand-computed cases
(tests/store/test_detector_metrics.py). The demo's ground truth (store/ground_truth.py) is one target; any other
per-token target (a measured fork value above its error, say) is judged by the same functions.

A score predicts a boolean target per token (e.g. "this token is a consequential decision"); higher means "more
likely a target". Ties are handled as the standard definitions say: AUROC counts a tied positive/negative pair as
one half (the Mann-Whitney statistic with average ranks), and average precision steps through distinct score values
(all tied tokens enter the flagged set together), as scikit-learn's `average_precision_score` does.
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


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks of `s` ascending, tied values sharing the mean of their ranks."""
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + 1 + b) / 2.0  # mean of ranks a+1 .. b
    return ranks


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative) + ½ P(tie); NaN without both classes."""
    s, y = _clean(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    r = _average_ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Σ_k (R_k − R_{k−1})·P_k over the distinct score values, highest first (P_k, R_k: precision and recall of
    flagging every token scoring ≥ the k-th value); NaN without positives. A constant score gives the base rate."""
    s, y = _clean(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[s[1:] != s[:-1], True]  # the last token of each run of tied scores
    tp = np.cumsum(y)[last]
    flagged = (np.flatnonzero(last) + 1).astype(np.float64)
    recall = tp / n_pos
    precision = tp / flagged
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def precision_at(scores: np.ndarray, labels: np.ndarray, rate: float = FLAG_RATE) -> tuple[float, float]:
    """(precision, its ceiling) when the top ⌈rate·N⌉ tokens by score are flagged (ties at the cut-off broken by
    token order, as a top-k is). The ceiling min(1, positives / flagged) is what a perfect score reaches."""
    s, y = _clean(scores, labels)
    if s.size == 0:
        return math.nan, math.nan
    k = max(1, math.ceil(round(rate * s.size, 9)))
    top = np.argsort(-s, kind="mergesort")[:k]
    return float(y[top].mean()), min(1.0, float(y.sum()) / k)


def position_score(positions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The position-only baseline: each token scored by the share of targets among the tokens at its position, on
    the same tokens. The best any rule that sees only the position could do (it is fitted on the very tokens it is
    judged on, so it is an upper bound for such rules, not a fair competitor)."""
    pos = np.asarray(positions, dtype=np.int64)
    y = np.asarray(labels, dtype=np.float64)
    n = np.bincount(pos)
    hits = np.bincount(pos, weights=y, minlength=n.size)
    return (hits / np.maximum(n, 1))[pos]


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
