"""What one rank holds of a step until the hand-off: one carrier per table, named as store/schema.py names its
columns, and the one list of per-token statistics (`TOKEN_STATS`).

    GenBatch          the facts of one generation batch (device tensors), the source of `completions` rows
    CompletionBatch   `completions`: the recorded rows of a GenBatch, as seen by one loss micro-batch
    TokenBatch        `tokens`: one loss micro-batch's (B, T) values and which of its tokens are recorded
    ForkBatch         `forks`: the top-k alternatives at the recorded forks
    StepAccumulator   `steps`: the step's values over EVERY token and completion, and the carriers above

Tensors stay on the training device while a step runs (references, not copies: nothing modifies them afterwards);
`StepAccumulator.collect` moves the step's aggregates to the host once per step, and the recorded rows cross at a
hand-off (plugin/records.py), on the training thread.

Adding a per-token statistic (a float column of `tokens`): its formula in plugin/token_math.py, one `TokenStat` in
`TOKEN_STATS` below (computed from a `TokenBatch`), and its column in store/schema.py's TOKENS. Three files; see
docs/architecture.md and tests/plugin/test_token_stats.py, which adds one that way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from forkwatch.plugin import token_math
from forkwatch.plugin.token_math import no_grad


@dataclass
class TokenBatch:
    """One loss micro-batch, (B, T) over its completion tokens unless said otherwise; after `stack`, each tensor has
    a leading K (K micro-batches of one shape, stacked so that a hand-off copies them out in one go). The loss pass
    keeps references only (detached)."""

    take: torch.Tensor  # (B, T) bool: the recorded completions' response tokens (the rows of `tokens`)
    logprob: torch.Tensor  # log p(y_t) of the sampled token, from TRL's loss pass
    entropy: torch.Tensor  # H1 of the next-token distribution, nats
    renyi2: torch.Tensor  # H2 = -log Σ p², nats
    group_js: torch.Tensor | None  # ICT's score; None when it was not computed (a null column)
    selected: torch.Tensor | None  # the selector's gradient weight; None when nothing selects (1 everywhere)
    is_fork: torch.Tensor  # bool: among the top `fork_fraction` of the micro-batch's tokens by entropy
    advantages: torch.Tensor  # (B,) or (B, T)
    mask: torch.Tensor  # response-token mask (TRL's completion_mask x tool_mask)
    completion_id: torch.Tensor  # (B,) int64
    token_id: torch.Tensor  # (B, T)

    OPTIONAL = ("group_js", "selected")

    def shape_key(self) -> tuple:
        """Batches with equal keys are stacked and copied out together (`token_rows`)."""
        return (tuple(self.take.shape), self.take.device, self.advantages.dim(),
                *(getattr(self, f) is None for f in self.OPTIONAL))

    @staticmethod
    def stack(batches: list[TokenBatch]) -> TokenBatch:
        """Same-shaped batches (equal `shape_key`) as one, each tensor with a leading K."""
        first = batches[0]
        return TokenBatch(**{f.name: None if getattr(first, f.name) is None
                             else torch.stack([getattr(b, f.name) for b in batches]) for f in fields(first)})


@dataclass(frozen=True)
class TokenStat:
    """One float32 column of the `tokens` table: `name` as store/schema.py's TOKENS calls it, `of` computing it from
    a (stacked) TokenBatch -> a tensor of its shape, or None for a null column (not computed in this run)."""

    name: str
    of: Callable[[TokenBatch], torch.Tensor | None]


# The one list of per-token statistics: the float columns of `tokens`, in this order.
TOKEN_STATS: list[TokenStat] = [
    TokenStat("logprob", lambda b: b.logprob),
    TokenStat("entropy", lambda b: b.entropy),
    TokenStat("renyi2", lambda b: b.renyi2),
    TokenStat("group_js", lambda b: b.group_js),
    # Clip-Cov's score over the micro-batch's response tokens (each micro-batch its own means)
    TokenStat("covariance", lambda b: token_math.covariance(b.logprob, b.advantages, b.mask)),
    TokenStat("selected", lambda b: torch.ones_like(b.logprob) if b.selected is None else b.selected),
]
TOKEN_IDS = ("completion_id", "position", "token_id")  # the int columns of `tokens` besides step


@no_grad
def token_rows(steps: list[int], batches: list[TokenBatch]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[bool, ...]]:
    """The recorded tokens of same-shaped batches (batch i of step steps[i]), stacked into (K, B, T) so that the copy
    costs the same ~25 tensor ops for K micro-batches as for one. -> (N, S) float32 statistics (TOKEN_STATS order;
    NaN where a statistic is None), (N, 4) int64 step and ids (step, TOKEN_IDS), (N,) bool is_fork, and whether each
    statistic was computed."""
    b = TokenBatch.stack(batches)
    take = b.take
    k, rows, t = take.shape
    values = [stat.of(b) for stat in TOKEN_STATS]
    present = tuple(v is not None for v in values)
    nan = torch.full(take.shape, math.nan, device=take.device)
    stats = torch.stack([nan if v is None else v.float() for v in values], dim=-1)[take]
    step = torch.tensor(steps, device=take.device).view(k, 1, 1).expand(k, rows, t)
    ids = torch.stack([step, b.completion_id.unsqueeze(-1).expand(k, rows, t),
                       torch.arange(t, device=take.device).expand(k, rows, t), b.token_id.long()], dim=-1)
    return stats, ids[take], b.is_fork[take], present


@dataclass
class ForkBatch:
    """`forks`: the top-k alternatives at F fork positions of recorded completions."""

    completion_id: torch.Tensor  # (F,)
    position: torch.Tensor  # (F,)
    sampled_rank: torch.Tensor  # (F,) the sampled token's rank in the whole vocabulary (0 = most likely)
    alt_token_ids: torch.Tensor  # (F, k)
    alt_probs: torch.Tensor  # (F, k)


@dataclass
class GenBatch:
    """Per-completion facts of the current generation batch (b rows, device tensors); rows of the loss micro-batches
    are found by completion id (plugin/trl_seams.py `rows_in_generation`)."""

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
    # the dataset rows TRL generated them from (prompt and extra columns, as its reward functions get them); kept
    # only when fork value is measured during training (plugin/fork_value_online.py)
    inputs: list[dict[str, Any]] | None = None


@dataclass
class CompletionBatch:
    """`completions`: rows `gen_rows` of a generation batch recorded by one micro-batch (its rows `idx`), indexed at
    the hand-off (a GenBatch's tensors are not modified once built), with their mean entropy over `mask`."""

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
    """`steps`: everything one rank saw in the loss passes of one optimizer step, and its recorded rows."""

    # per token (entropy, renyi2, group_js) or per completion; effective_rank: per measured completion (due steps)
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
        flat = torch.cat([v for _, _, v in self.values]).double().cpu().numpy() if self.values else np.zeros(0)
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
