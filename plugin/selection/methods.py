"""The token-selection methods forkwatch ships (docs/methods.md), one registered function each.

Every selector is a pure function of one micro-batch (`SelectionInput`) to per-token weights (`Selection`): scores
are computed without gradient, randomness comes only from `inp.generator`. The weights multiply TRL's per-token
policy loss (KL stays as it is); TRL then normalises over ALL response tokens. A method that averages over the
tokens it keeps ("kept" normalisation: ICT's Sparse-GRPO, the 20-Entropy paper's code, STAPO) therefore scales
the kept tokens' weights (`renormalise_kept`) instead of changing TRL's normaliser: the weight IS the gradient
multiplier, the `selected` column records it, and nothing of TRL's loss has to be rebuilt. KL-Cov and GPPO, which
change the loss itself, go through `policy_loss.py`. Each docstring says where each default comes from: the paper,
its authors' code, a secondary write-up, or forkwatch's own reading (docs/methods.md has the same, per part).
"""

from __future__ import annotations

import logging
import math

import torch
from forkwatch.plugin import token_math
from forkwatch.plugin.selection.policy_loss import (
    NORMALISER_SCOPE,
    PER_COMPLETION_MEAN,
    gppo_clipped,
    gppo_policy_loss,
    kl_cov_policy_loss,
    trl_policy_loss,
)
from forkwatch.plugin.selection.registry import Selection, SelectionInput, register_selector
from forkwatch.plugin.token_math import keep_count

logger = logging.getLogger(__name__)

NAN = float("nan")

# ---------------------------------------------------------------------------------------------------------------
# Building blocks (pure, tested on their own)
# ---------------------------------------------------------------------------------------------------------------


