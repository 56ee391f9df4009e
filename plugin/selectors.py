"""The token-selection methods of METHODS.md, one registered function each.

Every selector is a pure function of one micro-batch (`SelectionInput`) to per-token weights (`Selection`): scores
are computed without gradient, randomness comes only from `inp.generator`. The weights multiply TRL's per-token
policy loss (KL stays as it is); TRL then normalises over ALL response tokens. A method that averages over the
tokens it keeps ("kept" normalisation: ICT's Sparse-GRPO, the 20-Entropy paper's code, STAPO) therefore scales
the kept tokens' weights (`renormalise_kept`) instead of changing TRL's normaliser: the weight IS the gradient
multiplier, the `selected` column records it, and nothing of TRL's loss has to be rebuilt. KL-Cov and GPPO, which
change the loss itself, go through `policy_loss.py`.
"""

from __future__ import annotations

import logging
import math

import torch
from forkwatch.plugin import metrics
from forkwatch.plugin.policy_loss import (
    NORMALISER_SCOPE,
    gppo_clipped,
    gppo_policy_loss,
    kl_cov_policy_loss,
    trl_policy_loss,
)
from forkwatch.plugin.registry import Selection, SelectionInput, register_selector

logger = logging.getLogger(__name__)

NAN = float("nan")

# ---------------------------------------------------------------------------------------------------------------
# Building blocks (pure, tested on their own)
# ---------------------------------------------------------------------------------------------------------------


def keep_count(n: torch.Tensor, fraction: float) -> torch.Tensor:
    """ceil(fraction·n), at least 1 where n > 0, 0 where n = 0.  Same shape as n, long.

    fraction·n is rounded to 9 decimals first so that 0.1·30 = 3.0000000000000004 keeps 3 tokens, not 4.
    """
    raw = torch.ceil(torch.round(n.double() * fraction, decimals=9))
    return torch.where(n > 0, raw.clamp(min=1), torch.zeros_like(raw)).long()


