"""The probes' teacher-forced scores (plugin/token_math.py `teacher_forced`) against float64 references from full logits."""

from __future__ import annotations

import math

import pytest
import torch
from forkwatch.plugin.token_math import teacher_forced as probe_scores


def test_scores_match_float64_reference_across_chunks():
    g = torch.Generator().manual_seed(0)
    t, v, temp = 37, 50, 0.7
    logits = torch.randn(t, v, generator=g) * 3
    targets = torch.randint(0, v, (t,), generator=g)
    got = probe_scores(logits, targets, temperature=temp, k=4, chunk=8)
    p = torch.softmax(logits.double() / temp, -1)
    torch.testing.assert_close(got.entropy.double(), -(p * p.log()).sum(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.renyi2.double(), -(p**2).sum(-1).log(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.logprob.double(), p.log().gather(-1, targets[:, None]).squeeze(-1), atol=1e-5,
                               rtol=1e-5)
    top = torch.topk(p, 4, -1)
    assert torch.equal(got.top_ids, top.indices)
    torch.testing.assert_close(got.top_probs.double(), top.values, atol=1e-6, rtol=1e-5)
    assert bool((got.renyi2 <= got.entropy + 1e-6).all())


def test_one_hot_logits_score_zero_and_uniform_scores_log_v():
    v = 16
    sharp = torch.full((2, v), -1e4)
    sharp[:, 3] = 0.0
    uniform = torch.zeros(2, v)
    got = probe_scores(torch.cat([sharp, uniform]), torch.tensor([3, 3, 0, 1]))
    assert got.entropy[:2].abs().max() < 1e-6 and got.renyi2[:2].abs().max() < 1e-6
    torch.testing.assert_close(got.entropy[2:], torch.full((2,), math.log(v)))
    torch.testing.assert_close(got.renyi2[2:], torch.full((2,), math.log(v)))


def test_masked_logits_do_not_give_nan():
    logits = torch.tensor([[0.0, 1.0, float("-inf")]])
    got = probe_scores(logits, torch.tensor([1]))
    assert math.isfinite(float(got.entropy[0])) and float(got.entropy[0]) > 0


def test_empty_completion_gives_empty_scores():
    got = probe_scores(torch.zeros(0, 9), torch.zeros(0, dtype=torch.long), k=3)
    assert got.entropy.shape == (0,) and got.top_ids.shape == (0, 3)


@pytest.mark.parametrize("k", [1, 100])
def test_k_is_capped_at_the_vocabulary(k):
    got = probe_scores(torch.randn(3, 7), torch.tensor([0, 1, 2]), k=k)
    assert got.top_ids.shape == (3, min(k, 7))
