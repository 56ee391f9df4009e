"""One `steps` row per optimizer step, from every rank's `StepAccumulator.collect()` (rank 0, training thread)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
from forkwatch.plugin.metrics import PERCENTILES, summarize_many
from forkwatch.store.schema import STEPS
from forkwatch.store.spectrum import spectrum_counts

SELECT_PREFIX = "select_"  # metric m of the selector fills the STEPS column select_<m>, when the schema has one


def select_means(parts: list[dict[str, Any]]) -> dict[str, float]:
    """Each selector metric's mean over the step's micro-batches of every rank."""
    found: dict[str, list[float]] = {}
    for p in parts:
        for k, v in p["select_metrics"].items():
            found.setdefault(k, []).extend(v)
    return {k: float(np.mean(v)) for k, v in found.items() if v}


def step_row(step: int, parts: list[dict[str, Any]], *, select_method: str | None, dropped: int,
             selected: dict[str, float]) -> dict[str, Any]:
    """One `steps` row (STEPS schema minus run_id and time); `selected` is `select_means(parts)`."""
    ent = np.concatenate([p["entropy"] for p in parts])
    ren = np.concatenate([p["renyi2"] for p in parts])
    gjs = np.concatenate([p["group_js"] for p in parts])
    n = int(ent.size)
    rewards = np.concatenate([p["rewards"] for p in parts])
    lengths = np.concatenate([p["lengths"] for p in parts])
    truncated = np.concatenate([p["truncated"] for p in parts])
    reward_mean, length_mean, truncated_fraction = _finite_means(np.stack([rewards, lengths, truncated]))
    row: dict[str, Any] = {
        "step": step,
        "n_tokens": n,
        "n_completions": int(rewards.size),
        **summarize_many({"entropy": ent, "renyi2": ren, **({"group_js": gjs} if gjs.size else {})}),
        "fork_fraction": sum(p["n_forks"] for p in parts) / n if n else math.nan,
        "selected_fraction": sum(p["n_selected"] for p in parts) / n if n else math.nan,
        "select_method": select_method,
        "reward_mean": reward_mean,
        "reward_std": _std(rewards),
        "completion_length_mean": length_mean,
        "truncated_fraction": truncated_fraction,
        "forkwatch_seconds": float(max(p["seconds"] for p in parts)) if parts else 0.0,
        "dropped_records": int(dropped),
    }
    for name, value in selected.items():
        col = SELECT_PREFIX + name
        if col in _SELECT_COLUMNS:  # a boolean column holds "true in most micro-batches"
            row[col] = bool(value > 0.5) if pa.types.is_boolean(_SELECT_COLUMNS[col]) else value
    ranks = np.concatenate([p.get("effective_rank", np.zeros(0)) for p in parts])
    ranks = ranks[np.isfinite(ranks)]
    row["entropy_spectrum"] = spectrum_counts(ent)
    row["effective_rank_mean"] = float(ranks.mean()) if ranks.size else None  # null: not measured this step
    if not gjs.size:  # not computed this step: null, not NaN
        row.update(dict.fromkeys(("group_js_mean", *(f"group_js_p{round(q * 100)}" for q in PERCENTILES))))
    return row


_SELECT_COLUMNS = {f.name: f.type for f in STEPS if f.name.startswith(SELECT_PREFIX) and f.name != "select_method"}


def _finite_means(rows: np.ndarray) -> list[float]:
    """Mean of the finite values of each row (NaN for a row with none), in a few numpy calls for all rows."""
    finite = np.isfinite(rows)
    count = finite.sum(1)
    total = np.where(finite, rows, 0.0).sum(1)
    return np.where(count > 0, total / np.maximum(count, 1), math.nan).tolist()


def _std(a: np.ndarray) -> float:
    """Sample standard deviation (ddof 1) ignoring NaN, NaN under two values: np.nanstd without its dispatch."""
    a = a[~np.isnan(a)]
    return float(np.sqrt(((a - a.mean()) ** 2).sum() / (a.size - 1))) if a.size > 1 else math.nan
