"""Every pure torch formula of the plugin, written once: entropy, Rényi-2, Jensen-Shannon (ICT's group_js and the
reference JS), top-k and rank, the fork mask, the covariance, the effective rank of hidden states, teacher-forced
scores and the selection diagnostics. Natural log; B completions, T positions, V vocabulary, H hidden width.

No function here builds (B, T, V) logits: full distributions are projected from hidden states a chunk at a time
through `project`, a callable (N, H) -> (N, V) temperature-scaled logits that the TRL glue builds from the model, or
taken a chunk of rows at a time from logits the model computed anyway. Each function is tested against a float64
reference computed from full logits (tests/plugin/test_token_math.py and the tests named in its docstring).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
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


# ------------------------------------------------------------------------------------------------ distributions
def entropy(p: torch.Tensor) -> torch.Tensor:
    """H1 = -Σ p log p over the last dim, 0 log 0 = 0.  (..., V) probabilities -> (...)

    log(max(p, tiny)) instead of xlogy: ~2.7x faster on a CPU, and exact where it matters (only p < 1.2e-38 differs,
    by at most 1e-36 nats per entry)."""
    return -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1)


def renyi2(logp: torch.Tensor) -> torch.Tensor:
    """H2 = -log Σ p² (collision entropy) from log-probabilities.  (..., V) -> (...); always H2 ≤ H1."""
    return -torch.logsumexp(2.0 * logp, dim=-1)


def js_divergence(p: torch.Tensor, q: torch.Tensor, h_p: torch.Tensor | None = None,
                  h_q: torch.Tensor | None = None) -> torch.Tensor:
    """JS(P‖Q) = H(M) − ½(H(P) + H(Q)), M = (P + Q)/2, clamped to [0, ln 2].  (..., V) each -> (...)

    `h_p`, `h_q`: the entropies when the caller has them already (a group's mean is shared by every sibling)."""
    h_p = entropy(p) if h_p is None else h_p
    h_q = entropy(q) if h_q is None else h_q
    return (entropy((p + q).mul_(0.5)) - 0.5 * (h_p + h_q)).clamp(0.0, LN2)


@no_grad
def js_from_logits(z_p: torch.Tensor, z_q: torch.Tensor, temperature: float = 1.0, chunk: int = 256) -> torch.Tensor:
    """JS(softmax(z_p / T) ‖ softmax(z_q / T)) per row of (N, V) logits -> (N,) float32 in [0, ln 2], `chunk` rows at
    a time in float32 (ICT against the reference policy)."""
    if z_p.shape != z_q.shape:
        raise ValueError(f"policy logits {tuple(z_p.shape)} and reference logits {tuple(z_q.shape)} differ in shape")
    out = torch.empty(z_p.size(0), dtype=torch.float32, device=z_p.device)
    for s in range(0, z_p.size(0), chunk):
        p = torch.softmax(z_p[s : s + chunk].float() / temperature, dim=-1)
        q = torch.softmax(z_q[s : s + chunk].float() / temperature, dim=-1)
        out[s : s + chunk] = js_divergence(p, q)
    return out


@no_grad
def renyi2_from_logits(logits: torch.Tensor, temperature: float, chunk: int = 256) -> torch.Tensor:
    """Rényi-2 of softmax(z / T) at each position of logits the model computed anyway.  (B, T, V) -> (B, T) float32.

    `chunk` rows of positions at a time, so no second (B, T, V) tensor exists (the loss pass of TRL releases whose
    loss pass returns full logits, plugin/trl_seams.py)."""
    b, t, v = logits.shape
    flat = logits.reshape(b * t, v)
    out = torch.empty(b * t, dtype=torch.float32, device=logits.device)
    for s in range(0, b * t, chunk):
        out[s : s + chunk] = renyi2(torch.log_softmax(flat[s : s + chunk].float() / temperature, dim=-1))
    return out.view(b, t)


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


@dataclass(frozen=True)
class TeacherForced:
    """Per completion token t (T tokens): the distribution that predicted it, p = softmax(z_t / temperature)."""

    logprob: torch.Tensor  # (T,) float32: log p(y_t)
    entropy: torch.Tensor  # (T,) float32: H1
    renyi2: torch.Tensor  # (T,) float32: H2
    top_ids: torch.Tensor  # (T, k) int64: the k most likely tokens, most likely first
    top_probs: torch.Tensor  # (T, k) float32


@no_grad
def teacher_forced(
    logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0, k: int = 5, chunk: int = 128
) -> TeacherForced:
    """Scores of teacher-forced logits (the probes). logits (T, V): row t the raw logits that predict targets[t];
    targets (T,) long. A chunk of positions at a time in float32: at most chunk x V probabilities exist at once."""
    out: dict[str, list[torch.Tensor]] = {f: [] for f in ("logprob", "entropy", "renyi2", "top_ids", "top_probs")}
    for start in range(0, logits.size(0), chunk):
        z = logits[start : start + chunk].float() / temperature  # (c, V)
        logp = torch.log_softmax(z, dim=-1)  # (c, V)
        out["logprob"].append(logp.gather(-1, targets[start : start + chunk].unsqueeze(-1)).squeeze(-1))
        out["entropy"].append(entropy(logp.exp()))
        out["renyi2"].append(renyi2(logp))
        ids, probs = topk_probs(z, k)
        out["top_ids"].append(ids)
        out["top_probs"].append(probs)
    if not out["logprob"]:
        empty = logits.new_zeros((0,), dtype=torch.float32)
        return TeacherForced(empty, empty, empty, empty.new_zeros((0, k)).long(), empty.new_zeros((0, k)))
    return TeacherForced(**{name: torch.cat(parts) for name, parts in out.items()})


# ------------------------------------------------------------------------------------------------ ICT's group_js
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
            h_bar = entropy(p_bar)  # (c,)
            for i in range(rows.numel()):
                js = js_divergence(p[i], p_bar, h_q=h_bar)
                keep = active[i] & (n_active >= 2)
                out[rows[i], start:end] = torch.where(keep, js, 0.0)
    return out


@no_grad
def group_js_step(
    logits: torch.Tensor, active: torch.Tensor, groups: torch.Tensor, n_groups: int, temperature: float,
    chunk: int = 64,
) -> torch.Tensor:
    """`group_js` at one position for every row at once, from that position's raw logits.

    logits (B, V) untempered next-token logits; active (B,) bool; groups (B,) long in [0, n_groups). -> (B,) float32
    in [0, ln 2], 0 for inactive rows and rows with fewer than two active siblings. Same formula as `group_js`;
    holds B x V probabilities, n_groups x V means and a few chunk x V temporaries.
    """
    p = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    a = active.float()
    p.mul_(a.unsqueeze(1))  # inactive rows leave P̄ (their own score is masked below)
    n_active = torch.zeros(n_groups, device=p.device).index_add_(0, groups, a)  # (n_groups,)
    p_bar = torch.zeros(n_groups, p.size(1), device=p.device).index_add_(0, groups, p)  # (n_groups, V)
    p_bar.div_(n_active.clamp(min=1).unsqueeze(1))
    h_bar = entropy(p_bar)  # (n_groups,)
    out = torch.empty(p.size(0), device=p.device)
    for start in range(0, p.size(0), chunk):
        g = groups[start : start + chunk]
        out[start : start + chunk] = js_divergence(p[start : start + chunk], p_bar[g], h_q=h_bar[g])
    keep = active & (n_active[groups] >= 2)
    return torch.where(keep, out, 0.0)


# ------------------------------------------------------------------------------------------------ per token, per batch
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


# ------------------------------------------------------------------------------------------------ selection diagnostics
DIAGNOSTICS = ("grad_share", "kept_p_mean", "kept_entropy_mean", "entropy_overlap")


def logit_grad_sq(logprob: torch.Tensor, renyi2: torch.Tensor) -> torch.Tensor:
    """‖∇_z log p_y‖² = ‖e_y − p‖² = 1 − 2·p_y + Σ_v p_v² = 1 − 2·p_y + e^{−H₂}, from the captured log p_y and
    Rényi-2 (the gradient of A·log p_y at the temperature-scaled logits z).  (B, T), in [0, 2)."""
    return (1.0 - 2.0 * logprob.exp() + (-renyi2).exp()).clamp(min=0.0)


@no_grad
def selection_diagnostics(
    weights: torch.Tensor,
    mask: torch.Tensor,
    logprob: torch.Tensor,
    entropy: torch.Tensor,
    renyi2: torch.Tensor,
    advantages: torch.Tensor,
) -> torch.Tensor:
    """The four `DIAGNOSTICS` of one micro-batch, in that order, as one float64 tensor (4,) (no host copy).

    weights (B, T) the selector's gradient weights (kept = weight ≠ 0 on a response token); mask (B, T) response
    tokens; logprob (B, T) log p_y; entropy (B, T) nats; renyi2 (B, T) nats; advantages (B,) or (B, T).

    grad_share         Σ_kept A²·g / Σ_all A²·g, g = `logit_grad_sq`: the kept tokens' share of the squared
                       policy-gradient norm at the logits, cross-token terms ignored (each token's logits are its own
                       coordinates); NaN when every A is 0 or nothing is masked
    kept_p_mean        mean p_y over kept tokens (NaN when nothing is kept)
    kept_entropy_mean  mean entropy over kept tokens, nats (NaN when nothing is kept)
    entropy_overlap    |kept ∩ top-entropy set of the same size| / |kept| (NaN when nothing is kept); the
                       top-entropy set ranks response tokens of the micro-batch by entropy, ties by position
    """
    valid = mask > 0
    kept = (weights != 0) & valid  # (B, T)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    g = adv.double().pow(2) * logit_grad_sq(logprob.double(), renyi2.double())  # (B, T)
    g_all = torch.where(valid, g, 0.0).sum()
    g_kept = torch.where(kept, g, 0.0).sum()
    n_kept = kept.sum()
    p_mean = torch.where(kept, logprob.double().exp(), 0.0).sum() / n_kept
    h_mean = torch.where(kept, entropy.double(), 0.0).sum() / n_kept
    # rank of every token by entropy among response tokens (0 = highest); padding ranks after every real token
    key = torch.where(valid, entropy.double(), -torch.inf).reshape(-1)
    order = torch.sort(key, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    in_top = (rank < n_kept).view_as(kept)
    overlap = (kept & in_top).sum() / n_kept
    return torch.stack([g_kept / g_all, p_mean, h_mean, overlap.double()])


# ------------------------------------------------------------------------------------------------ effective rank
MAX_RANK_TOKENS = 512


@no_grad
def effective_rank(hidden: torch.Tensor, *, center: bool = True, max_tokens: int = MAX_RANK_TOKENS) -> float:
    """Effective rank of one response's hidden states (Huang et al., arXiv:2509.23808):
    ER(X) = exp(-Σ_k p_k log p_k), p_k = σ_k / Σ_j σ_j, σ the singular values of X centred over its tokens, X the
    final-layer states of the response's last `max_tokens` tokens. In [1, min(n - 1, H)] for n tokens of width H.
    hidden (n, H) -> float; NaN when fewer than two tokens (or all states equal): the spectrum is empty.

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


@no_grad
def effective_ranks(hidden: torch.Tensor, mask: torch.Tensor, *, max_tokens: int = MAX_RANK_TOKENS) -> list[float]:
    """`effective_rank` of each row's response tokens. hidden (B, T, H), mask (B, T) 1 on response tokens -> B floats;
    each row keeps its last `max_tokens` masked positions (padding anywhere in the row is skipped)."""
    return [effective_rank(hidden[b][mask[b].bool()], max_tokens=max_tokens) for b in range(hidden.size(0))]
