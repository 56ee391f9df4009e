"""Captured tensors -> store columns (numpy), and the per-step accumulator of statistics over ALL tokens.

Tensors stay on the training device while a step runs; `StepAccumulator.collect` moves them to the CPU once per step
(one synchronisation, after TRL's own), so the hot path only queues device tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from forkwatch.plugin.metrics import summarize


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", non_blocking=False).numpy()


@dataclass
class TokenBatch:
    """Token rows of recorded completions from one micro-batch, device tensors. N rows."""

    completion_id: torch.Tensor  # (N,) int64
    position: torch.Tensor  # (N,)
    token_id: torch.Tensor  # (N,)
    logprob: torch.Tensor
    entropy: torch.Tensor
    renyi2: torch.Tensor
    group_js: torch.Tensor | None
    covariance: torch.Tensor
    selected: torch.Tensor
    is_fork: torch.Tensor


@dataclass
class ForkBatch:
    """Top-k alternatives at fork positions of recorded completions. F rows."""

    completion_id: torch.Tensor  # (F,)
    position: torch.Tensor  # (F,)
    sampled_rank: torch.Tensor  # (F,)
    alt_ids: torch.Tensor  # (F, k)
    alt_probs: torch.Tensor  # (F, k)


@dataclass
class StepAccumulator:
    """Everything one rank saw in the loss passes of one optimizer step."""

    entropy: list[torch.Tensor] = field(default_factory=list)  # masked values, (n_i,) each
    renyi2: list[torch.Tensor] = field(default_factory=list)
    group_js: list[torch.Tensor] = field(default_factory=list)
    n_forks: list[torch.Tensor] = field(default_factory=list)
    n_selected: list[torch.Tensor] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)  # one per completion trained on this step
    lengths: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    select_metrics: dict[str, list[float]] = field(default_factory=dict)
    tokens: list[TokenBatch] = field(default_factory=list)
    forks: list[ForkBatch] = field(default_factory=list)
    completions: list[dict[str, Any]] = field(default_factory=list)  # completion rows, already columns per row
    seconds: float = 0.0

    def collect(self) -> dict[str, Any]:
        """Picklable summary for the cross-rank gather: per-token values as numpy, counts as numbers."""
        cat = lambda xs: _np(torch.cat(xs).float()) if xs else np.zeros(0, np.float32)  # noqa: E731
        return {
            "entropy": cat(self.entropy),
            "renyi2": cat(self.renyi2),
            "group_js": cat(self.group_js),
            "n_forks": float(sum(float(x) for x in self.n_forks)),
            "n_selected": float(sum(float(x) for x in self.n_selected)),
            "rewards": list(self.rewards),
            "lengths": list(self.lengths),
            "truncated": list(self.truncated),
            "select_metrics": {k: list(v) for k, v in self.select_metrics.items()},
            "seconds": self.seconds,
        }


def step_row(step: int, parts: list[dict[str, Any]], *, select_method: str | None, dropped: int) -> dict[str, Any]:
    """One `steps` row from every rank's `collect()` (STEPS schema minus run_id)."""
    ent = np.concatenate([p["entropy"] for p in parts])
    ren = np.concatenate([p["renyi2"] for p in parts])
    gjs = np.concatenate([p["group_js"] for p in parts])
    n = int(ent.size)
    rewards = np.asarray([r for p in parts for r in p["rewards"]], dtype=np.float64)
    lengths = np.asarray([x for p in parts for x in p["lengths"]], dtype=np.float64)
    truncated = np.asarray([x for p in parts for x in p["truncated"]], dtype=np.float64)
    sel_metrics: dict[str, list[float]] = {}
    for p in parts:
        for k, v in p["select_metrics"].items():
            sel_metrics.setdefault(k, []).extend(v)

    def mean(a: np.ndarray) -> float:
        finite = a[np.isfinite(a)]
        return float(finite.mean()) if finite.size else math.nan

    def metric(name: str) -> float | None:
        vals = sel_metrics.get(name)
        return float(np.mean(vals)) if vals else None

    row: dict[str, Any] = {
        "step": step,
        "time": np.datetime64("now", "ms"),
        "n_tokens": n,
        "n_completions": int(rewards.size),
        **summarize(ent, "entropy"),
        **summarize(ren, "renyi2"),
        **summarize(gjs, "group_js"),
        "fork_fraction": sum(p["n_forks"] for p in parts) / n if n else math.nan,
        "selected_fraction": sum(p["n_selected"] for p in parts) / n if n else math.nan,
        "select_method": select_method,
        "select_threshold": metric("threshold"),
        "select_warmup": None if metric("warmup") is None else bool(metric("warmup") > 0.5),
        "reward_mean": mean(rewards),
        "reward_std": float(np.nanstd(rewards, ddof=1)) if rewards.size > 1 else math.nan,
        "completion_length_mean": mean(lengths),
        "truncated_fraction": mean(truncated),
        "forkwatch_seconds": float(max(p["seconds"] for p in parts)) if parts else 0.0,
        "dropped_records": int(dropped),
    }
    if not gjs.size:  # not computed this step: null, not NaN
        for k in list(row):
            if k.startswith("group_js_"):
                row[k] = None
    row["_select_metrics"] = {k: float(np.mean(v)) for k, v in sel_metrics.items() if v}
    return row


