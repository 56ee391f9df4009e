"""Selections through TRL's real `_compute_loss` on a tiny model: gradients against losses built by hand.

The seam is built here minimally (what the plugin's glue does: TRL's `get_high_entropy_mask` returns the
selector's weights, `aggregate_like_trl(loss_delta)` is added to TRL's loss), so these tests pin the selectors and
policy_loss.py against TRL itself, independent of the glue. ICT's score is a stand-in (the token entropy): the
properties tested here do not depend on where the score comes from.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS
from forkwatch.plugin.selection.policy_loss import aggregate_like_trl
from forkwatch.plugin.selection.registry import Selection, SelectionInput, get_selector

ATOL = 1e-6


class Seam:
    """Installs a bound selector on a trainer; keeps the last micro-batch's logprobs (with grad) and selection."""

    def __init__(self, trainer, bound, *, seed: int = 0):
        self.trainer, self.bound = trainer, bound
        self.generator = torch.Generator().manual_seed(seed)
        self.logprob: torch.Tensor | None = None
        self.entropy: torch.Tensor | None = None
        self.inputs: dict | None = None
        self.selection: Selection | None = None
        self.selections: list[Selection] = []
        original_logps = trainer._get_per_token_logps_and_entropies
        original_loss = trainer._compute_loss

        def logps(*args, **kwargs):
            out = original_logps(*args, **kwargs)
            if kwargs.get("compute_entropy") and torch.is_grad_enabled():
                self.logprob, self.entropy = out[0], out[1]
            return out

        def compute_loss(model, inputs):
            self.inputs, self.selection = inputs, None
            loss = original_loss(model, inputs)
            if self.selection is not None and self.selection.loss_delta is not None:
                loss = loss + aggregate_like_trl(self.selection.loss_delta, self.mask, trainer, inputs)
            return loss

        trainer._get_per_token_logps_and_entropies = logps
        trainer._compute_loss = compute_loss
        trainer.get_high_entropy_mask = self.select
        trainer.top_entropy_quantile = 0.5

    @property
    def mask(self) -> torch.Tensor:
        return self.inputs["completion_mask"]

    def select(self, entropies, mask, threshold):
        inputs, trainer = self.inputs, self.trainer
        old = inputs.get("old_per_token_logps")
        _, group_ids = torch.unique(inputs["prompt_ids"], dim=0, return_inverse=True)
        inp = SelectionInput(
            mask=mask.float(), entropy=entropies.detach(), logprob=self.logprob,
            old_logprob=self.logprob.detach() if old is None else old, advantages=inputs["advantages"],
            group_ids=group_ids, group_js=entropies.detach(), step=trainer.state.global_step,
            generator=self.generator, epsilon_low=trainer.epsilon_low, epsilon_high=trainer.epsilon_high,
            loss_type=trainer.loss_type,
        )
        self.selection = self.bound(inp)
        self.selections.append(self.selection)
        return self.selection.weights


def fixed_batch(trainer, *, off_policy: bool = True):
    """One generation batch of 2 prompts × 4 rollouts; with `off_policy`, old logprobs that differ from the current
    ones by up to ±0.5 nats, so ratios leave the clip range (as with num_iterations > 1)."""
    inputs = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS[:2] for _ in range(4)])
    if off_policy:
        with torch.no_grad():
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
            attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
            n = inputs["completion_ids"].size(1)
            lp = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, n)[0]
        gen = torch.Generator().manual_seed(123)
        inputs["old_per_token_logps"] = lp + (torch.rand(lp.shape, generator=gen) - 0.5)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return inputs


def surrogate_by_hand(lp, old, adv, eps_low, eps_high):
    """-min(r·A, clip(r)·A), written out independently of policy_loss.py."""
    r = torch.exp(lp - old)
    a = adv.unsqueeze(1)
    unclipped, clipped = r * a, torch.clamp(r, 1 - eps_low, 1 + eps_high) * a
    return -torch.where(unclipped < clipped, unclipped, clipped)


def kl_by_hand(lp, inputs, beta):
    ref = inputs["ref_per_token_logps"]
    return beta * (torch.exp(ref - lp) - (ref - lp) - 1)


def grads(loss, params):
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


