"""Effective rank of a response's hidden states (Huang et al., arXiv:2509.23808).

A view of exploration that does not go through the token distribution: the paper finds near-zero correlation
between it and token entropy, so a monitor showing only entropy cannot show it.

ER(X) = exp(-Σ_k p_k log p_k), p_k = σ_k / Σ_j σ_j, σ the singular values of X centred over its tokens; X the
final-layer hidden states of one response, its last `max_tokens` (512) tokens. ER lies in [1, min(n - 1, H)] for n
tokens of width H (centring removes one dimension); 1 when all states lie on one line.
"""

from __future__ import annotations

import math

import torch

MAX_TOKENS = 512


@torch.no_grad()
def effective_rank(hidden: torch.Tensor, *, center: bool = True, max_tokens: int = MAX_TOKENS) -> float:
    """Effective rank of one response's hidden states. hidden (n, H) -> float; NaN when fewer than two tokens (or
    all states equal): the spectrum is empty.

    The singular values come from the eigenvalues of the Gram matrix of the smaller side (n x n or H x H), in
    float64 on the states' device: 3-9x faster than an SVD of (512, H) on a CPU, and as exact where it matters.
    Singular values below the resolution of float32 states (σ_k < max(n, H)·eps32·σ_max) are rounding noise of a
    lower rank and count as 0.
    """
    x = hidden[-max_tokens:].double()  # (n, H)
    if center:
        x = x - x.mean(0, keepdim=True)
    if x.size(0) < 2 and center:
        return math.nan
    gram = x @ x.T if x.size(0) <= x.size(1) else x.T @ x  # (m, m), m = min(n, H)
    s = torch.linalg.eigvalsh(gram).clamp_min(0.0).sqrt().flip(0)  # (m,) singular values, largest first
    if s.numel() == 0 or float(s[0]) <= 0.0:
        return math.nan
    s = s[s > s[0] * max(x.shape) * torch.finfo(torch.float32).eps]
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def effective_ranks(hidden: torch.Tensor, mask: torch.Tensor, *, max_tokens: int = MAX_TOKENS) -> list[float]:
    """`effective_rank` of each row's response tokens. hidden (B, T, H), mask (B, T) 1 on response tokens -> B floats;
    each row keeps its last `max_tokens` masked positions (padding anywhere in the row is skipped)."""
    return [effective_rank(hidden[b][mask[b].bool()], max_tokens=max_tokens) for b in range(hidden.size(0))]


@torch.no_grad()
def completion_ranks(last_hidden: torch.Tensor, completion_mask: torch.Tensor, rows: list[int], *,
                     max_tokens: int = MAX_TOKENS) -> list[float]:
    """`effective_rank` of the completions in `rows` from the backbone's output of a loss pass over prompt +
    completion. last_hidden (B, P + T, H): the states at each input position; completion_mask (B, T): 1 on the
    completion's tokens, which are the last T positions. -> len(rows) floats."""
    t = completion_mask.size(1)
    hidden = last_hidden[rows, -t:]  # (n, T, H): the state at each completion token
    return effective_ranks(hidden, completion_mask[rows], max_tokens=max_tokens)
