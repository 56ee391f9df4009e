"""plugin/token_math.py against float64 references computed from full logits."""

from __future__ import annotations

import math

import numpy as np
import torch
from forkwatch.plugin import token_math


def _projector(weight: torch.Tensor, temperature: float = 1.0):
    return lambda h: (h.to(weight.dtype) @ weight.T).float() / temperature


def _reference_js(logits: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """float64 brute force: logits (B, T, V)."""
    p = torch.softmax(logits.double(), -1)
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for i in range(p.size(0)):
        sib = (groups == groups[i]).nonzero().flatten()
        for t in range(p.size(1)):
            if not mask[i, t]:
                continue
            act = [j for j in sib.tolist() if mask[j, t]]
            if len(act) < 2:
                continue
            pbar = p[act, t].mean(0)
            m = 0.5 * (p[i, t] + pbar)
            kl = lambda a, b: (a * (a / b).log()).nansum()  # noqa: E731
            out[i, t] = 0.5 * kl(p[i, t], m) + 0.5 * kl(pbar, m)
    return out


def test_group_js_matches_float64_reference_in_chunks():
    g = torch.Generator().manual_seed(0)
    b, t, h, v = 6, 9, 8, 37
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.8
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    mask = torch.ones(b, t)
    mask[0, 5:] = 0  # rollouts of different lengths: fewer siblings active late
    mask[1, 7:] = 0
    mask[3, 2:] = 0
    got = token_math.group_js(hidden, mask, groups, _projector(weight), chunk=4)
    ref = _reference_js(hidden.double() @ weight.double().T, mask.bool(), groups)
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=0)


def test_group_js_is_zero_with_one_active_rollout_and_bounded_by_ln2():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 6, 4, generator=g) * 20  # very peaked: JS near its maximum
    weight = torch.randn(50, 4, generator=g)
    mask = torch.ones(2, 6)
    mask[1, 3:] = 0
    js = token_math.group_js(hidden, mask, torch.tensor([0, 0]), _projector(weight), chunk=2)
    assert torch.all(js[:, 3:] == 0)  # only rollout 0 active there
    assert torch.all(js >= 0) and torch.all(js <= math.log(2) + 1e-6)
    assert js[:, :3].max() > 0.1


def test_group_js_step_scores_each_position_like_the_float64_reference():
    g = torch.Generator().manual_seed(2)
    b, t, v, temp = 7, 6, 41, 0.7
    logits = torch.randn(b, t, v, generator=g) * 2
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2])  # group 2 has one rollout: always 0
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 4:] = False
    mask[3, 1:] = False
    mask[4, 2:] = False  # group 1 falls to one active rollout at t = 2
    got = torch.stack([token_math.group_js_step(logits[:, s], mask[:, s], groups, 3, temp, chunk=2) for s in range(t)], 1)
    ref = _reference_js(logits.double() / temp, mask, groups)
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=0)
    assert torch.all(got[~mask] == 0) and torch.all(got[6] == 0) and torch.all(got[5, 2:] == 0)


def test_covariance_centres_advantage_and_logprob_over_response_tokens():
    lp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, -1.0])
    got = token_math.covariance(lp, adv, mask)
    lps = np.array([-1.0, -2.0, -0.5, -0.5, -0.5])
    advs = np.array([1.0, 1.0, -1.0, -1.0, -1.0])
    ref = (advs - advs.mean()) * (lps - lps.mean())
    assert torch.allclose(got[mask.bool()].double(), torch.tensor(ref), atol=1e-6)
    assert got[0, 2] == 0


def test_topk_alternatives_and_sampled_rank():
    weight = torch.eye(4)
    hidden = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    ids, probs, rank = token_math.topk_alternatives(hidden, torch.tensor([2, 2]), _projector(weight), k=2)
    assert ids.tolist() == [[0, 1], [2, 3]]
    ref = torch.softmax(hidden.double(), -1)
    torch.testing.assert_close(probs.double(), ref.gather(1, ids), atol=1e-6, rtol=0)
    assert rank.tolist() == [2, 0]


def test_fork_mask_keeps_top_fraction_of_masked_tokens():
    ent = torch.tensor([[0.1, 0.9, 0.5, 5.0], [0.2, 0.8, 0.3, 0.4]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    forks = token_math.fork_mask(ent, mask, 0.3)  # ceil(0.3 * 7) = 3 tokens, never the masked 5.0
    assert forks.tolist() == [[False, True, True, False], [False, True, False, False]]


def test_keep_count_rounds_away_float_overshoot_for_counts_and_tensors():
    assert 0.07 * 100 != 7.0  # the case the rounding is for
    assert token_math.keep_count(100, 0.07) == 7 and token_math.keep_count(torch.tensor([100]), 0.07).tolist() == [7]
    assert token_math.keep_count(0, 0.5) == 0 and token_math.keep_count(3, 0.01) == 1


def test_fork_mask_counts_like_the_selectors():
    ent = torch.arange(100, dtype=torch.float32).view(1, 100)
    assert int(token_math.fork_mask(ent, torch.ones(1, 100), 0.07).sum()) == 7  # not ceil(7.000000000000001) = 8