def assert_same_grads(loss, reference, params):
    for g, h in zip(grads(loss, params), grads(reference, params), strict=True):
        if g is None or h is None:
            assert g is None and h is None
            continue
        torch.testing.assert_close(g, h, rtol=0, atol=ATOL)


def seq_mean(x, m):
    return ((x * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


MASKING = {
    "ict": {"warmup_steps": 0},
    "high_entropy": {},
    "random": {"fraction": 0.3, "warmup_steps": 0},
    "clip_cov": {"fraction": 0.2, "cov_low": -10.0, "cov_high": 10.0},  # wide band: a few tokens on a tiny model
    "stapo": {"prob_threshold": 0.5, "entropy_quantile": 0.9},
}


@pytest.mark.parametrize("name", sorted(MASKING))
def test_dropped_tokens_contribute_exactly_zero_gradient(make_trainer, name):
    trainer = make_trainer(beta=0.0)
    seam = Seam(trainer, get_selector(name, **MASKING[name]))
    inputs = fixed_batch(trainer)
    loss = trainer._compute_loss(trainer.model, inputs)
    (per_token,) = torch.autograd.grad(loss, seam.logprob)
    dropped = seam.selection.weights == 0
    assert dropped.any() and (~dropped & (seam.mask > 0)).any()
    assert (per_token[dropped] == 0).all()


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_ict_through_trl_matches_sparse_grpo_by_hand(make_trainer, loss_type):
    trainer = make_trainer(beta=0.04, loss_type=loss_type)
    seam = Seam(trainer, get_selector("ict", warmup_steps=0, fraction=0.25))
    inputs = fixed_batch(trainer)
    loss = trainer._compute_loss(trainer.model, inputs)
    lp, m = seam.logprob, seam.mask.float()
    kept = (seam.selection.weights > 0).float()
    assert torch.equal(kept.sum(-1), torch.ceil(m.sum(-1) * 0.25).clamp(min=1))
    surrogate = surrogate_by_hand(lp, inputs["old_per_token_logps"], inputs["advantages"], 0.2, 0.2)
    kl = kl_by_hand(lp, inputs, 0.04)
    if loss_type == "grpo":  # Sparse-GRPO: mean over kept tokens of each completion, then over completions
        reference = ((surrogate * kept).sum(-1) / kept.sum(-1)).mean() + seq_mean(kl, m)
    else:  # bnpo: one mean over the kept tokens of the micro-batch
        reference = (surrogate * kept).sum() / kept.sum() + (kl * m).sum() / m.sum()
    torch.testing.assert_close(loss, reference, rtol=0, atol=ATOL)
    assert_same_grads(loss, reference, list(trainer.model.parameters()))


def test_high_entropy_all_equals_trls_top_entropy_quantile(make_trainer):
    ours = make_trainer()
    Seam(ours, get_selector("high_entropy", fraction=0.2, normalize="all"))
    inputs = fixed_batch(ours)
    loss = ours._compute_loss(ours.model, inputs)
    trl = make_trainer(top_entropy_quantile=0.2)
    trl.model.train()
    trl.current_gradient_accumulation_steps = 1
    reference = trl._compute_loss(trl.model, inputs)
    assert torch.equal(loss.detach(), reference.detach())
    for g, h in zip(grads(loss, list(ours.model.parameters())), grads(reference, list(trl.model.parameters())),
                    strict=True):
        torch.testing.assert_close(g, h, rtol=0, atol=ATOL)


def test_kl_cov_through_trl_matches_its_loss_by_hand(make_trainer):
    trainer = make_trainer(beta=0.0, loss_type="grpo")
    seam = Seam(trainer, get_selector("kl_cov", fraction=0.1))
    inputs = fixed_batch(trainer)
    loss = trainer._compute_loss(trainer.model, inputs)
    lp, m, old, adv = seam.logprob, seam.mask.float(), inputs["old_per_token_logps"], inputs["advantages"]
    with torch.no_grad():  # the top 10 % of response tokens by covariance, by hand
        a = adv.unsqueeze(1).expand_as(lp)
        cov = (a - a[m > 0].mean()) * (lp - lp[m > 0].mean())
        cov[m == 0] = -float("inf")
        k = int(0.1 * m.sum())
        penalised = torch.zeros_like(m).view(-1)
        penalised[cov.view(-1).argsort(descending=True, stable=True)[:k]] = 1.0
        penalised = penalised.view_as(m)
    log_r = lp - old
    per_token = -adv.unsqueeze(1) * torch.exp(log_r) + log_r.abs() * penalised
    reference = seq_mean(per_token, m)
    assert seam.selection.metrics["affected_tokens"] == float(k)
    torch.testing.assert_close(loss, reference, rtol=0, atol=ATOL)
    assert_same_grads(loss, reference, list(trainer.model.parameters()))


def test_gppo_through_trl_matches_its_loss_by_hand(make_trainer):
    trainer = make_trainer(beta=0.04, loss_type="dr_grpo")
    seam = Seam(trainer, get_selector("gppo"))
    inputs = fixed_batch(trainer)
    loss = trainer._compute_loss(trainer.model, inputs)
    lp, m, old, adv = seam.logprob, seam.mask.float(), inputs["old_per_token_logps"], inputs["advantages"]
    r = torch.exp(lp - old)
    a = adv.unsqueeze(1)
    bound_low, bound_high = 0.8 * r / r.detach(), 1.28 * r / r.detach()
    clipped = torch.where(r < 0.8, bound_low, torch.where(r > 1.28, bound_high, r))
    per_token = -torch.where(r * a < clipped * a, r * a, clipped * a) + kl_by_hand(lp, inputs, 0.04)
    reference = (per_token * m).sum() / (m.size(0) * trainer.max_completion_length)
    assert seam.selection.metrics["affected_tokens"] > 0
    torch.testing.assert_close(loss, reference, rtol=0, atol=ATOL)
    assert_same_grads(loss, reference, list(trainer.model.parameters()))


def test_masking_selectors_through_trl_match_weighted_loss_by_hand(make_trainer):
    # clip_cov (0/1 weights, TRL's per-completion mean); stapo and high_entropy: one mean over all kept tokens of
    # the batch, as their authors' objectives (not TRL's per-completion mean)
    for name in ("clip_cov", "stapo", "high_entropy"):
        trainer = make_trainer(beta=0.0, loss_type="grpo")
        seam = Seam(trainer, get_selector(name, **MASKING[name]))
        inputs = fixed_batch(trainer)
        loss = trainer._compute_loss(trainer.model, inputs)
        lp, m = seam.logprob, seam.mask.float()
        kept = (seam.selection.weights > 0).float()
        surrogate = surrogate_by_hand(lp, inputs["old_per_token_logps"], inputs["advantages"], 0.2, 0.2)
        if name == "clip_cov":
            reference = ((surrogate * kept).sum(-1) / m.sum(-1).clamp(min=1)).mean()
        else:
            reference = (surrogate * kept).sum() / kept.sum()
        torch.testing.assert_close(loss, reference, rtol=0, atol=ATOL)
        assert_same_grads(loss, reference, list(trainer.model.parameters()))


def _trained_params(make_trainer, select: tuple[str, dict] | None, *, seed: int = 0, **overrides):
    trainer = make_trainer(max_steps=2, **overrides)
    seam = Seam(trainer, get_selector(select[0], **select[1]), seed=seed) if select else None
    trainer.train()
    return [p.detach().clone() for p in trainer.model.parameters()], seam


def test_ict_with_fraction_one_and_no_warmup_is_plain_grpo(make_trainer):
    plain, _ = _trained_params(make_trainer, None)
    ict, seam = _trained_params(make_trainer, ("ict", {"fraction": 1.0, "warmup_steps": 0}))
    assert seam.selections
    assert all(set(s.weights.unique().tolist()) <= {0.0, 1.0} for s in seam.selections)
    for p, q in zip(plain, ict, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=ATOL)


def test_seeded_random_selection_is_reproducible_run_to_run(make_trainer):
    first, a = _trained_params(make_trainer, ("random", {}), seed=3)
    second, b = _trained_params(make_trainer, ("random", {}), seed=3)
    assert all(torch.equal(x.weights, y.weights) for x, y in zip(a.selections, b.selections, strict=True))
    for p, q in zip(first, second, strict=True):
        assert torch.equal(p, q)
