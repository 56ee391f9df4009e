"""Captured tensors -> store columns (numpy), and the per-step accumulator of statistics over ALL tokens.

Tensors stay on the training device while a step runs; `StepAccumulator.collect` moves the aggregates to the CPU once
per step (after TRL's own synchronisation), so the hot path only queues device tensors. The record columns
(`token_columns`, `fork_columns`, `completion_columns`, which also decodes the text) run on the callback's worker
thread, not on the training thread.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from forkwatch.plugin.metrics import PERCENTILES, covariance, summarize_many
from forkwatch.store.spectrum import spectrum_counts


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", non_blocking=False).numpy()


@dataclass
class TokenBatch:
    """One loss micro-batch's (B, T) tensors and the token rows of it to record (`take`). The training thread keeps
    references only (detached; nothing modifies them afterwards); `token_rows`, on the worker, computes the
    covariance and copies the rows out, for many micro-batches at once."""

    STATS = ("logprob", "entropy", "renyi2", "group_js", "covariance", "selected")  # token_rows' statistics
    IDS = ("completion_id", "position", "token_id")  # token_rows' ids, after the step

    take: torch.Tensor  # (B, T) bool: recorded completions' response tokens
    logprob: torch.Tensor  # (B, T)
    entropy: torch.Tensor
    renyi2: torch.Tensor
    group_js: torch.Tensor | None  # None when it was not computed (a null column)
    selected: torch.Tensor | None  # (B, T) gradient weight; None: 1 everywhere (nothing selects)
    is_fork: torch.Tensor  # (B, T) bool
    advantages: torch.Tensor  # (B,) or (B, T)
    mask: torch.Tensor  # (B, T) response-token mask: the covariance's means are over it
    completion_id: torch.Tensor  # (B,) int64
    token_id: torch.Tensor  # (B, T)

    def shape_key(self) -> tuple:
        """Batches with equal keys are stacked and copied out together (`token_rows`)."""
        return (tuple(self.take.shape), self.take.device, self.advantages.dim(), self.group_js is None,
                self.selected is None)


@torch.no_grad()  # grad mode is per thread: this runs on the worker
def token_rows(steps: list[int], batches: list[TokenBatch]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The recorded tokens of same-shaped batches (batch i of step steps[i]), stacked into (K, B, T) so that the
    copy costs the same ~25 tensor ops for K micro-batches as for one. -> (N, 6) float32 statistics (STATS order),
    (N, 4) int64 step and ids (IDS order) and (N,) bool is_fork."""
    def stack(name: str) -> torch.Tensor:
        return torch.stack([getattr(b, name) for b in batches])

    take, lp = stack("take"), stack("logprob").float()
    k, b, t = take.shape
    gjs = torch.full_like(lp, math.nan) if batches[0].group_js is None else stack("group_js").float()
    cov = covariance(lp, stack("advantages"), stack("mask"))
    selected = torch.ones_like(lp) if batches[0].selected is None else stack("selected").float()
    stats = torch.stack([lp, stack("entropy").float(), stack("renyi2").float(), gjs, cov, selected], dim=-1)[take]
    step = torch.tensor(steps, device=take.device).view(k, 1, 1).expand(k, b, t)
    ids = torch.stack([step, stack("completion_id").unsqueeze(-1).expand(k, b, t),
                       torch.arange(t, device=take.device).expand(k, b, t), stack("token_id").long()], dim=-1)
    return stats, ids[take], stack("is_fork")[take]


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
    """Recorded completions of one micro-batch: rows `gen_rows` of a generation batch (micro-batch rows `idx`),
    indexed on the worker (a GenBatch's tensors are not modified once built), and their mean entropy over `mask`."""

    FIELDS = ("completion_id", "group_id", "reward", "rewards", "advantage", "length", "truncated")
    RAGGED = ("prompt_ids", "prompt_mask", "completion_ids")  # padded per generation batch: widths differ

    gen: GenBatch
    gen_rows: torch.Tensor  # (n,) long
    idx: torch.Tensor  # (n,) long
    entropy: torch.Tensor  # (B, T) of the micro-batch
    mask: torch.Tensor  # (B, T)
    reward_names: tuple[str, ...]


