"""Selection diagnostics (plugin/token_math.py) against autograd and hand counts on tiny batches."""

from __future__ import annotations

import math

import pytest
import torch
from forkwatch.plugin.token_math import DIAGNOSTICS, logit_grad_sq, selection_diagnostics


def _batch(seed: int = 0, b: int = 3, t: int = 5, v: int = 7):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(b, t, v, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)  # (B, T, V) logits
    y = torch.randint(0, v, (b, t), generator=gen)  # (B, T) sampled tokens
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2, [1.0] * 4 + [0.0]], dtype=torch.float64)
    adv = torch.tensor([1.5, -0.5, 0.8], dtype=torch.float64)
    return z, y, mask, adv


def _quantities(z, y):
    logp_all = torch.log_softmax(z, -1)  # (B, T, V)
    logprob = logp_all.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (B, T)
    p = logp_all.exp()
    entropy = -(p * logp_all).sum(-1)
    renyi2 = -torch.logsumexp(2 * logp_all, -1)  # H₂ = -log Σ p²
    return logprob, entropy.detach(), renyi2.detach()


def test_logit_grad_sq_equals_autograd_norm_of_grad_log_p():
    z, y, _, _ = _batch()
    logprob, _, renyi2 = _quantities(z, y)
    (grad,) = torch.autograd.grad(logprob.sum(), z)  # each token's log p depends only on its own logits
    torch.testing.assert_close(logit_grad_sq(logprob.detach(), renyi2), grad.pow(2).sum(-1), rtol=1e-10, atol=1e-12)


def test_grad_share_is_the_kept_share_of_the_advantage_weighted_policy_gradient():
    z, y, mask, adv = _batch()
    logprob, entropy, renyi2 = _quantities(z, y)
    weights = torch.zeros_like(mask)
    weights[0, [1, 3]] = 2.5
    weights[2, 0] = 1.0
    weights[1, 4] = 7.0  # off the mask: not kept
    # autograd: per-token gradient of A·log p_y with respect to that token's logits
    (grad,) = torch.autograd.grad((adv.unsqueeze(1) * logprob).sum(), z)
    norm_sq = grad.pow(2).sum(-1)  # (B, T)
    kept = (weights != 0) & (mask > 0)
    expected = float(norm_sq[kept].sum() / norm_sq[mask > 0].sum())
    got = selection_diagnostics(weights, mask, logprob.detach(), entropy, renyi2, adv)
    assert float(got[DIAGNOSTICS.index("grad_share")]) == pytest.approx(expected, rel=1e-10)


def test_kept_means_and_entropy_overlap_by_hand():
    mask = torch.ones(2, 3, dtype=torch.float64)
    entropy = torch.tensor([[0.1, 2.0, 0.3], [1.5, 0.2, 0.05]], dtype=torch.float64)
    logprob = torch.log(torch.tensor([[0.9, 0.2, 0.8], [0.4, 0.99, 0.5]], dtype=torch.float64))
    weights = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)  # kept: H 2.0 and 0.3
    got = dict(zip(DIAGNOSTICS, selection_diagnostics(weights, mask, logprob, entropy, torch.zeros_like(mask),
                                                      torch.ones(2, dtype=torch.float64)).tolist(), strict=True))
    assert got["kept_p_mean"] == pytest.approx((0.2 + 0.8) / 2)
    assert got["kept_entropy_mean"] == pytest.approx((2.0 + 0.3) / 2)
    assert got["entropy_overlap"] == pytest.approx(0.5)  # top-2 by entropy: 2.0 and 1.5; 2.0 is kept


def test_top_entropy_selection_overlaps_fully_and_nothing_kept_gives_nan():
    z, y, mask, adv = _batch(seed=1)
    logprob, entropy, renyi2 = _quantities(z, y)
    key = torch.where(mask > 0, entropy, -math.inf).flatten()
    top = torch.zeros_like(key, dtype=torch.bool)
    top[key.topk(4).indices] = True
    weights = top.view_as(mask).double()
    got = selection_diagnostics(weights, mask, logprob.detach(), entropy, renyi2, adv)
    assert float(got[DIAGNOSTICS.index("entropy_overlap")]) == 1.0
    none = selection_diagnostics(torch.zeros_like(mask), mask, logprob.detach(), entropy, renyi2, adv)
    assert float(none[DIAGNOSTICS.index("grad_share")]) == 0.0
    assert all(math.isnan(float(none[DIAGNOSTICS.index(k)])) for k in DIAGNOSTICS[1:])


def test_dense_selection_has_grad_share_one():
    z, y, mask, adv = _batch(seed=2)
    logprob, entropy, renyi2 = _quantities(z, y)
    got = selection_diagnostics(mask.clone(), mask, logprob.detach(), entropy, renyi2, adv)
    assert float(got[DIAGNOSTICS.index("grad_share")]) == pytest.approx(1.0)
