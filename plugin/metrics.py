"""Pure torch math on per-token quantities. Natural log; B completions, T positions, V vocab, H hidden.

No function here builds (B, T, V) logits: full distributions are projected from hidden states a chunk at a time
through `project`, a callable (N, H) -> (N, V) temperature-scaled logits that the TRL glue builds from the model,
or (`group_js_step`) taken one position at a time from the logits generation computed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TypeVar

import torch

Projector = Callable[[torch.Tensor], torch.Tensor]
LN2 = math.log(2.0)
F = TypeVar("F", bound=Callable)


def no_grad(fn: F) -> F:
    """`@torch.no_grad()` without its cost where gradients are already off: torch's decorator builds and enters a
    context on every call (~10 us), and forkwatch's hooks call these functions many times per step, almost always
    inside TRL's generation or forkwatch's own no-grad hooks already."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@no_grad
def covariance(logprob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Clip-Cov score c_t = (A - mean A)(log p_t - mean log p), means over the response tokens of the batch.

    logprob (..., B, T), advantages (..., B) or (..., B, T), mask (..., B, T) -> (..., B, T), 0 off the mask; the
    means are per (B, T) batch (leading dims stack batches). float32, or float64 when logprob is float64 (the
    selectors rank by it in float64). arXiv:2505.22617.
    """
    dtype = torch.promote_types(logprob.dtype, torch.float32)
    m = mask.to(dtype)
    n = m.sum((-2, -1), keepdim=True).clamp(min=1.0)
    adv = advantages.to(dtype)
    adv = adv.unsqueeze(-1).expand_as(m) if adv.dim() == m.dim() - 1 else adv
    lp = logprob.detach().to(dtype)
    mean_a = (adv * m).sum((-2, -1), keepdim=True) / n
    mean_lp = (lp * m).sum((-2, -1), keepdim=True) / n
    return (adv - mean_a) * (lp - mean_lp) * m


def keep_count(n: torch.Tensor | int, fraction: float) -> torch.Tensor | int:
    """ceil(fraction·n), at least 1 where n > 0, 0 where n = 0: of a count (int) or of each count of a tensor (long,
    same shape). fraction·n is rounded to 9 decimals first, so that 0.07·100 = 7.000000000000001 keeps 7, not 8."""
    if isinstance(n, int):
        return max(1, math.ceil(round(n * fraction, 9))) if n > 0 else 0
    raw = torch.ceil(torch.round(n.double() * fraction, decimals=9))
    return torch.where(n > 0, raw.clamp(min=1), torch.zeros_like(raw)).long()


@no_grad
def fork_mask(entropy: torch.Tensor, mask: torch.Tensor, fraction: float, values: torch.Tensor | None = None
              ) -> torch.Tensor:
    """(B, T) bool: the top `fraction` of masked tokens by entropy (at least one when fraction > 0 and any token).
    `values`: entropy[mask] when the caller has it already."""
    valid = mask.bool()
    values = entropy.detach()[valid].float() if values is None else values  # (N,)
    if fraction <= 0.0 or values.numel() == 0:
        return torch.zeros_like(valid)
    k = keep_count(values.numel(), fraction)
    threshold = torch.topk(values, k).values[-1]
    return (entropy.detach().float() >= threshold) & valid


@no_grad
def rank_of(z: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Rank of `token` in each row of logits z (0 = most likely; ties share the better rank).
    z (N, V), token (N,) long -> (N,) int64. Temperature does not change a rank."""
    return (z > z.gather(-1, token.unsqueeze(-1))).sum(-1)


@no_grad
def topk_probs(z: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens of softmax(z / temperature) and their probabilities.
    z (N, V) logits -> ids (N, k) int64, probs (N, k) float32. Only k probabilities are normalised, and the
    normaliser logsumexp(z) = m + log Σ exp(z - m) takes its max m from the top-k (one pass over V fewer)."""
    z = z.float()
    if temperature != 1.0:
        z = z / temperature
    top = torch.topk(z, min(k, z.size(-1)), dim=-1)
    m = top.values[:, :1]  # (N, 1)
    lse = m + (z - m).exp().sum(-1, keepdim=True).log()
    return top.indices, (top.values - lse).exp()


@no_grad
def topk_alternatives(
    hidden: torch.Tensor, sampled: torch.Tensor, project: Projector, k: int, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k next tokens at N positions and the sampled token's rank in the whole vocabulary (0 = most likely).

    hidden (N, H), sampled (N,) long -> ids (N, k) int64, probs (N, k) float32, rank (N,) int64.
    """
    ids, probs, ranks = [], [], []
    for start in range(0, hidden.size(0), chunk):
        z = project(hidden[start : start + chunk]).float()  # (n, V) temperature-scaled logits
        top_ids, top_p = topk_probs(z, k)
        ranks.append(rank_of(z, sampled[start : start + chunk]))
        ids.append(top_ids)
        probs.append(top_p)
    if len(ids) == 1:
        return ids[0], probs[0], ranks[0]
    if not ids:
        empty = hidden.new_zeros((0, k))
        return empty.long(), empty.float(), hidden.new_zeros((0,)).long()
    return torch.cat(ids), torch.cat(probs), torch.cat(ranks)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """-Σ p log p over the last dim, 0 log 0 = 0. log(max(p, tiny)) instead of xlogy: ~2.7x faster on a CPU, and
    exact where it matters (only p < 1.2e-38 differs, by at most 1e-36 nats per entry)."""
    return -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1)


@no_grad
def group_js(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    groups: torch.Tensor,
    project: Projector,
    chunk: int = 64,
) -> torch.Tensor:
    """ICT's score u_{i,t} = JS(p_{i,t} || P̄_t), P̄_t the mean of p_{j,t} over the rollouts j of i's group active at t.

    hidden (B, T, H): the state that predicts completion token t of each row; mask (B, T): 1 while a rollout is
    active; groups (B,) long. -> (B, T) float32 in [0, ln 2], 0 where fewer than two rollouts are active or off the
    mask. P̄ includes the rollout itself (our reading). Holds at most G x chunk x V probabilities at once (plus one
    chunk x V mixture). arXiv:2606.19771.
    """
    out = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    active_all = mask.bool()
    for g in torch.unique(groups).tolist():
        rows = (groups == g).nonzero(as_tuple=True)[0]  # (G,)
        if rows.numel() < 2:
            continue
        length = int(active_all[rows].sum(-1).max())
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            active = active_all[rows, start:end]  # (G, c)
            n_active = active.sum(0)  # (c,)
            if int(n_active.max()) < 2:
                continue
            h = hidden[rows, start:end]  # (G, c, H)
            p = torch.softmax(project(h.reshape(-1, h.size(-1))).float(), dim=-1).view(*active.shape, -1)  # (G, c, V)
            w = active.float() / n_active.clamp(min=1).float()  # (G, c)
            p_bar = (p * w.unsqueeze(-1)).sum(0)  # (c, V)
            h_bar = _entropy(p_bar)  # (c,)
            for i in range(rows.numel()):
                m = 0.5 * (p[i] + p_bar)  # (c, V)
                # JS(p||q) = H(M) - (H(p) + H(q)) / 2, with M = (p + q) / 2
                js = _entropy(m) - 0.5 * (_entropy(p[i]) + h_bar)
                keep = active[i] & (n_active >= 2)
                out[rows[i], start:end] = torch.where(keep, js.clamp(0.0, LN2), 0.0)
    return out


@no_grad
def group_js_step(
    logits: torch.Tensor, active: torch.Tensor, groups: torch.Tensor, n_groups: int, temperature: float,
    chunk: int = 64,
) -> torch.Tensor:
    """`group_js` at one position for every row at once, from that position's raw logits.

    logits (B, V) untempered next-token logits; active (B,) bool; groups (B,) long in [0, n_groups). -> (B,) float32
    in [0, ln 2], 0 for inactive rows and rows with fewer than two active siblings. Same formula and arithmetic as
    `group_js`; holds B x V probabilities, n_groups x V means and a few chunk x V temporaries.
    """
    p = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    a = active.float()
    p.mul_(a.unsqueeze(1))  # inactive rows leave P̄ (their own score is masked below)
    n_active = torch.zeros(n_groups, device=p.device).index_add_(0, groups, a)  # (n_groups,)
    p_bar = torch.zeros(n_groups, p.size(1), device=p.device).index_add_(0, groups, p)  # (n_groups, V)
    p_bar.div_(n_active.clamp(min=1).unsqueeze(1))
    h_bar = _entropy(p_bar)  # (n_groups,)
    out = torch.empty(p.size(0), device=p.device)
    for start in range(0, p.size(0), chunk):
        g = groups[start : start + chunk]
        pi = p[start : start + chunk]  # (c, V)
        m = (pi + p_bar[g]).mul_(0.5)
        # JS(p||q) = H(M) - (H(p) + H(q)) / 2, with M = (p + q) / 2
        out[start : start + chunk] = _entropy(m) - 0.5 * (_entropy(pi) + h_bar[g])
    keep = active & (n_active[groups] >= 2)
    return torch.where(keep, out.clamp(0.0, LN2), 0.0)