@dataclass
class StepAccumulator:
    """Everything one rank saw in the loss passes of one optimizer step."""

    # per token / per completion; effective_rank: per measured completion (only on due steps)
    SERIES = ("entropy", "renyi2", "group_js", "rewards", "lengths", "truncated", "effective_rank")
    COUNTS = ("n_forks", "n_selected")

    # per micro-batch: (series names, their sizes, their values joined into one 1-D tensor)
    values: list[tuple[tuple[str, ...], tuple[int, ...], torch.Tensor]] = field(default_factory=list)
    select_metrics: dict[str, list[float]] = field(default_factory=dict)
    tokens: list[TokenBatch] = field(default_factory=list)
    forks: list[ForkBatch] = field(default_factory=list)
    completions: list[CompletionBatch] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, **series: torch.Tensor) -> None:
        """One micro-batch's SERIES (1-D tensors) and COUNTS (one-element tensors), joined into one tensor now so
        that `collect` copies the whole step to the CPU at once."""
        self.values.append((tuple(series), tuple(v.numel() for v in series.values()), torch.cat(list(series.values()))))

    def merge(self, other: StepAccumulator) -> None:
        """Append `other`'s captures (a step whose on_step_end never came) to this one."""
        for name in ("values", "tokens", "forks", "completions"):
            getattr(self, name).extend(getattr(other, name))
        for k, v in other.select_metrics.items():
            self.select_metrics.setdefault(k, []).extend(v)
        self.seconds += other.seconds

    def collect(self) -> dict[str, Any]:
        """Picklable summary for the cross-rank gather: per-token values as numpy, counts as numbers. Everything
        crosses to the CPU in one copy (one device synchronisation)."""
        flat = _np(torch.cat([v for _, _, v in self.values]).double()) if self.values else np.zeros(0)
        found: dict[str, list[np.ndarray]] = {name: [] for name in (*self.SERIES, *self.COUNTS)}
        at = 0
        for names, sizes, _ in self.values:
            for name, n in zip(names, sizes, strict=True):
                found[name].append(flat[at : at + n])
                at += n
        out: dict[str, Any] = {name: np.concatenate(found[name]) if found[name] else np.zeros(0)
                               for name in self.SERIES}
        out.update({name: float(sum(x.sum() for x in found[name])) for name in self.COUNTS})
        out["select_metrics"] = {k: list(v) for k, v in self.select_metrics.items()}
        out["seconds"] = self.seconds
        return out


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

    def metric(name: str) -> float | None:
        vals = sel_metrics.get(name)
        return float(np.mean(vals)) if vals else None

    reward_mean, length_mean, truncated_fraction = _finite_means(np.stack([rewards, lengths, truncated]))
    row: dict[str, Any] = {
        "step": step,
        "time": np.datetime64("now", "ms"),
        "n_tokens": n,
        "n_completions": int(rewards.size),
        **summarize_many({"entropy": ent, "renyi2": ren, **({"group_js": gjs} if gjs.size else {})}),
        "fork_fraction": sum(p["n_forks"] for p in parts) / n if n else math.nan,
        "selected_fraction": sum(p["n_selected"] for p in parts) / n if n else math.nan,
        "select_method": select_method,
        "select_threshold": metric("threshold"),
        "select_warmup": None if metric("warmup") is None else bool(metric("warmup") > 0.5),
        "reward_mean": reward_mean,
        "reward_std": _std(rewards),
        "completion_length_mean": length_mean,
        "truncated_fraction": truncated_fraction,
        "forkwatch_seconds": float(max(p["seconds"] for p in parts)) if parts else 0.0,
        "dropped_records": int(dropped),
    }
    ranks = np.concatenate([p["effective_rank"] for p in parts])
    ranks = ranks[np.isfinite(ranks)]
    row["entropy_spectrum"] = spectrum_counts(ent)
    row["effective_rank_mean"] = float(ranks.mean()) if ranks.size else None  # null: not measured this step
    if not gjs.size:  # not computed this step: null, not NaN
        row.update(dict.fromkeys(("group_js_mean", *(f"group_js_p{round(q * 100)}" for q in PERCENTILES))))
    row["_select_metrics"] = {k: float(np.mean(v)) for k, v in sel_metrics.items() if v}
    return row


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


def token_columns(steps: list[tuple[int, list[TokenBatch]]]) -> dict[str, np.ndarray]:
    """TOKENS columns (minus run_id) of several steps' token batches: [(step, batches), ...]."""
    groups: dict[tuple, tuple[list[int], list[TokenBatch]]] = {}
    for step, bs in steps:
        for b in bs:
            g = groups.setdefault(b.shape_key(), ([], []))
            g[0].append(step)
            g[1].append(b)
    parts = [token_rows(*g) for g in groups.values()]
    stats, ids = _np(torch.cat([p[0] for p in parts])), _np(torch.cat([p[1] for p in parts]))
    cols: dict[str, np.ndarray | None] = {"step": ids[:, 0].astype(np.int32)}
    cols.update({name: ids[:, i + 1].astype(np.int64 if name == "completion_id" else np.int32)
                 for i, name in enumerate(TokenBatch.IDS)})
    cols.update({name: np.ascontiguousarray(stats[:, i]) for i, name in enumerate(TokenBatch.STATS)})
    if all(b.group_js is None for _, bs in steps for b in bs):
        cols["group_js"] = None  # a null column, not NaN, when group_js was not computed
    cols["is_fork"] = _np(torch.cat([p[2] for p in parts]))
    return cols


def _step_column(steps: list[tuple[int, list[Any]]], rows: Any) -> np.ndarray:
    """int32 step of every row: each step repeated over the rows of its batches (`rows(batch)` of each)."""
    counts = [sum(int(rows(b)) for b in bs) for _, bs in steps]
    return np.repeat(np.array([s for s, _ in steps], np.int32), counts)