def _rank_key(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # float64 keys: real scores are finite (NaN ranks last among real tokens), padding is strictly below all of them,
    # so a pad position can never take a kept slot from a real token.
    key = torch.nan_to_num(scores.double(), nan=-1e300, posinf=1e300, neginf=-1e300)
    return torch.where(mask > 0, key, torch.full_like(key, -math.inf))


def top_fraction_per_row(scores: torch.Tensor, mask: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, in each row, the top ceil(fraction·n_i) (at least one) response tokens by score.

    Ties are broken by position, earlier first (a stable descending sort), so the choice is deterministic.
    Returns (keep (B, T) bool, cut-off score of each row (B,) float64, NaN for rows without response tokens).
    """
    key = _rank_key(scores, mask)  # (B, T)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # (B, T)
    ranks = torch.empty_like(order)
    positions = torch.arange(key.size(-1), device=key.device).expand_as(order)
    ranks.scatter_(-1, order, positions)
    k = keep_count((mask > 0).sum(-1), fraction)  # (B,)
    keep = (ranks < k.unsqueeze(-1)) & (mask > 0)
    kept_key = torch.where(keep, key, torch.full_like(key, math.inf))
    cutoff = torch.where(k > 0, kept_key.min(-1).values, torch.full_like(kept_key[:, 0], NAN))
    return keep, cutoff


def top_fraction_per_unit(
    scores: torch.Tensor, mask: torch.Tensor, units: torch.Tensor, fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the top ceil(fraction·N_u) (at least one) response tokens of each unit of rows (a prompt group, the batch).

    `units` (B,) long gives each row's unit. Ties are broken by (row, position) order, earlier first.
    Returns (keep (B, T) bool, cut-off score per unit (U,) float64 in the order of `units.unique()`).
    """
    keep = torch.zeros_like(mask, dtype=torch.bool)
    key = _rank_key(scores, mask)
    cutoffs = []
    for unit in units.unique():
        rows = (units == unit).nonzero().squeeze(-1)
        flat_key, flat_mask = key[rows].reshape(-1), mask[rows].reshape(-1)
        k = int(keep_count((flat_mask > 0).sum(), fraction))
        if k == 0:
            cutoffs.append(NAN)
            continue
        chosen = torch.sort(flat_key, descending=True, stable=True).indices[:k]
        flat_keep = torch.zeros_like(flat_mask, dtype=torch.bool)
        flat_keep[chosen] = True
        keep[rows] = flat_keep.view(len(rows), -1)
        cutoffs.append(float(flat_key[chosen[-1]]))
    return keep, torch.tensor(cutoffs, dtype=torch.float64)


def renormalise_kept(keep: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """Weights that turn TRL's normalisation over all response tokens into one over the kept tokens.  (B, T)

    loss types normalised per completion (grpo, sapo, luspo): w = n_i / k_i on the kept tokens of completion i, so
        Σ_t w·L·m / n_i = (1/k_i) Σ_kept L   ("Sparse-GRPO", then TRL's mean over completions);
    loss types with one batch denominator (bnpo, dr_grpo, dapo, cispo, vespo): w = N / K (micro-batch totals), so the
        denominator counts kept tokens instead of all of them (dr_grpo and dapo keep their own constant or
        generation-batch denominators; N/K then preserves the loss scale of the dense run).
    A completion (or batch) with nothing kept gets weight 0 everywhere; 0 elsewhere.
    """
    kept = (keep & (mask > 0)).to(mask.dtype)
    if NORMALISER_SCOPE[loss_type] == "sequence":
        n, k = mask.sum(-1, keepdim=True), kept.sum(-1, keepdim=True)
    else:
        n, k = mask.sum(), kept.sum()
    return kept * n / k.clamp(min=1)


def _weights(keep: torch.Tensor, mask: torch.Tensor, loss_type: str, normalize: str) -> torch.Tensor:
    if normalize == "kept":
        return renormalise_kept(keep, mask, loss_type)
    return (keep & (mask > 0)).to(mask.dtype)


def selected_fraction(weights: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of response tokens with a non-zero weight (0.0 for an empty batch)."""
    n = float(mask.sum())
    return float(((weights != 0) & (mask > 0)).sum()) / n if n > 0 else 0.0


def response_values(values: torch.Tensor, mask: torch.Tensor, inp: SelectionInput) -> torch.Tensor:
    """The values at response tokens as a 1-D tensor, gathered over ranks when the glue gave a `gather`."""
    local = values[mask > 0].float()
    return inp.gather(local) if inp.gather is not None else local


def token_covariance(advantages: torch.Tensor, logprob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`metrics.covariance` in float64, with padding at -inf so that it never wins a top-k slot.  (B, T)

    (arXiv:2505.22617, Clip-Cov / KL-Cov.)
    """
    cov = metrics.covariance(logprob.double(), advantages.double(), mask)
    return cov.masked_fill(~(mask > 0), -math.inf)


def _check_fraction(fraction: float, *, upper: float = 1.0) -> None:
    if not 0.0 < fraction <= upper:
        raise ValueError(f"fraction={fraction!r} must be in (0, {upper}]")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; choose one of {', '.join(choices)}")


# ---------------------------------------------------------------------------------------------------------------
# The methods
# ---------------------------------------------------------------------------------------------------------------

SCOPES = ("completion", "group", "batch")
NORMALIZATIONS = ("kept", "all")


def _check_ict(*, fraction: float, warmup_steps: int, scope: str, normalize: str) -> None:
    _check_fraction(fraction)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps!r} must be >= 0")
    _check_choice("scope", scope, SCOPES)
    _check_choice("normalize", normalize, NORMALIZATIONS)


def _top_fraction(
    scores: torch.Tensor, inp: SelectionInput, fraction: float, scope: str
) -> tuple[torch.Tensor, float]:
    """Keep by scope; returns (keep, threshold = mean cut-off over the units that kept something)."""
    if scope == "completion":
        keep, cutoff = top_fraction_per_row(scores, inp.mask, fraction)
    else:
        units = inp.group_ids if scope == "group" else torch.zeros_like(inp.group_ids)
        keep, cutoff = top_fraction_per_unit(scores, inp.mask, units, fraction)
    cutoff = cutoff[~cutoff.isnan()]
    return keep, float(cutoff.mean()) if cutoff.numel() else NAN


@register_selector("ict", needs_group_js=True, check_options=_check_ict)
@torch.no_grad()
def ict(
    inp: SelectionInput,
    *,
    fraction: float = 0.10,
    warmup_steps: int = 10,
    scope: str = "completion",
    normalize: str = "kept",
) -> Selection:
    """ICT, Independent Combinatorial Tokens (arXiv:2606.19771).

    Score u_{i,t} = JS(p_{i,t} ‖ P̄_t) (`inp.group_js`). For optimizer steps < `warmup_steps` train densely (weights =
    mask, metric warmup = 1). Then keep per completion the top ceil(fraction·n_i) tokens by score (at least one;
    ties: earlier position first) and average the GRPO term over the kept tokens of each completion, then over
    completions (Sparse-GRPO):  L = (1/B) Σ_i (1/k_i) Σ_{t kept} L_{i,t}, realised as weights n_i/k_i under
    loss_type grpo (see `renormalise_kept` for the others). `scope="group"` / `"batch"` take the cut-off over all
    tokens of the prompt group / the micro-batch instead (at least one per unit; a completion may then keep
    none and contributes 0). `normalize="all"` keeps TRL's normaliser (weights 0/1). Metric `threshold`: the
    lowest kept score, averaged over completions (or groups). Rollouts of one prompt split across ranks: the
    glue's group_js averages over the siblings on this rank and counts such groups; scope="group" then takes the
    cut-off over the local part of the group.
    """
    mask = inp.mask
    if inp.step < warmup_steps:
        weights = (mask > 0).to(mask.dtype)
        return Selection(weights, None, {"selected_fraction": selected_fraction(weights, mask), "warmup": 1.0,
                                         "threshold": NAN})
    if inp.group_js is None:
        raise ValueError("ict needs inp.group_js (the glue computes it when spec.needs_group_js)")
    keep, threshold = _top_fraction(inp.group_js.detach(), inp, fraction, scope)
    weights = _weights(keep, mask, inp.loss_type, normalize)
    return Selection(weights, None, {"selected_fraction": selected_fraction(weights, mask), "warmup": 0.0,
                                     "threshold": threshold})


def _check_high_entropy(*, fraction: float, normalize: str) -> None:
    _check_fraction(fraction)
    _check_choice("normalize", normalize, NORMALIZATIONS)


@register_selector("high_entropy", check_options=_check_high_entropy)
@torch.no_grad()
def high_entropy(inp: SelectionInput, *, fraction: float = 0.20, normalize: str = "kept") -> Selection:
    """High-entropy "forking" tokens, 20-Entropy (Wang et al., arXiv:2506.01939).

    τ = quantile_{1-ρ}(H over all response tokens of the batch, over ranks when `inp.gather` is set), keep H ≥ τ
    (ties at τ are all kept), ρ = `fraction`. `normalize="kept"` (default, the paper's code) averages the loss over
    kept tokens (`renormalise_kept`); `normalize="all"` keeps TRL's full-token normaliser and is then exactly
    TRL's `top_entropy_quantile=ρ` (same quantile, same ≥ rule).
    """
    mask = inp.mask
    values = response_values(inp.entropy, mask, inp)
    if values.numel() == 0:
        return Selection(torch.zeros_like(mask), None, {"selected_fraction": 0.0, "threshold": NAN})
    threshold = torch.quantile(values, 1 - fraction)
    keep = ((inp.entropy * mask) >= threshold) & (mask > 0)
    weights = _weights(keep, mask, inp.loss_type, normalize)
    return Selection(weights, None, {"selected_fraction": selected_fraction(weights, mask),
                                     "threshold": float(threshold)})


def _check_random(*, fraction: float, scope: str, normalize: str) -> None:
    _check_fraction(fraction)
    _check_choice("scope", scope, SCOPES)
    _check_choice("normalize", normalize, NORMALIZATIONS)


@register_selector("random", check_options=_check_random)
@torch.no_grad()
def random(inp: SelectionInput, *, fraction: float = 0.10, scope: str = "completion", normalize: str = "kept") -> Selection:
    """Random control (ICT, arXiv:2606.19771, §"random 10 %"): keep a seeded random `fraction` of response tokens.

    Scores are U(0, 1) draws from `inp.generator`; the keep rule, scopes and normalisation are ICT's, so that
    `random` differs from `ict` only in the score: the control every selection method must beat.
    """
    gen = inp.generator
    scores = torch.rand(inp.mask.shape, generator=gen, device=gen.device, dtype=torch.float64).to(inp.mask.device)
    keep, _ = _top_fraction(scores, inp, fraction, scope)
    weights = _weights(keep, inp.mask, inp.loss_type, normalize)
    return Selection(weights, None, {"selected_fraction": selected_fraction(weights, inp.mask)})


def _check_clip_cov(*, fraction: float, cov_low: float, cov_high: float) -> None:
    _check_fraction(fraction)
    if not cov_low < cov_high:
        raise ValueError(f"cov_low={cov_low!r} must be below cov_high={cov_high!r}")


@register_selector("clip_cov", check_options=_check_clip_cov)
@torch.no_grad()
def clip_cov(inp: SelectionInput, *, fraction: float = 2e-4, cov_low: float = 1.0, cov_high: float = 5.0) -> Selection:
    """Clip-Cov (Cui et al., arXiv:2505.22617; defaults r = 2e-4, (ω_low, ω_high) = (1, 5) from the authors' code).

    Candidates: response tokens not clipped by PPO (-A·clip(r) ≤ -A·r) with ω_low < c_t < ω_high, c_t the token
    covariance. Pick max(1, ⌊r·N⌋) of them uniformly at random (`inp.generator`), N = response tokens of the
    micro-batch; their weight is 0 (no gradient), every other response token keeps weight 1.
    """
    mask = inp.mask
    logprob = inp.logprob.detach()
    adv = inp.advantages.unsqueeze(1) if inp.advantages.dim() == 1 else inp.advantages
    ratio = torch.exp(logprob - inp.old_logprob)
    clipped = -adv * torch.clamp(ratio, 1 - inp.epsilon_low, 1 + inp.epsilon_high) > -adv * ratio
    cov = token_covariance(inp.advantages, logprob, mask)
    candidates = ((cov > cov_low) & (cov < cov_high) & (mask > 0) & ~clipped).nonzero()  # (C, 2), row-major
    n = int((mask > 0).sum())
    weights = (mask > 0).to(mask.dtype)
    chosen = candidates[:0]
    if n > 0 and len(candidates) > 0:
        k = max(1, int(fraction * n))
        perm = torch.randperm(len(candidates), generator=inp.generator, device=inp.generator.device)
        chosen = candidates[perm[:k].to(candidates.device)]
        weights[chosen[:, 0], chosen[:, 1]] = 0
    return Selection(weights, None, {"selected_fraction": selected_fraction(weights, mask),
                                     "affected_tokens": float(len(chosen)), "candidate_tokens": float(len(candidates))})


def _check_kl_cov(*, fraction: float, beta: float) -> None:
    _check_fraction(fraction)
    if beta < 0:
        raise ValueError(f"beta={beta!r} must be >= 0")


@register_selector("kl_cov", changes_loss=True, check_options=_check_kl_cov)
def kl_cov(inp: SelectionInput, *, fraction: float = 2e-3, beta: float = 1.0) -> Selection:
    """KL-Cov (Cui et al., arXiv:2505.22617): k = 2e-3 (the paper's 7B setting; 2e-4 for 32B-class), β = 1.

    The top max(1, ⌊k·N⌋) response tokens by covariance c_t (ties: row-major order) get the loss
    -A·r + β·|log r|; all others -A·r; no token's ratio is clipped (`policy_loss.kl_cov_policy_loss`). Returned as
    `loss_delta` = that loss - TRL's clipped surrogate; weights stay 1 on response tokens.
    """
    mask = inp.mask
    with torch.no_grad():
        cov = token_covariance(inp.advantages, inp.logprob.detach(), mask)
        n = int((mask > 0).sum())
        penalised = torch.zeros_like(mask, dtype=torch.bool)
        threshold = NAN
        if n > 0:
            k = max(1, int(fraction * n))
            top = torch.sort(cov.reshape(-1), descending=True, stable=True).indices[:k]
            penalised.view(-1)[top] = True
            threshold = float(cov.reshape(-1)[top[-1]])
    desired = kl_cov_policy_loss(inp.logprob, inp.old_logprob, inp.advantages, penalised, beta)
    current = trl_policy_loss(inp.logprob, inp.old_logprob, inp.advantages, inp.epsilon_low, inp.epsilon_high)
    weights = (mask > 0).to(mask.dtype)
    return Selection(weights, (desired - current) * weights, {
        "selected_fraction": selected_fraction(weights, mask), "affected_tokens": float(penalised.sum()),
        "threshold": threshold})


def _check_stapo(*, prob_threshold: float, entropy_quantile: float) -> None:
    if not 0.0 < prob_threshold < 1.0:
        raise ValueError(f"prob_threshold={prob_threshold!r} must be in (0, 1)")
    if not 0.0 <= entropy_quantile <= 1.0:
        raise ValueError(f"entropy_quantile={entropy_quantile!r} must be in [0, 1]")


@register_selector("stapo", check_options=_check_stapo)
@torch.no_grad()
def stapo(inp: SelectionInput, *, prob_threshold: float = 0.002, entropy_quantile: float = 0.20) -> Selection:
    """STAPO (arXiv:2602.15620): silence spurious tokens and renormalise over the rest.

    Spurious: A > 0 AND p(y_t) < τ_p (= `prob_threshold`, 0.002; p from the current policy, detached) AND
    H_t < quantile_{τ_h}(H over the response tokens of the micro-batch, over ranks when `inp.gather` is set;
    τ_h = `entropy_quantile`, default 0.2, the paper also states 0.8). Spurious tokens get weight 0, the others
    are renormalised as in `renormalise_kept`.
    """
    mask = inp.mask
    values = response_values(inp.entropy, mask, inp)
    if values.numel() == 0:
        return Selection(torch.zeros_like(mask), None, {"selected_fraction": 0.0, "affected_tokens": 0.0,
                                                        "threshold": NAN})
    threshold = torch.quantile(values, entropy_quantile)
    adv = inp.advantages.unsqueeze(1) if inp.advantages.dim() == 1 else inp.advantages
    spurious = (adv > 0) & (inp.logprob.detach() < math.log(prob_threshold)) & (inp.entropy < threshold) & (mask > 0)
    weights = renormalise_kept(~spurious, mask, inp.loss_type)
    return Selection(weights, None, {"selected_fraction": selected_fraction(weights, mask),
                                     "affected_tokens": float(spurious.sum()), "threshold": float(threshold)})


def _check_gppo(*, epsilon_low: float, epsilon_high: float) -> None:
    if not (0.0 < epsilon_low < 1.0 and epsilon_high > 0.0):
        raise ValueError(f"epsilon_low={epsilon_low!r} must be in (0, 1) and epsilon_high={epsilon_high!r} > 0")


@register_selector("gppo", changes_loss=True, check_options=_check_gppo)
def gppo(inp: SelectionInput, *, epsilon_low: float = 0.2, epsilon_high: float = 0.28) -> Selection:
    """GPPO (Klear-Reasoner, arXiv:2508.07629): PPO's value, bounded gradient for clipped tokens.

    -min(δA, clip(δ, (1-ε_l)δ/sg(δ), (1+ε_h)δ/sg(δ))·A) with the paper's ε_l = 0.2, ε_h = 0.28 (these replace
    TRL's clip range for the policy term; `policy_loss.gppo_policy_loss`). Returned as `loss_delta` = GPPO's loss -
    TRL's clipped surrogate; weights stay 1 on response tokens. Metric `affected_tokens` counts clipped tokens.
    """
    mask = inp.mask
    desired = gppo_policy_loss(inp.logprob, inp.old_logprob, inp.advantages, epsilon_low, epsilon_high)
    current = trl_policy_loss(inp.logprob, inp.old_logprob, inp.advantages, inp.epsilon_low, inp.epsilon_high)
    weights = (mask > 0).to(mask.dtype)
    with torch.no_grad():
        ratio = torch.exp(inp.logprob.detach() - inp.old_logprob)
        affected = gppo_clipped(ratio, inp.advantages, epsilon_low, epsilon_high) & (mask > 0)
    return Selection(weights, (desired - current) * weights, {
        "selected_fraction": selected_fraction(weights, mask), "affected_tokens": float(affected.sum())})
