"""Captured tensors -> store columns (numpy), and the per-step accumulator of statistics over ALL tokens.

Tensors stay on the training device while a step runs; `StepAccumulator.collect` moves the aggregates to the CPU once
per step (after TRL's own synchronisation), so the hot path only queues device tensors. The record columns
(`token_columns`, `fork_columns`, `completion_columns`, which also decodes the text) run on the callback's worker
thread, not on the training thread.
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
class GenBatch:
    """Per-completion facts of the current generation batch (b rows, device tensors); rows of the loss micro-batches
    are found by completion id: row = id % 2**20 - offset, valid while id // 2**20 == key."""

    key: int
    offset: int
    completion_id: torch.Tensor  # (b,) int64
    group_id: torch.Tensor  # (b,) int64
    reward: torch.Tensor  # (b,) float32, weighted sum over reward functions (NaN when unknown)
    rewards: torch.Tensor | None  # (b, F) float32 per reward function
    advantage: torch.Tensor  # (b,) float32
    length: torch.Tensor  # (b,) int64, tokens up to and including the first EOS
    truncated: torch.Tensor  # (b,) bool, no EOS within max_completion_length
    sampled: torch.Tensor  # (b,) bool, drawn for recording
    recorded: torch.Tensor  # (b,) bool, already recorded (a row comes back with num_iterations > 1)
    prompt_ids: torch.Tensor  # (b, P)
    prompt_mask: torch.Tensor  # (b, P)
    completion_ids: torch.Tensor  # (b, T)


@dataclass
class CompletionBatch:
    """Recorded completions of one micro-batch (n rows): GenBatch rows plus the loss pass's mean entropy."""

    rows: dict[str, torch.Tensor | None]  # GenBatch field -> (n, ...) tensor
    entropy_mean: torch.Tensor  # (n,)
    reward_names: tuple[str, ...]


@dataclass
class StepAccumulator:
    """Everything one rank saw in the loss passes of one optimizer step."""

    entropy: list[torch.Tensor] = field(default_factory=list)  # masked values, (n_i,) each
    renyi2: list[torch.Tensor] = field(default_factory=list)
    group_js: list[torch.Tensor] = field(default_factory=list)
    n_forks: list[torch.Tensor] = field(default_factory=list)
    n_selected: list[torch.Tensor] = field(default_factory=list)
    rewards: list[torch.Tensor] = field(default_factory=list)  # one value per completion trained on this step
    lengths: list[torch.Tensor] = field(default_factory=list)
    truncated: list[torch.Tensor] = field(default_factory=list)
    select_metrics: dict[str, list[float]] = field(default_factory=dict)
    tokens: list[TokenBatch] = field(default_factory=list)
    forks: list[ForkBatch] = field(default_factory=list)
    completions: list[CompletionBatch] = field(default_factory=list)
    seconds: float = 0.0

    LISTS = ("entropy", "renyi2", "group_js", "n_forks", "n_selected", "rewards", "lengths", "truncated", "tokens",
             "forks", "completions")

    def merge(self, other: StepAccumulator) -> None:
        """Append `other`'s captures (a step whose on_step_end never came) to this one."""
        for name in self.LISTS:
            getattr(self, name).extend(getattr(other, name))
        for k, v in other.select_metrics.items():
            self.select_metrics.setdefault(k, []).extend(v)
        self.seconds += other.seconds

    def collect(self) -> dict[str, Any]:
        """Picklable summary for the cross-rank gather: per-token values as numpy, counts as numbers."""
        cat = lambda xs: _np(torch.cat(xs).double()) if xs else np.zeros(0, np.float64)  # noqa: E731
        count = lambda xs: float(torch.stack(xs).sum()) if xs else 0.0  # noqa: E731  (one sync, not one per item)
        return {
            "entropy": cat(self.entropy),
            "renyi2": cat(self.renyi2),
            "group_js": cat(self.group_js),
            "n_forks": count(self.n_forks),
            "n_selected": count(self.n_selected),
            "rewards": cat(self.rewards),
            "lengths": cat(self.lengths),
            "truncated": cat(self.truncated),
            "select_metrics": {k: list(v) for k, v in self.select_metrics.items()},
            "seconds": self.seconds,
        }


def step_row(step: int, parts: list[dict[str, Any]], *, select_method: str | None, dropped: int) -> dict[str, Any]:
    """One `steps` row from every rank's `collect()` (STEPS schema minus run_id)."""
    ent = np.concatenate([p["entropy"] for p in parts])
    ren = np.concatenate([p["renyi2"] for p in parts])
    gjs = np.concatenate([p["group_js"] for p in parts])
    n = int(ent.size)
    rewards = np.concatenate([p["rewards"] for p in parts])
    lengths = np.concatenate([p["lengths"] for p in parts])
    truncated = np.concatenate([p["truncated"] for p in parts])
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


def completion_columns(step: int, rank: int, batches: list[CompletionBatch], tokenizer) -> dict[str, Any]:
    """COMPLETIONS columns (minus run_id); decodes prompt and completion text (worker thread: not the hot path)."""
    rows = {k: torch.cat([b.rows[k] for b in batches]).cpu() for k in batches[0].rows if batches[0].rows[k] is not None}
    n = int(rows["completion_id"].numel())
    pmask = rows["prompt_mask"].bool()
    length = rows["length"].tolist()
    names = batches[0].reward_names
    per_fn = rows["rewards"].tolist() if "rewards" in rows else None
    cols: dict[str, Any] = {
        "step": [step] * n,
        "rank": [rank] * n,
        "completion_id": rows["completion_id"].tolist(),
        "group_id": rows["group_id"].tolist(),
        "prompt": tokenizer.batch_decode([p[m].tolist() for p, m in zip(rows["prompt_ids"], pmask, strict=True)],
                                         skip_special_tokens=True),
        "completion": tokenizer.batch_decode([c[:k].tolist() for c, k in zip(rows["completion_ids"], length, strict=True)],
                                             skip_special_tokens=True),
        "rewards": [None] * n if per_fn is None else [dict(zip(names, r, strict=True)) for r in per_fn],
        "reward": rows["reward"].tolist(),
        "advantage": rows["advantage"].tolist(),
        "length": length,
        "truncated": rows["truncated"].tolist(),
        "entropy_mean": torch.cat([b.entropy_mean for b in batches]).float().cpu().tolist(),
    }
    return cols
