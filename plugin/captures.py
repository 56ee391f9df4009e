"""What the loss passes capture (device tensors, referenced not copied), and the per-step accumulator of statistics
over ALL tokens.

Tensors stay on the training device while a step runs; `StepAccumulator.collect` moves the aggregates to the CPU once
per step (after TRL's own synchronisation), so the hot path only queues device tensors. The recorded rows cross to
the host at a hand-off (plugin/record_copy.py), on the training thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from forkwatch.plugin.metrics import covariance, no_grad


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """The one device -> host copy of a tensor (a free view on a CPU device)."""
    return t.detach().to("cpu", non_blocking=False).numpy()


@dataclass
class TokenBatch:
    """One loss micro-batch's (B, T) tensors and the token rows of it to record (`take`). The loss pass keeps
    references only (detached; nothing modifies them afterwards); `token_rows`, at a hand-off, computes the
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


@no_grad
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
    are found by completion id (plugin/row_ids.py `rows_in_generation`)."""

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
    indexed at the hand-off (a GenBatch's tensors are not modified once built), and their mean entropy over `mask`."""

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
        flat = to_numpy(torch.cat([v for _, _, v in self.values]).double()) if self.values else np.zeros(0)
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
