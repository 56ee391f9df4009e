"""A step's `steps` row from every rank's `StepAccumulator.collect()`: numpy only (rank 0, training thread, at the end
of the step). No torch here: the device values crossed to the host once, in `collect`.

A statistic that is undefined for a step (a mean of no values, a standard deviation of fewer than two, a fraction
of zero tokens, a selector diagnostic of micro-batches whose advantages are all 0) is None, stored as NULL: NaN in a
stored column would read as a measured value that went wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from forkwatch.store.schema import STEP_PERCENTILES, STEPS, boolean_columns, percentile_name
from forkwatch.store.spectrum import spectrum_counts

SELECT_PREFIX = "select_"  # metric m of the selector fills the STEPS column select_<m>, when the schema has one
_SELECT_COLUMNS = frozenset(n for n in STEPS.names if n.startswith(SELECT_PREFIX) and n != "select_method")
_BOOLEAN = boolean_columns(STEPS)
_PERCENTILE_NAMES = tuple(percentile_name(q) for q in STEP_PERCENTILES)
_QS = np.asarray(STEP_PERCENTILES, dtype=np.float64)


def select_means(parts: list[dict[str, Any]]) -> dict[str, float | None]:
    """Each selector metric's mean over the step's micro-batches of every rank where it is defined (finite); None
    where it is defined in none (e.g. grad_share when every advantage of the step is 0)."""
    found: dict[str, list[float]] = {}
    for p in parts:
        for k, v in p["select_metrics"].items():
            found.setdefault(k, []).extend(v)
    out: dict[str, float | None] = {}
    for k, v in found.items():
        finite = [x for x in v if math.isfinite(x)]
        out[k] = math.fsum(finite) / len(finite) if finite else None
    return out


def steps_row(step: int, parts: list[dict[str, Any]], *, select_method: str | None, dropped: int,
              selected: dict[str, float | None]) -> dict[str, Any]:
    """One `steps` row (STEPS schema minus run_id and time); `selected` is `select_means(parts)`."""
    ent = np.concatenate([p["entropy"] for p in parts])
    ren = np.concatenate([p["renyi2"] for p in parts])
    gjs = np.concatenate([p["group_js"] for p in parts])
    n = int(ent.size)
    rewards = np.concatenate([p["rewards"] for p in parts])
    lengths = np.concatenate([p["lengths"] for p in parts])
    truncated = np.concatenate([p["truncated"] for p in parts])
    reward_mean, length_mean, truncated_fraction = finite_means(np.stack([rewards, lengths, truncated]))
    row: dict[str, Any] = {
        "step": step,
        "n_tokens": n,
        "n_completions": int(rewards.size),
        # one sort for all three when group_js was computed; all its statistics None when not
        **summarize_many({"entropy": ent, "renyi2": ren, **({"group_js": gjs} if gjs.size else {})}),
        **({} if gjs.size else _NO_GROUP_JS),
        "fork_fraction": sum(p["n_forks"] for p in parts) / n if n else None,
        "selected_fraction": sum(p["n_selected"] for p in parts) / n if n else None,
        "select_method": select_method,
        "reward_mean": reward_mean,
        "reward_std": sample_std(rewards),
        "completion_length_mean": length_mean,
        "truncated_fraction": truncated_fraction,
        "forkwatch_seconds": float(max(p["seconds"] for p in parts)) if parts else 0.0,
        "dropped_records": int(dropped),
    }
    for name, value in selected.items():
        col = SELECT_PREFIX + name
        if col in _SELECT_COLUMNS:  # a boolean column holds "true in most micro-batches"
            row[col] = bool(value > 0.5) if col in _BOOLEAN and value is not None else value
    ranks = np.concatenate([p.get("effective_rank", np.zeros(0)) for p in parts])
    ranks = ranks[np.isfinite(ranks)]
    row["entropy_spectrum"] = spectrum_counts(ent)
    row["effective_rank_mean"] = float(ranks.mean()) if ranks.size else None  # null: not measured this step
    return row


def percentiles(values: np.ndarray, qs: Sequence[float] = STEP_PERCENTILES) -> list:
    """Linear-interpolated quantiles (numpy's default method) of a 1-D array -> list of floats, None for an empty one;
    of each row of a 2-D array -> one list per row.

    One sort and a vectorised lerp: `np.quantile` costs ~50 us of dispatch per call, which on a small step was a
    visible share of forkwatch's per-step time.
    """
    if values.shape[-1] == 0:
        none = [None] * len(qs)
        return none if values.ndim == 1 else [none for _ in range(values.shape[0])]
    a = np.sort(values.astype(np.float64, copy=False), axis=-1)
    n = a.shape[-1]
    h = (n - 1) * (_QS if qs is STEP_PERCENTILES else np.asarray(qs, dtype=np.float64))
    lo = np.floor(h).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    t, below, above = h - lo, a[..., lo], a[..., hi]
    diff = above - below
    # numpy's _lerp: from the nearer end, so that t = 1 gives `above` exactly
    return np.where(t >= 0.5, above - diff * (1 - t), below + diff * t).tolist()


def summarize_many(series: dict[str, np.ndarray]) -> dict[str, float | None]:
    """{<name>_mean, <name>_p10, ...} (the STEP_PERCENTILES) of same-length arrays (a step's entropy and renyi2) with
    one sort and one mean (token-weighted); None for every statistic of an empty array."""
    if len({v.size for v in series.values()}) > 1:
        return {k: x for prefix, v in series.items() for k, x in summarize_many({prefix: v}).items()}
    v = np.stack([a.astype(np.float64, copy=False) for a in series.values()])  # (k, n)
    means = v.mean(1).tolist() if v.shape[1] else [None] * len(series)
    out = {}
    for prefix, mean, pct in zip(series, means, percentiles(v), strict=True):
        out[f"{prefix}_mean"] = mean
        out.update({f"{prefix}_{name}": x for name, x in zip(_PERCENTILE_NAMES, pct, strict=True)})
    return out


_NO_GROUP_JS = summarize_many({"group_js": np.zeros(0)})  # every statistic None: group_js was not computed


def finite_means(rows: np.ndarray) -> list[float | None]:
    """Mean of the finite values of each row (None for a row with none), in a few numpy calls for all rows."""
    finite = np.isfinite(rows)
    count = finite.sum(1)
    total = np.where(finite, rows, 0.0).sum(1)
    return [float(t / c) if c else None for t, c in zip(total.tolist(), count.tolist(), strict=True)]


def sample_std(a: np.ndarray) -> float | None:
    """Sample standard deviation (ddof 1) of the non-NaN values; None under two of them."""
    a = a[~np.isnan(a)]
    return float(np.sqrt(((a - a.mean()) ** 2).sum() / (a.size - 1))) if a.size > 1 else None
