"""The one place where forkwatch changes TRL's per-token policy loss, and how TRL normalises a per-token loss.

TRL (`GRPOTrainer._compute_loss`, the same in 1.14-1.16; token-level importance sampling, loss types
grpo/bnpo/dr_grpo/dapo) builds

    L_trl[b, t] = -min(r·A, clip(r, 1-ε_low, 1+ε_high)·A),   r = exp(logprob - old_logprob)        (B, T)

multiplies it by forkwatch's selection weights (the `get_high_entropy_mask` seam), adds β·KL and normalises per
loss type. A method that changes the loss itself (KL-Cov, GPPO) returns

    loss_delta = L_method - L_trl        (B, T), with gradient

built here from the same tensors with the same operations as TRL, so `L_trl + loss_delta` equals `L_method` in
value and gradient (up to float rounding). The glue adds `aggregate_like_trl(loss_delta, mask, trainer, inputs)`
to TRL's scalar loss; TRL's aggregation is linear, so the sum is exactly the aggregation of `L_method`. The delta is
not multiplied by the selection weights: a changes_loss selector folds its weights into the delta itself (the
built-in ones keep every response token, weight 1).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

# Loss types whose per-token policy loss is TRL's clipped surrogate above, which `trl_policy_loss` reconstructs:
# the only ones a changes_loss method (KL-Cov, GPPO) is defined for.
CLIPPED_SURROGATE_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")

# How TRL normalises the masked per-token loss, per loss type: "sequence" = a mean (or sum) per completion, then a
# mean over completions; "batch" = one denominator for the whole micro-batch. Selectors that renormalise over the
# tokens they keep scale their weights at the same level (see `methods.renormalise_kept`).
NORMALISER_SCOPE: dict[str, str] = {
    "grpo": "sequence",
    "sapo": "sequence",
    "luspo": "sequence",
    "bnpo": "batch",
    "dr_grpo": "batch",
    "dapo": "batch",
    "cispo": "batch",
    "vespo": "batch",
}


# Loss types whose TRL normaliser is a mean over each completion's tokens, then a mean over completions.
PER_COMPLETION_MEAN = ("grpo", "sapo")


def _as_column(advantages: torch.Tensor) -> torch.Tensor:
    # TRL accepts (B,) or (B, T) advantages and unsqueezes the former.
    return advantages.unsqueeze(1) if advantages.dim() == 1 else advantages


def trl_policy_loss(
    logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float
) -> torch.Tensor:
    """TRL's token-level clipped surrogate, op for op: -min(r·A, clip(r, 1-ε_l, 1+ε_h)·A).  (B, T)

    Written with the same operations in the same order as `GRPOTrainer._compute_loss` so that the difference
    between TRL's tensor and this one is exactly zero, not merely small.
    """
    advantages = _as_column(advantages)
    coef_1 = torch.exp(logprob - old_logprob)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(coef_1 * advantages, coef_2 * advantages)


def kl_cov_policy_loss(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantages: torch.Tensor,
    penalised: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """KL-Cov (Cui et al., "The Entropy Mechanism of RL for Reasoning LMs", arXiv:2505.22617), per token:

        L = -A·r + β·|log r|·[t penalised],   r = exp(logprob - old_logprob), no clipping for any token.   (B, T)

    `penalised` (B, T) bool marks the top-k covariance tokens. At r = 1 (the first pass over fresh samples)
    |log r| has value 0 and gradient 0 (torch's sign(0) = 0, as in the authors' verl code): the penalty acts
    only on off-policy passes (num_iterations > 1 or steps_per_generation > gradient_accumulation_steps).
    """
    advantages = _as_column(advantages)
    log_ratio = logprob - old_logprob
    ratio = torch.exp(log_ratio)
    return -advantages * ratio + beta * log_ratio.abs() * penalised.to(ratio.dtype)


def gppo_policy_loss(
    logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float
) -> torch.Tensor:
    """GPPO (Su et al., Klear-Reasoner, arXiv:2508.07629), per token:

        L = -min(δ·A, clip(δ, (1-ε_l)·δ/sg(δ), (1+ε_h)·δ/sg(δ))·A),   δ = exp(logprob - old_logprob).   (B, T)

    The value equals PPO's clipped surrogate; a clipped token keeps the gradient (1±ε)·A·∇log π instead of zero.
    `(1-ε)·(δ/sg(δ))` is written in that order because δ/δ is exactly 1.0 in IEEE arithmetic, so the forward value is
    bit-identical to PPO's bound.
    """
    advantages = _as_column(advantages)
    ratio = torch.exp(logprob - old_logprob)
    unit = ratio / ratio.detach()  # value 1, gradient ∇log δ
    low, high = (1 - epsilon_low) * unit, (1 + epsilon_high) * unit
    clipped = torch.where(ratio < 1 - epsilon_low, low, torch.where(ratio > 1 + epsilon_high, high, ratio))
    return -torch.min(ratio * advantages, clipped * advantages)


def gppo_clipped(ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float) -> torch.Tensor:
    """Tokens where PPO's clip is active (the min picks the clipped term): where GPPO restores a gradient.  (B, T)"""
    advantages = _as_column(advantages)
    return ((ratio < 1 - epsilon_low) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    *,
    accumulation: float = 1.0,
    max_completion_length: int | None = None,
    batch_normaliser: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar as TRL's `_compute_loss` does for `loss_type` (a pure function).

        grpo, sapo:         mean_b( Σ_t x·m / max(Σ_t m, 1) ) / accumulation
        bnpo:               Σ x·m / max(Σ m, 1) / accumulation
        dr_grpo:            Σ x·m / (B · max_completion_length) / accumulation
        dapo, cispo, vespo: Σ x·m / batch_normaliser
        luspo:              mean_b( Σ_t x·m ) / accumulation

    `accumulation` is the gradient-accumulation divisor (1 in eval); `batch_normaliser` is TRL's token count for
    the dapo family, already scaled to one accumulation window. Linear in `per_token` (like verl's
    `agg_loss(loss_mat, loss_mask, loss_agg_mode)`), so adding the result to TRL's loss is adding `per_token` to
    TRL's per-token policy loss.
    """
    masked = per_token * mask
    if loss_type in PER_COMPLETION_MEAN:
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / accumulation
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        return masked.sum() / (per_token.size(0) * max_completion_length) / accumulation
    if loss_type in ("dapo", "cispo", "vespo"):
        if batch_normaliser is None:
            raise ValueError(f"loss_type={loss_type!r} needs batch_normaliser (TRL's num_items_in_batch, scaled)")
        return masked.sum() / batch_normaliser
    if loss_type == "luspo":
        return masked.sum(-1).mean() / accumulation
    raise ValueError(f"forkwatch does not know how TRL normalises loss_type={loss_type!r}; "
                     f"known: {', '.join(NORMALISER_SCOPE)}")


def aggregate_like_trl(
    per_token: torch.Tensor, mask: torch.Tensor, trainer: Any, inputs: dict[str, Any]
) -> torch.Tensor:
    """`aggregate_loss` with the mode and constants TRL uses for this micro-batch of a live `GRPOTrainer`
    (plugin/trl_seams.py `loss_constants`), after what TRL applies to its per-token policy loss after the selection
    weights: the vLLM importance-sampling ratio, when TRL applies one."""
    from forkwatch.plugin.trl_seams import loss_constants

    constants = loss_constants(trainer, inputs)
    ratio = constants.pop("importance_ratio")
    if ratio is not None:
        per_token = per_token * ratio
    return aggregate_loss(per_token, mask, constants.pop("loss_type"), **constants)


def reuses_rollouts(trainer_args: Any) -> bool:
    """Whether TRL takes more than one optimizer step per rollout, so that the importance ratio can leave 1."""
    return (getattr(trainer_args, "num_iterations", 1) > 1
            or trainer_args.steps_per_generation > trainer_args.gradient_accumulation_steps)


def validate_selection(bound_selector: Any, trainer_args: Any) -> None:
    """Refuse, at attach time, a selector together with TRL options it cannot work with; the message names the fix.

    `bound_selector` is a `registry.BoundSelector`, `trainer_args` the trainer's `GRPOConfig`. Call it before the
    glue sets `top_entropy_quantile` itself. A method's own `check_run` (registry) refuses or warns about settings
    only it knows (ICT against the reference without a warm-up; Clip-Cov's ⌊r·N⌋ at small micro-batches).
    """
    name = bound_selector.name
    quantile = getattr(trainer_args, "top_entropy_quantile", 1.0)
    if quantile < 1.0:
        raise ValueError(
            f"select={name!r} uses TRL's entropy-mask seam, so TRL's own top_entropy_quantile={quantile} cannot be "
            "applied as well. Set top_entropy_quantile=1.0; for TRL's behaviour use "
            f"select='high_entropy', fraction={quantile}, normalize='all'."
        )
    loss_type = trainer_args.loss_type
    if loss_type not in NORMALISER_SCOPE:
        raise ValueError(
            f"select={name!r}: forkwatch does not know how TRL normalises loss_type={loss_type!r}; "
            f"use one of {', '.join(NORMALISER_SCOPE)}."
        )
    liger_config = getattr(trainer_args, "liger_kernel_config", None) or {}
    if getattr(trainer_args, "use_liger_loss", False) or (
        getattr(trainer_args, "use_liger_kernel", False) and liger_config.get("fused_linear_cross_entropy")
    ):
        raise ValueError(
            f"select={name!r} needs TRL's per-token loss, which a fused Liger loss computes out of sight; "
            "turn the fused loss off (use_liger_loss=False, liger_kernel_config={'fused_linear_cross_entropy': False})."
        )
    if bound_selector.needs_group_js and getattr(trainer_args, "num_generations", 2) < 2:
        raise ValueError(f"select={name!r} scores tokens against the other rollouts of a prompt: set num_generations >= 2.")
    if bound_selector.changes_loss:
        _validate_loss_change(name, trainer_args)
    if bound_selector.spec.check_run is not None:  # what only this method knows about the run's settings
        bound_selector.spec.check_run(bound_selector.resolved_options(), trainer_args)
    if bound_selector.needs_off_policy and not reuses_rollouts(trainer_args):
        warnings.warn(
            f"select={name!r} acts only through the importance ratio, which is exactly 1 when every rollout is used "
            f"for one optimizer step (num_iterations={getattr(trainer_args, 'num_iterations', 1)}, "
            f"steps_per_generation={trainer_args.steps_per_generation} <= gradient_accumulation_steps="
            f"{trainer_args.gradient_accumulation_steps}): this run trains exactly as it would without it. "
            "Its authors take several updates per rollout: set steps_per_generation to a multiple of gradient_accumulation_steps (e.g. 4x) or "
            "num_iterations > 1.",
            stacklevel=3,
        )


def _validate_loss_change(name: str, trainer_args: Any) -> None:
    """Refusals for methods that replace the per-token policy loss through loss_delta = L_method - L_trl."""
    loss_type = trainer_args.loss_type
    if loss_type not in CLIPPED_SURROGATE_LOSS_TYPES:
        raise ValueError(
            f"select={name!r} replaces TRL's clipped surrogate and is defined only for loss_type in "
            f"{CLIPPED_SURROGATE_LOSS_TYPES}; got {loss_type!r}. Set loss_type='grpo' (or bnpo, dr_grpo, dapo)."
        )
    if getattr(trainer_args, "importance_sampling_level", "token") != "token":
        raise ValueError(
            f"select={name!r} is a token-level loss; importance_sampling_level="
            f"{trainer_args.importance_sampling_level!r} is not. Set importance_sampling_level='token'."
        )
    if getattr(trainer_args, "entropy_coef", 0.0) != 0.0 or getattr(trainer_args, "use_adaptive_entropy", False):
        raise ValueError(
            f"select={name!r} is itself an entropy-control method; TRL's entropy bonus (entropy_coef="
            f"{trainer_args.entropy_coef}, use_adaptive_entropy={getattr(trainer_args, 'use_adaptive_entropy', False)})"
            " would confound it. Set entropy_coef=0.0 and use_adaptive_entropy=False."
        )
    if getattr(trainer_args, "off_policy_mask_threshold", None) is not None:
        raise ValueError(
            f"select={name!r}: TRL's off-policy sequence mask multiplies TRL's loss but not forkwatch's loss_delta, so "
            "masked sequences would keep the method's correction. Set off_policy_mask_threshold=None."
        )
    if getattr(trainer_args, "delta", None) is not None:
        raise ValueError(
            f"select={name!r} rebuilds TRL's per-token loss without two-sided clipping; delta="
            f"{trainer_args.delta} would make the correction inexact. Set delta=None."
        )