def fork_columns(steps: list[tuple[int, list[ForkBatch]]]) -> dict[str, Any]:
    """FORKS columns (minus run_id) of several steps' fork batches: [(step, batches), ...]."""
    batches = [b for _, bs in steps for b in bs]
    ids = _np(torch.cat([b.alt_ids for b in batches])).astype(np.int32)
    probs = _np(torch.cat([b.alt_probs for b in batches]).float()).astype(np.float32)
    return {
        "step": _step_column(steps, lambda b: b.alt_ids.size(0)),
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


def completion_columns(steps: list[tuple[int, list[CompletionBatch]]], rank: int, tokenizer) -> dict[str, Any]:
    """COMPLETIONS columns (minus run_id) of several steps; decodes prompt and completion text. Worker thread: each
    generation batch crosses to numpy once, and rows are picked there (numpy indexing costs a fraction of torch's
    per call, and this thread shares the interpreter with training)."""
    batches = [b for _, bs in steps for b in bs]
    host = {id(b.gen): b.gen for b in batches}
    arrays = {key: {f: _np(getattr(g, f)) for f in (*CompletionBatch.FIELDS, *CompletionBatch.RAGGED)
                    if getattr(g, f) is not None} for key, g in host.items()}
    cols: dict[str, list[np.ndarray]] = {}
    prompts: list[tuple[int, ...]] = []
    completions: list[list[int]] = []
    for b in batches:
        a, rows, idx = arrays[id(b.gen)], _np(b.gen_rows), _np(b.idx)
        for f in CompletionBatch.FIELDS:
            if f in a:
                cols.setdefault(f, []).append(a[f][rows])
        length = a["length"][rows]
        prompts += [tuple(p[m.astype(bool)].tolist()) for p, m in zip(a["prompt_ids"][rows], a["prompt_mask"][rows],
                                                                      strict=True)]
        completions += [c[:k].tolist() for c, k in zip(a["completion_ids"][rows], length, strict=True)]
        ent, valid = _np(b.entropy)[idx], _np(b.mask)[idx] != 0
        cols.setdefault("entropy_mean", []).append((ent * valid).sum(1) / np.maximum(valid.sum(1), 1))
    c = {f: np.concatenate(v) for f, v in cols.items()}
    n = len(c["completion_id"])
    # a prompt comes back once per rollout of its group (and again under num_iterations): decode each one once
    unique = list(dict.fromkeys(prompts))
    prompt_text = dict(zip(unique, decode(tokenizer, [list(u) for u in unique]), strict=True))
    return {
        "step": _step_column(steps, lambda b: b.idx.numel()),
        "rank": np.full(n, rank, np.int16),
        "completion_id": c["completion_id"],
        "group_id": c["group_id"],
        "prompt": [prompt_text[p] for p in prompts],
        "completion": decode(tokenizer, completions),
        "rewards": _reward_maps(c.get("rewards"), batches[0].reward_names, n),
        "reward": c["reward"].astype(np.float32),
        "advantage": c["advantage"].astype(np.float32),
        "length": c["length"].astype(np.int32),
        "truncated": c["truncated"].astype(bool),
        "entropy_mean": c["entropy_mean"].astype(np.float32),
    }


def decode(tokenizer, seqs: list[list[int]]) -> list[str]:
    """`tokenizer.batch_decode(seqs, skip_special_tokens=True)`. A fast tokenizer whose decoding transformers does not
    change (no clean-up, methods not overridden) is decoded by its backend directly, which is what `_decode` would do:
    the same strings without transformers' per-token type checks, a third of this thread's completion-column time."""
    if _plain_fast_tokenizer(type(tokenizer)) and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return tokenizer.backend_tokenizer.decode_batch(seqs, skip_special_tokens=True)
    return tokenizer.batch_decode(seqs, skip_special_tokens=True)


@functools.cache
def _plain_fast_tokenizer(cls: type) -> bool:
    try:
        from transformers import PreTrainedTokenizerFast as Fast
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase as Base
    except ImportError:  # pragma: no cover - transformers always present with the plugin
        return False
    return (issubclass(cls, Fast) and cls._decode is Fast._decode and cls.decode is Base.decode
            and cls.batch_decode is Base.batch_decode)


def _reward_maps(values: np.ndarray | None, names: tuple[str, ...], n: int) -> pa.Array:
    """(n, F) per-function rewards -> n maps {function name: value}, built from flat arrays (no dict per row)."""
    mtype = pa.map_(pa.string(), pa.float32())
    if values is None:
        return pa.nulls(n, mtype)
    f = len(names)
    offsets = pa.array(np.arange(0, (n + 1) * f, f, dtype=np.int32))
    keys = pa.array(list(names) * n, pa.string())
    return pa.MapArray.from_arrays(offsets, keys, pa.array(values.reshape(-1).astype(np.float32)), type=mtype)