def token_columns(step: int, batches: list[TokenBatch]) -> dict[str, np.ndarray]:
    """TOKENS columns (minus run_id) from the step's token batches."""

    def cat(name: str, dtype) -> np.ndarray:
        return _np(torch.cat([getattr(b, name) for b in batches])).astype(dtype, copy=False)

    n = sum(int(b.completion_id.numel()) for b in batches)
    gjs_np = None  # null column when group_js was not computed
    if any(b.group_js is not None for b in batches):
        gjs = [b.group_js if b.group_js is not None else torch.full_like(b.entropy, float("nan")) for b in batches]
        gjs_np = _np(torch.cat(gjs)).astype(np.float32, copy=False)
    return {
        "step": np.full(n, step, np.int32),
        "completion_id": cat("completion_id", np.int64),
        "position": cat("position", np.int32),
        "token_id": cat("token_id", np.int32),
        "logprob": cat("logprob", np.float32),
        "entropy": cat("entropy", np.float32),
        "renyi2": cat("renyi2", np.float32),
        "group_js": gjs_np,
        "covariance": cat("covariance", np.float32),
        "selected": cat("selected", np.float32),
        "is_fork": cat("is_fork", np.bool_),
    }


def fork_columns(step: int, batches: list[ForkBatch]) -> dict[str, Any]:
    """FORKS columns (minus run_id)."""
    ids = _np(torch.cat([b.alt_ids for b in batches])).astype(np.int32)
    probs = _np(torch.cat([b.alt_probs for b in batches]).float()).astype(np.float32)
    n = ids.shape[0]
    return {
        "step": np.full(n, step, np.int32),
        "completion_id": _np(torch.cat([b.completion_id for b in batches])).astype(np.int64),
        "position": _np(torch.cat([b.position for b in batches])).astype(np.int32),
        "sampled_rank": np.minimum(_np(torch.cat([b.sampled_rank for b in batches])), 32767).astype(np.int16),
        "alt_token_ids": _lists(ids, pa.int32()),
        "alt_probs": _lists(probs, pa.float32()),
    }


def _lists(values: np.ndarray, type_: pa.DataType) -> pa.ListArray:
    """(N, k) -> N lists of k, without a Python object per row."""
    n, k = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=type_))


def completion_columns(step: int, rank: int, rows: list[dict[str, Any]]) -> dict[str, list]:
    """COMPLETIONS columns (minus run_id) from per-completion dicts."""
    keys = ("completion_id", "group_id", "prompt", "completion", "rewards", "reward", "advantage", "length",
            "truncated", "entropy_mean")
    cols: dict[str, list] = {"step": [step] * len(rows), "rank": [rank] * len(rows)}
    for k in keys:
        cols[k] = [r[k] for r in rows]
    return cols
