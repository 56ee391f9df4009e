"""The effective rank (plugin/token_math.py) against a direct numpy computation and on cases with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from forkwatch.plugin.token_math import effective_rank, effective_ranks


def _numpy_er(x: np.ndarray) -> float:
    x = x - x.mean(0, keepdims=True)
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    s = s[s > s[0] * 1e-9]
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def test_matches_numpy_float64_on_random_states():
    g = torch.Generator().manual_seed(0)
    for n, h in ((30, 16), (8, 64), (100, 100)):
        x = torch.randn(n, h, generator=g) * torch.linspace(0.1, 3.0, h)
        assert effective_rank(x) == pytest.approx(_numpy_er(x.numpy()), rel=1e-4)


def test_rank_one_states_have_effective_rank_one():
    v = torch.randn(32)
    x = torch.linspace(-2.0, 5.0, 20).unsqueeze(1) * v + torch.randn(32)  # a line, off the origin
    assert effective_rank(x) == pytest.approx(1.0, abs=1e-6)


def test_orthogonal_equal_norm_rows_have_effective_rank_n():
    n = 6
    eye = torch.eye(n, 10) * 3.0
    assert effective_rank(eye, center=False) == pytest.approx(n, rel=1e-6)
    # centred: ±e_i already has mean 0, so the n directions are kept, each twice
    assert effective_rank(torch.cat([eye, -eye])) == pytest.approx(n, rel=1e-6)


def test_only_the_last_512_tokens_count():
    g = torch.Generator().manual_seed(1)
    line = torch.arange(600.0).unsqueeze(1) * torch.randn(1, 8, generator=g)  # rank 1
    noise = torch.randn(100, 8, generator=g)  # full rank
    x = torch.cat([noise, line])  # the last 512 rows are all on the line
    assert effective_rank(x) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(x, max_tokens=700) == pytest.approx(_numpy_er(x.numpy()), rel=1e-4)
    assert effective_rank(x, max_tokens=700) > 1.01  # the noise rows now count


def test_bf16_states_are_upcast():
    x = torch.randn(40, 24)
    assert effective_rank(x.bfloat16()) == pytest.approx(_numpy_er(x.bfloat16().float().numpy()), rel=1e-4)


def test_fewer_than_two_tokens_gives_nan():
    assert math.isnan(effective_rank(torch.randn(1, 8)))
    assert math.isnan(effective_rank(torch.ones(5, 8)))


def test_batched_rows_use_only_their_masked_positions():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 12, 8, generator=g)
    mask = torch.zeros(3, 12)
    mask[0, 2:] = 1
    mask[1, :7] = 1
    mask[2, 4:9] = 1
    got = effective_ranks(hidden, mask)
    for b in range(3):
        want = _numpy_er(hidden[b][mask[b].bool()].numpy())
        assert got[b] == pytest.approx(want, rel=1e-4)


def test_completion_ranks_take_the_completion_positions_of_chosen_rows():
    g = torch.Generator().manual_seed(3)
    prompt, comp = 5, 9
    last = torch.randn(4, prompt + comp, 6, generator=g)
    last[2, :prompt] = 1e3  # the prompt's states must not count
    mask = torch.ones(4, comp)
    mask[2, 6:] = 0
    from forkwatch.plugin.lens_budget import LensClock
    from forkwatch.plugin.lenses import EffectiveRankBudget

    clock = LensClock(budget=None, max_every=None, every={"effective_rank": 1})  # no budget: every step of its grid
    budget = EffectiveRankBudget(completions=2, clock=clock)
    got = budget.measure(1, last, mask, torch.tensor([True, False, True, False])).tolist()
    assert got[1] == pytest.approx(_numpy_er(last[2, prompt : prompt + 6].numpy()), rel=1e-4)
    assert got[0] == pytest.approx(_numpy_er(last[0, prompt:].numpy()), rel=1e-4)
