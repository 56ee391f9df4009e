"""The effective-rank budget: at which steps the effective rank of hidden states is measured, and of how many
recorded completions per step (`effective_rank_every`, `effective_rank_completions`), over the step's micro-batches."""

from __future__ import annotations

import torch
from forkwatch.plugin.hidden_rank import completion_ranks


class RankBudget:
    def __init__(self, every: int, completions: int) -> None:
        self.every, self.completions = every, completions
        self._left: dict[int, int] = {}  # step -> completions whose effective rank this rank may still measure

    def due(self, step: int) -> bool:
        """Whether the effective rank is measured at `step` (the backbone is hooked for it)."""
        return self.every > 0 and step % self.every == 0 and self._left.get(step, 1) > 0

    def measure(self, step: int, hidden: torch.Tensor, mask: torch.Tensor, recorded: torch.Tensor) -> torch.Tensor:
        """Effective rank of up to the step's remaining budget of the `recorded` (B,) rows, from the loss pass's
        backbone output `hidden` (full activations under every sharded stack: only parameters are sharded).
        -> (n,) float32."""
        left = self._left.setdefault(step, self.completions)
        rows = recorded.nonzero().squeeze(1)[:left].tolist()
        self._left[step] = left - len(rows)
        for old in [s for s in self._left if s < step]:
            del self._left[old]
        values = completion_ranks(hidden, mask, rows) if rows else []
        return torch.tensor(values, dtype=torch.float32, device=mask.device)
