"""What a selection trains on, per micro-batch: pure functions over tensors, no extra forward pass.

For the policy-gradient term A·log p_y of one token, the gradient with respect to that position's (temperature-
scaled) logits z is A·(e_y − p), whose squared norm is

    A² · ‖e_y − p‖² = A² · (1 − 2·p_y + Σ_v p_v²) = A² · (1 − 2·p_y + e^{−H₂})

with p_y = exp(logprob) and H₂ the Rényi-2 entropy, both already captured from TRL's fused head. Summing this over
the kept tokens and dividing by the sum over all response tokens gives the kept tokens' share of the squared
policy-gradient norm at the logits (cross-token terms ignored: each token's logits are its own coordinates).
"""

from __future__ import annotations

import torch
from forkwatch.plugin.metrics import no_grad

DIAGNOSTICS = ("grad_share", "kept_p_mean", "kept_entropy_mean", "entropy_overlap")


def logit_grad_sq(logprob: torch.Tensor, log_sum_sq: torch.Tensor) -> torch.Tensor:
    """‖∇_z log p_y‖² = 1 − 2·p_y + Σ_v p_v², from log p_y and log Σ_v p_v² (= −H₂).  (B, T), in [0, 2)."""
    return (1.0 - 2.0 * logprob.exp() + log_sum_sq.exp()).clamp(min=0.0)


@no_grad
def selection_diagnostics(
    weights: torch.Tensor,
    mask: torch.Tensor,
    logprob: torch.Tensor,
    entropy: torch.Tensor,
    log_sum_sq: torch.Tensor,
    advantages: torch.Tensor,
) -> torch.Tensor:
    """The four `DIAGNOSTICS` of one micro-batch, in that order, as one float64 tensor (4,) (no host copy).

    weights (B, T) the selector's gradient weights (kept = weight ≠ 0 on a response token); mask (B, T) response
    tokens; logprob (B, T) log p_y; entropy (B, T) nats; log_sum_sq (B, T) log Σ_v p_v²; advantages (B,) or (B, T).

    grad_share         Σ_kept A²·g / Σ_all A²·g, g = `logit_grad_sq` (NaN when every A is 0 or nothing is masked)
    kept_p_mean        mean p_y over kept tokens (NaN when nothing is kept)
    kept_entropy_mean  mean entropy over kept tokens, nats (NaN when nothing is kept)
    entropy_overlap    |kept ∩ top-entropy set of the same size| / |kept| (NaN when nothing is kept); the
                       top-entropy set ranks response tokens of the micro-batch by entropy, ties by position
    """
    valid = mask > 0
    kept = (weights != 0) & valid  # (B, T)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    g = adv.double().pow(2) * logit_grad_sq(logprob.double(), log_sum_sq.double())  # (B, T)
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