def _rank_key(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # float64 keys: real scores are finite (NaN ranks last among real tokens), padding is strictly below all of them,
    # so a pad position can never take a kept slot from a real token.
    key = torch.nan_to_num(scores.double(), nan=-1e300, posinf=1e300, neginf=-1e300)
    return torch.where(mask > 0, key, torch.full_like(key, -math.inf))


def _kth_largest(key: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The k-th largest value of each row of `key` (B, N) float64, k (B,) long >= 1 -> (B,)."""
    ordered = torch.sort(key, dim=-1, descending=True).values  # (B, N)
    return ordered.gather(-1, (k - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)


def percentile_keep_per_row(
    scores: torch.Tensor, mask: torch.Tensor, fraction: float, *, min_score: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """ICT's rule per completion: keep u ≥ the completion's (1 - fraction) percentile and u > `min_score`.  (B, T)

    The percentile is the k-th largest score, k = ceil(fraction·n_i) (at least one): every token tied with it is
    kept too, and a completion with fewer than k scores above `min_score` keeps only those (possibly none), so
    zero-score positions (a prefix shared by every rollout of the prompt) never fill the kept set.
    Returns (keep (B, T) bool, cut-off score of each row (B,) float64, NaN for rows with nothing kept).
    """
    key = _rank_key(scores, mask)  # (B, T)
    k = keep_count((mask > 0).sum(-1), fraction)  # (B,)
    cutoff = _kth_largest(key, k).clamp(min=min_score)  # (B,)
    keep = (key >= cutoff.unsqueeze(-1)) & (key > min_score) & (mask > 0) & (k > 0).unsqueeze(-1)
    kept_any = keep.any(-1)
    return keep, torch.where(kept_any, cutoff, torch.full_like(cutoff, NAN))


def percentile_keep_per_unit(
    scores: torch.Tensor, mask: torch.Tensor, units: torch.Tensor, fraction: float, *, min_score: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`percentile_keep_per_row` with the percentile taken over each unit of rows (a prompt group, the batch).

    `units` (B,) long gives each row's unit. Returns (keep (B, T) bool, cut-off per unit (U,) float64 in the order
    of `units.unique()`, NaN where the unit kept nothing).
    """
    keep = torch.zeros_like(mask, dtype=torch.bool)
    key = _rank_key(scores, mask)
    cutoffs = []
    for unit in units.unique():
        rows = (units == unit).nonzero().squeeze(-1)
        flat_key, flat_mask = key[rows].reshape(1, -1), mask[rows].reshape(1, -1)
        unit_keep, cutoff = percentile_keep_per_row(flat_key, flat_mask, fraction, min_score=min_score)
        keep[rows] = unit_keep.view(len(rows), -1)
        cutoffs.append(cutoff)
    return keep, torch.cat(cutoffs) if cutoffs else torch.zeros(0, dtype=torch.float64)


def renormalise_kept(keep: torch.Tensor, mask: torch.Tensor, loss_type: str, *, over: str) -> torch.Tensor:
    """Weights that turn TRL's normalisation over all response tokens into a mean over the kept tokens.  (B, T)

    over="completion" (ICT's Sparse-GRPO): a mean over the kept tokens of each completion, then over completions.
        Loss types normalised per completion (grpo, sapo, luspo): w = n_i / k_i on the kept tokens of completion i,
        so Σ_t w·L·m / n_i = (1/k_i) Σ_kept L.
    over="batch" (the 80/20 authors' code, STAPO's objective): one mean over every kept token of the micro-batch.
        grpo, sapo (TRL: mean_i of Σ_t L·m / n_i): w = B·n_i / K, so the loss is (1/K) Σ_kept L.
    Loss types with one batch denominator (bnpo, dr_grpo, dapo, cispo, vespo), either way, and luspo with
    over="batch": w = N / K (micro-batch totals), so the denominator counts kept tokens instead of all of them
    (dr_grpo, dapo and luspo keep their own constant, generation-batch or per-completion-sum scale; N/K then
    preserves the loss scale of the dense run).
    A completion (or batch) with nothing kept gets weight 0 everywhere; 0 off the mask.
    """
    if over not in ("completion", "batch"):
        raise ValueError(f"over={over!r}; choose 'completion' or 'batch'")
    kept = (keep & (mask > 0)).to(mask.dtype)
    if over == "completion" and NORMALISER_SCOPE[loss_type] == "sequence":
        n, k = mask.sum(-1, keepdim=True), kept.sum(-1, keepdim=True)
    elif over == "batch" and loss_type in PER_COMPLETION_MEAN:
        n, k = mask.sum(-1, keepdim=True) * mask.size(0), kept.sum()
    else:
        n, k = mask.sum(), kept.sum()
    return kept * n / k.clamp(min=1)


def _weights(keep: torch.Tensor, mask: torch.Tensor, loss_type: str, normalize: str, over: str) -> torch.Tensor:
    if normalize == "kept":
        return renormalise_kept(keep, mask, loss_type, over=over)
    return (keep & (mask > 0)).to(mask.dtype)


def response_values(values: torch.Tensor, mask: torch.Tensor, inp: SelectionInput) -> torch.Tensor:
    """The values at response tokens as a 1-D tensor, gathered over ranks when the glue gave a `gather`."""
    local = values[mask > 0].float()
    return inp.gather(local) if inp.gather is not None else local


def token_covariance(advantages: torch.Tensor, logprob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`token_math.covariance` in float64, with padding at -inf so that it never wins a top-k slot.  (B, T)

    (arXiv:2505.22617, Clip-Cov / KL-Cov.)
    """
    cov = token_math.covariance(logprob.double(), advantages.double(), mask)
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
# Group-JS at or below this (nats) counts as zero: float32 JS of identical next-token distributions (a prefix every
# rollout of the prompt shares) comes out as rounding noise of order 1e-7·log V instead of exactly 0.
JS_ZERO = 1e-5


def _check_sparse(*, fraction: float, warmup_steps: int, scope: str, normalize: str) -> None:
    _check_fraction(fraction)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps!r} must be >= 0")
    _check_choice("scope", scope, SCOPES)
    _check_choice("normalize", normalize, NORMALIZATIONS)


AGAINST = ("siblings", "reference")  # ICT's score: JS against the group's mean, or against the reference policy


def _check_ict(*, against: str, **sparse) -> None:
    _check_sparse(**sparse)
    _check_choice("against", against, AGAINST)


def _check_ict_run(options: dict, trainer_args) -> None:
    """Against the reference, every score is 0 until the policy has moved (π_θ = π_ref at the start): without a
    dense warm-up ICT keeps no token at the first step, so the gradient is 0, the policy never moves and every later
    step keeps nothing too. Refused rather than train on nothing."""
    if options["against"] == "reference" and options["warmup_steps"] == 0:
        raise ValueError(
            "select='ict' with select_options={'against': 'reference'} and warmup_steps=0 would train on nothing: the "
            "reference score JS(π_θ ‖ π_ref) is 0 for every token until the policy moves, so ICT keeps no token, the "
            "gradient is 0 and the policy never moves. Give it a dense warm-up (warmup_steps >= 1; the default is "
            "10), or use against='siblings'.")


def _percentile_keep(
    scores: torch.Tensor, inp: SelectionInput, fraction: float, scope: str, min_score: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep by scope; returns (keep, threshold = mean cut-off over the units that kept something, 0-d tensor)."""
    if scope == "completion":
        keep, cutoff = percentile_keep_per_row(scores, inp.mask, fraction, min_score=min_score)
    else:
        units = inp.group_ids if scope == "group" else torch.zeros_like(inp.group_ids)
        keep, cutoff = percentile_keep_per_unit(scores, inp.mask, units, fraction, min_score=min_score)
    return keep, cutoff.nanmean() if cutoff.numel() else torch.tensor(NAN, dtype=torch.float64)


def _dense(mask: torch.Tensor) -> Selection:
    return Selection((mask > 0).to(mask.dtype), None, {"warmup": 1.0, "threshold": NAN})


@register_selector("ict", needs_group_js=lambda o: o["against"] == "siblings",
                   needs_reference_js=lambda o: o["against"] == "reference", check_options=_check_ict,
                   check_run=_check_ict_run)
@torch.no_grad()
def ict(
    inp: SelectionInput,
    *,
    fraction: float = 0.10,
    warmup_steps: int = 10,
    scope: str = "completion",
    normalize: str = "kept",
    against: str = "siblings",
) -> Selection:
    """ICT, Independent Combinatorial Tokens (arXiv:2606.19771): JS-10 % with Sparse-GRPO after a dense warm-up.

    Where each part comes from (docs/methods.md, "Where each part comes from"): no official code exists and the
    paper's own text was not available to us, so "secondary" below means the secondary write-ups of the paper, which
    agree with each other, and "forkwatch" our own reading where nothing we could read decides.

    Score (`against`): "siblings" (default; secondary) u_{i,t} = JS(p_{i,t} ‖ P̄_t) against the mean of the prompt's
    rollouts at the same position (`inp.group_js`; P̄ includes the rollout itself and averages the rollouts still
    active at t: forkwatch); "reference" (forkwatch's reading of the abstract's "distributional deviations")
    u_{i,t} = JS(π_θ(·|s_{i,t}) ‖ π_ref(·|s_{i,t})) in the token's own context, π_ref the initial policy
    (`inp.reference_js`, plugin/selection/reference.py). For optimizer steps < `warmup_steps` (secondary: 10, with
    10, 20 and 40 reported equally good) train densely (weights = mask, metric warmup = 1). Then keep the tokens
    whose score is at or above their completion's (1 - `fraction`) percentile (secondary: the top 10 % per
    response): the ceil(fraction·n_i)-th largest score (at least one token), every tie with it kept, and only scores
    above zero (`JS_ZERO`) (the tie and u > 0 rules: forkwatch), so a completion with fewer positive-score tokens
    than that keeps only those, possibly none. The GRPO term is averaged over the kept tokens of each completion,
    then over completions (Sparse-GRPO, secondary; as weights n_i/k_i, `renormalise_kept(over="completion")`:
    forkwatch). `scope="group"` / `"batch"` take the percentile over all tokens of the prompt group / the micro-batch
    instead (forkwatch's options). `normalize="all"` keeps TRL's normaliser (weights 0/1). Metric `threshold`: the
    cut-off score, averaged over completions (or groups) that kept something. Rollouts of one prompt split across
    ranks: the glue's group_js averages over the siblings on this rank and counts such groups.
    """
    if inp.step < warmup_steps:
        return _dense(inp.mask)
    score = inp.group_js if against == "siblings" else inp.reference_js
    if score is None:
        raise ValueError(f"ict (against={against!r}) needs inp.{'group_js' if against == 'siblings' else 'reference_js'}"
                         " (the glue computes it when the bound selector needs it)")
    keep, threshold = _percentile_keep(score.detach(), inp, fraction, scope, JS_ZERO)
    weights = _weights(keep, inp.mask, inp.loss_type, normalize, over="completion")
    return Selection(weights, None, {"warmup": 0.0, "threshold": threshold})


@register_selector("random", check_options=_check_sparse)
@torch.no_grad()
def random(
    inp: SelectionInput,
    *,
    fraction: float = 0.10,
    warmup_steps: int = 10,
    scope: str = "completion",
    normalize: str = "kept",
) -> Selection:
    """Random control (ICT, arXiv:2606.19771, its "random 10 %" baseline, as the secondary write-ups report it):
    `ict` with a U(0, 1) score.

    Same warm-up, percentile rule, scopes and normalisation as `ict`; the score is a U(0, 1) draw per token from
    `inp.generator` (forkwatch's own generator, saved with each checkpoint), drawn only after the warm-up. It
    differs from `ict` only in the score: the control every selection method must beat.
    """
    if inp.step < warmup_steps:
        return _dense(inp.mask)
    gen = inp.generator
    scores = torch.rand(inp.mask.shape, generator=gen, device=gen.device, dtype=torch.float64).to(inp.mask.device)
    keep, _ = _percentile_keep(scores, inp, fraction, scope, 0.0)
    return Selection(_weights(keep, inp.mask, inp.loss_type, normalize, over="completion"), None, {"warmup": 0.0})


def _check_oracle(*, labels, fraction: float, warmup_steps: int, normalize: str) -> None:
    if not callable(labels):
        raise ValueError(f"labels={labels!r}: oracle needs select_options={{'labels': fn}}, fn(prompt_ids, "
                         "completion_ids, mask) -> (B, T) priority per token (0 = never keep), e.g. the demo's "
                         "demo.oracle.task_labels(tokenizer)")
    _check_sparse(fraction=fraction, warmup_steps=warmup_steps, scope="completion", normalize=normalize)


@register_selector("oracle", check_options=_check_oracle)
@torch.no_grad()
def oracle(
    inp: SelectionInput,
    *,
    labels=None,
    fraction: float = 0.10,
    warmup_steps: int = 10,
    normalize: str = "kept",
) -> Selection:
    """The ground truth's own selection, for a task that knows it (the demo): what a perfect score could reach at
    ICT's budget. Same warm-up, `fraction` per completion, percentile rule and normalisation as `ict`.

    `labels(prompt_ids, completion_ids, mask)` -> (B, T) priority per token (the demo's: mistake 3, decision 2,
    confident-consequential 1, anything else 0: never kept). Ties within a priority are broken by a U(0, 1) draw
    from `inp.generator`, so a completion keeps exactly ⌈fraction·n_i⌉ tokens when it has that many positive ones.
    """
    if inp.step < warmup_steps:
        return _dense(inp.mask)
    if inp.completion_ids is None or inp.prompt_ids is None:
        raise ValueError("oracle needs inp.prompt_ids and inp.completion_ids (the glue passes TRL's token ids)")
    priority = labels(inp.prompt_ids, inp.completion_ids, inp.mask).to(inp.mask.device, torch.float64)
    gen = inp.generator
    jitter = torch.rand(inp.mask.shape, generator=gen, device=gen.device, dtype=torch.float64).to(inp.mask.device)
    scores = torch.where(priority > 0, priority + 0.5 * jitter, torch.zeros_like(priority))
    keep, _ = _percentile_keep(scores, inp, fraction, "completion", 0.0)
    return Selection(_weights(keep, inp.mask, inp.loss_type, normalize, over="completion"), None, {"warmup": 0.0})


HIGH_ENTROPY_SCOPES = ("batch", "completion")


def _check_high_entropy(*, fraction: float, normalize: str, scope: str) -> None:
    _check_fraction(fraction)
    _check_choice("normalize", normalize, NORMALIZATIONS)
    _check_choice("scope", scope, HIGH_ENTROPY_SCOPES)


@register_selector("high_entropy", check_options=_check_high_entropy)
@torch.no_grad()
def high_entropy(inp: SelectionInput, *, fraction: float = 0.20, normalize: str = "kept",
                 scope: str = "batch") -> Selection:
    """High-entropy "forking" tokens, 20-Entropy (Wang et al., arXiv:2506.01939), ρ = `fraction` = 0.2.

    τ = quantile_{1-ρ}(H over all response tokens of the micro-batch, over ranks when `inp.gather` is set), keep
    H ≥ τ (ties at τ are all kept). `normalize="kept"` (default) is the authors' code (Beyond-the-80-20-Rule-RLVR,
    verl/trainer/ppo/core_algos.py `get_global_entropy_top_mask`, then verl's token-mean over the masked loss): one
    mean over ALL kept tokens of the batch, whatever TRL's loss type (`renormalise_kept(over="batch")`), so a
    completion whose only kept token is one fork does not give that token n_i times the weight.
    `normalize="all"` keeps TRL's full-token normaliser and is then exactly TRL's `top_entropy_quantile=ρ`.
    `scope="completion"` (forkwatch's, not the authors'): `ict`'s rule with entropy as the score, no warm-up: the top
    `fraction` of each completion (the ceil(fraction·n_i)-th largest entropy, ties kept, entropy above 0), averaged
    over the kept tokens of each completion (Sparse-GRPO): entropy at ICT's own budget, e.g. fraction=0.1.
    """
    mask = inp.mask
    if scope == "completion":
        keep, cutoff = percentile_keep_per_row(inp.entropy.detach(), mask, fraction, min_score=0.0)
        threshold = cutoff.nanmean() if cutoff.numel() else torch.tensor(NAN, dtype=torch.float64)
        return Selection(_weights(keep, mask, inp.loss_type, normalize, over="completion"), None,
                         {"threshold": threshold})
    values = response_values(inp.entropy, mask, inp)
    if values.numel() == 0:
        return Selection(torch.zeros_like(mask), None, {"threshold": NAN})
    threshold = torch.quantile(values, 1 - fraction)
    keep = ((inp.entropy * mask) >= threshold) & (mask > 0)
    return Selection(_weights(keep, mask, inp.loss_type, normalize, over="batch"), None, {"threshold": threshold})


def _check_clip_cov(*, fraction: float, cov_low: float, cov_high: float) -> None:
    _check_fraction(fraction)
    if not cov_low < cov_high:
        raise ValueError(f"cov_low={cov_low!r} must be below cov_high={cov_high!r}")


def clip_cov_min_tokens(fraction: float) -> int:
    """The fewest response tokens N of a micro-batch at which Clip-Cov's ⌊r·N⌋ detaches a token: ⌈1/r⌉."""
    return math.ceil(round(1.0 / fraction, 9))


def _check_clip_cov_run(options: dict, trainer_args) -> None:
    """Warn, in the trainer's log, when the run's micro-batches are too small for ⌊r·N⌋ to detach any token (then
    Clip-Cov trains exactly as GRPO): at most per_device_train_batch_size x max_completion_length response tokens."""
    r = options["fraction"]
    need = clip_cov_min_tokens(r)
    most = trainer_args.per_device_train_batch_size * trainer_args.max_completion_length
    if most < need:
        logger.warning(
            "forkwatch: select='clip_cov' detaches ⌊r·N⌋ tokens per micro-batch, r = %g, N its response tokens: "
            "nothing below N = %d tokens. This run's micro-batches hold at most %d (per_device_train_batch_size %d x "
            "max_completion_length %d), so Clip-Cov detaches no token and trains exactly as GRPO. Raise the "
            "micro-batch or `fraction` (select_options) to reach N >= 1/r.", r, need, most,
            trainer_args.per_device_train_batch_size, trainer_args.max_completion_length)


@register_selector("clip_cov", check_options=_check_clip_cov, check_run=_check_clip_cov_run)
@torch.no_grad()
def clip_cov(inp: SelectionInput, *, fraction: float = 2e-4, cov_low: float = 1.0, cov_high: float = 5.0) -> Selection:
    """Clip-Cov (Cui et al., arXiv:2505.22617, §4): r = 2e-4, (ω_low, ω_high) = (1, 5), the paper's 7B setting.

    Candidates: response tokens not clipped by PPO (-A·clip(r) ≤ -A·r) with ω_low < c_t < ω_high, c_t the token
    covariance. Pick ⌊r·N⌋ of them uniformly at random (`inp.generator`), N = response tokens of the micro-batch:
    the paper's count, so with r·N < 1 none is picked: at the default r = 2e-4 a micro-batch of fewer than
    N = 1/r = 5,000 response tokens detaches nothing and trains exactly as GRPO (`attach` logs a warning naming N
    and r; `clip_cov_min_tokens`). The authors' verl code takes at least one, which at N ≈ 450 detaches ~10× the
    paper's share. Their weight is 0 (no gradient); every other response token keeps
    weight 1. The authors' 7B script also sets clip_ratio_low = clip_ratio_high = 1 (PPO's own clip nearly off);
    here TRL's epsilon_low / epsilon_high decide which tokens PPO already clipped: set them to 1 for that setting.
    """
    mask = inp.mask
    logprob = inp.logprob.detach()
    adv = inp.advantages.unsqueeze(1) if inp.advantages.dim() == 1 else inp.advantages
    ratio = torch.exp(logprob - inp.old_logprob)
    clipped = -adv * torch.clamp(ratio, 1 - inp.epsilon_low, 1 + inp.epsilon_high) > -adv * ratio
    cov = token_covariance(inp.advantages, logprob, mask)
    candidates = ((cov > cov_low) & (cov < cov_high) & (mask > 0) & ~clipped).nonzero()  # (C, 2), row-major
    weights = (mask > 0).to(mask.dtype)
    k = math.floor(round(fraction * int((mask > 0).sum()), 9))  # rounded first: 0.1·30 is 3, not 2.9999…
    chosen = candidates[:0]
    if k > 0 and len(candidates) > 0:
        perm = torch.randperm(len(candidates), generator=inp.generator, device=inp.generator.device)
        chosen = candidates[perm[:k].to(candidates.device)]
        weights[chosen[:, 0], chosen[:, 1]] = 0
    return Selection(weights, None, {"affected_tokens": float(len(chosen)), "candidate_tokens": float(len(candidates))})


def _check_kl_cov(*, fraction: float, beta: float) -> None:
    _check_fraction(fraction)
    if beta < 0:
        raise ValueError(f"beta={beta!r} must be >= 0")


@register_selector("kl_cov", changes_loss=True, needs_off_policy=True, check_options=_check_kl_cov)
def kl_cov(inp: SelectionInput, *, fraction: float = 2e-3, beta: float = 1.0) -> Selection:
    """KL-Cov (Cui et al., arXiv:2505.22617, §4): k = 2e-3 (the paper's 7B setting; 2e-4 for 32B-class), β = 1.

    The top max(1, ⌊k·N⌋) response tokens by covariance c_t (ties: row-major order) get the loss
    -A·r + β·|log r|; all others -A·r; no token's ratio is clipped (`policy_loss.kl_cov_policy_loss`). Returned as
    `loss_delta` = that loss - TRL's clipped surrogate; weights stay 1 on response tokens. On-policy (r ≡ 1) this is
    exactly GRPO: the authors train several updates per rollout (7B script: mini-batch 32 of 256), so `attach`
    warns unless TRL reuses a rollout (`steps_per_generation > gradient_accumulation_steps` or `num_iterations > 1`).
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
            threshold = cov.reshape(-1)[top[-1]]
    desired = kl_cov_policy_loss(inp.logprob, inp.old_logprob, inp.advantages, penalised, beta)
    current = trl_policy_loss(inp.logprob, inp.old_logprob, inp.advantages, inp.epsilon_low, inp.epsilon_high)
    weights = (mask > 0).to(mask.dtype)
    return Selection(weights, (desired - current) * weights, {"affected_tokens": penalised.sum(), "threshold": threshold})


def _check_stapo(*, prob_threshold: float, entropy_quantile: float) -> None:
    if not 0.0 < prob_threshold < 1.0:
        raise ValueError(f"prob_threshold={prob_threshold!r} must be in (0, 1)")
    if not 0.0 <= entropy_quantile <= 1.0:
        raise ValueError(f"entropy_quantile={entropy_quantile!r} must be in [0, 1]")


@register_selector("stapo", check_options=_check_stapo)
@torch.no_grad()
def stapo(inp: SelectionInput, *, prob_threshold: float = 0.002, entropy_quantile: float = 0.80) -> Selection:
    """STAPO (arXiv:2602.15620, §5): silence spurious tokens and average the loss over the rest.

    Spurious: A > 0 AND p(y_t) < τ_p (= `prob_threshold`; p from the current policy, detached) AND
    H_t < quantile_{τ_h}(H over the response tokens of the micro-batch, over ranks when `inp.gather` is set;
    τ_h = `entropy_quantile`). Defaults are the paper's main setting as read from §5.1 ("τ_h = 80 %") and §5.3
    ("we mask the bottom 80 % of low-entropy tokens"), τ_p = 0.002. (At τ_h = 0.2 the rule is nearly inert:
    p < 0.002 forces H ≥ 0.014 nats, above the 20th entropy percentile of typical rollouts.) Spurious tokens get
    weight 0; the objective divides by the count of all remaining tokens of the batch
    (`renormalise_kept(over="batch")`).
    """
    mask = inp.mask
    values = response_values(inp.entropy, mask, inp)
    if values.numel() == 0:
        return Selection(torch.zeros_like(mask), None, {"affected_tokens": 0.0, "threshold": NAN})
    threshold = torch.quantile(values, entropy_quantile)
    adv = inp.advantages.unsqueeze(1) if inp.advantages.dim() == 1 else inp.advantages
    spurious = (adv > 0) & (inp.logprob.detach() < math.log(prob_threshold)) & (inp.entropy < threshold) & (mask > 0)
    weights = renormalise_kept(~spurious, mask, inp.loss_type, over="batch")
    return Selection(weights, None, {"affected_tokens": spurious.sum(), "threshold": threshold})


def _check_gppo(*, epsilon_low: float, epsilon_high: float) -> None:
    if not (0.0 < epsilon_low < 1.0 and epsilon_high > 0.0):
        raise ValueError(f"epsilon_low={epsilon_low!r} must be in (0, 1) and epsilon_high={epsilon_high!r} > 0")


@register_selector("gppo", changes_loss=True, needs_off_policy=True, check_options=_check_gppo)
def gppo(inp: SelectionInput, *, epsilon_low: float = 0.2, epsilon_high: float = 0.28) -> Selection:
    """GPPO (Klear-Reasoner, arXiv:2508.07629): PPO's value, bounded gradient for clipped tokens.

    -min(δA, clip(δ, (1-ε_l)δ/sg(δ), (1+ε_h)δ/sg(δ))·A) with the paper's ε_l = 0.2, ε_h = 0.28 (these replace
    TRL's clip range for the policy term; `policy_loss.gppo_policy_loss`). Returned as `loss_delta` = GPPO's loss -
    TRL's clipped surrogate; weights stay 1 on response tokens. Metric `affected_tokens` counts clipped tokens.
    On-policy (δ ≡ 1) nothing is clipped and this is exactly GRPO; the authors take several updates per rollout
    (Klear-Reasoner: mini-batch 16 of 128), so `attach` warns unless TRL reuses a rollout.
    """
    mask = inp.mask
    desired = gppo_policy_loss(inp.logprob, inp.old_logprob, inp.advantages, epsilon_low, epsilon_high)
    current = trl_policy_loss(inp.logprob, inp.old_logprob, inp.advantages, inp.epsilon_low, inp.epsilon_high)
    weights = (mask > 0).to(mask.dtype)
    with torch.no_grad():
        ratio = torch.exp(inp.logprob.detach() - inp.old_logprob)
        affected = gppo_clipped(ratio, inp.advantages, epsilon_low, epsilon_high) & (mask > 0)
    return Selection(weights, (desired - current) * weights, {"affected_tokens": affected.sum()})
