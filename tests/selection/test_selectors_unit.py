"""Every selector on hand-built tensors: ties, all-masked rows, short completions, empty batches, seeding."""

from __future__ import annotations

import math

import pytest
import torch
from forkwatch.plugin.selection import methods as selectors
from forkwatch.plugin.selection.registry import (
    Selection,
    SelectionInput,
    get_selector,
    register_selector,
    registered_selector,
    selector_names,
    unregister_selector,
)

ALL = ["clip_cov", "gppo", "high_entropy", "ict", "kl_cov", "random", "stapo"]


def make_input(mask, **overrides) -> SelectionInput:
    mask = torch.as_tensor(mask, dtype=torch.float64)
    shape = mask.shape
    fields = dict(
        mask=mask,
        entropy=torch.zeros(shape, dtype=torch.float64),
        logprob=torch.zeros(shape, dtype=torch.float64),
        old_logprob=torch.zeros(shape, dtype=torch.float64),
        advantages=torch.zeros(shape[0], dtype=torch.float64),
        group_ids=torch.zeros(shape[0], dtype=torch.long),
        group_js=torch.zeros(shape, dtype=torch.float64),
        step=100,
        generator=torch.Generator().manual_seed(0),
        epsilon_low=0.2,
        epsilon_high=0.2,
        loss_type="grpo",
    )
    fields.update(overrides)
    for key in ("entropy", "logprob", "old_logprob", "advantages", "group_js"):
        if fields[key] is not None:
            fields[key] = torch.as_tensor(fields[key], dtype=torch.float64)
    return SelectionInput(**fields)


# --- building blocks --------------------------------------------------------------------------------------------


def test_keep_count_is_ceil_with_at_least_one_and_no_float_overshoot():
    n = torch.tensor([0, 1, 5, 10, 11, 30, 100])
    assert selectors.keep_count(n, 0.1).tolist() == [0, 1, 1, 1, 2, 3, 10]
    assert selectors.keep_count(torch.tensor([7]), 1.0).tolist() == [7]


def test_percentile_keep_per_row_keeps_every_tie_at_the_cut_off():
    mask = torch.ones(1, 6)
    scores = torch.tensor([[0.5, 0.5, 0.9, 0.5, 0.1, 0.5]])
    keep, cutoff = selectors.percentile_keep_per_row(scores, mask, 0.34, min_score=0.0)
    # k = ceil(0.34 * 6) = 3: the 3rd largest score is 0.5, and every 0.5 is at that percentile
    assert keep.tolist() == [[True, True, True, True, False, True]]
    assert cutoff.tolist() == [0.5]


def test_percentile_keep_per_row_never_keeps_padding_even_with_higher_scores():
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    scores = torch.tensor([[9.0, 9.0, 0.3, float("nan")]])
    keep, _ = selectors.percentile_keep_per_row(scores, mask, 0.5, min_score=0.0)
    assert keep.tolist() == [[False, False, True, False]]


def test_percentile_keep_per_row_never_fills_the_kept_set_with_scores_at_the_floor():
    mask = torch.ones(2, 10)
    scores = torch.zeros(2, 10)
    scores[0, 4] = 0.2  # one positive score where k = ceil(0.3 * 10) = 3 would be kept
    keep, cutoff = selectors.percentile_keep_per_row(scores, mask, 0.3, min_score=0.0)
    assert keep.nonzero().tolist() == [[0, 4]]
    assert cutoff[0] == pytest.approx(0.0) and math.isnan(cutoff[1])  # row 1 keeps nothing


def test_percentile_keep_per_unit_pools_rows_of_a_group():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    scores = torch.tensor([[0.9, 0.1, 5.0], [0.8, 0.7, 0.2], [0.3, 0.2, 0.1]])
    keep, cutoffs = selectors.percentile_keep_per_unit(scores, mask, torch.tensor([0, 0, 1]), 0.4, min_score=0.0)
    # group 0: 5 tokens -> ceil(2.0) = 2: 0.9 and 0.8; group 1: 3 tokens -> ceil(1.2) = 2: 0.3 and 0.2
    assert keep.tolist() == [[True, False, False], [True, False, False], [True, True, False]]
    assert cutoffs.tolist() == pytest.approx([0.8, 0.2])


def test_renormalise_kept_per_sequence_and_per_batch():
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    keep = torch.tensor([[True, False, True, False], [True, False, False, False], [False] * 4])
    seq = selectors.renormalise_kept(keep, mask, "grpo", over="completion")
    assert seq.tolist() == [[2.0, 0.0, 2.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0] * 4]
    batch = selectors.renormalise_kept(keep, mask, "bnpo", over="completion")
    assert batch.tolist() == [[2.0, 0.0, 2.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0] * 4]  # N=6, K=3
    only_row0 = keep & torch.tensor([[True] * 4, [False] * 4, [False] * 4])
    batch = selectors.renormalise_kept(only_row0, mask, "dapo", over="completion")
    assert batch.tolist() == [[3.0, 0.0, 3.0, 0.0], [0.0] * 4, [0.0] * 4]  # N=6, K=2


@pytest.mark.parametrize("loss_type", ["grpo", "sapo", "bnpo"])
def test_renormalise_kept_over_the_batch_makes_trls_loss_the_mean_over_all_kept_tokens(loss_type):
    from forkwatch.plugin.selection.policy_loss import aggregate_loss

    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    # completion 1 keeps its one token: per-completion means would give it weight n_1 = 2, the batch mean 1/K
    keep = torch.tensor([[True, False, True, False], [True, False, False, False], [False] * 4])
    loss = torch.tensor([[1.0, 50.0, 2.0, 50.0], [6.0, 50.0, 50.0, 50.0], [50.0] * 4], dtype=torch.float64)
    w = selectors.renormalise_kept(keep, mask, loss_type, over="batch")
    assert float(aggregate_loss(loss * w, mask, loss_type)) == pytest.approx((1.0 + 2.0 + 6.0) / 3)


def test_token_covariance_matches_float64_reference():
    gen = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    adv = torch.tensor([1.5, -0.5])
    lp = -torch.rand(2, 4, generator=gen)
    cov = selectors.token_covariance(adv, lp, mask)
    tokens = [(b, t) for b in range(2) for t in range(4) if mask[b, t]]
    a_mean = sum(float(adv[b]) for b, _ in tokens) / len(tokens)
    l_mean = sum(float(lp[b, t]) for b, t in tokens) / len(tokens)
    for b, t in tokens:
        assert float(cov[b, t]) == pytest.approx((float(adv[b]) - a_mean) * (float(lp[b, t]) - l_mean), abs=1e-12)
    assert cov[0, 3] == -math.inf


# --- every selector: the awkward batches -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_empty_batch_gives_empty_weights(name):
    inp = make_input(torch.zeros(0, 5))
    sel = get_selector(name)(inp)
    assert sel.weights.shape == (0, 5)
    if sel.loss_delta is not None:
        assert sel.loss_delta.shape == (0, 5)


@pytest.mark.parametrize("name", ALL)
def test_all_masked_rows_get_zero_weight(name):
    mask = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    inp = make_input(mask, entropy=[[5.0, 5.0, 5.0], [1.0, 2.0, 3.0]], group_js=[[0.6, 0.6, 0.6], [0.1, 0.2, 0.3]],
                     advantages=[1.0, -1.0])
    sel = get_selector(name)(inp)
    assert sel.weights[0].abs().sum() == 0
    assert sel.weights[1].abs().sum() > 0
    assert torch.isfinite(sel.weights).all()
    if sel.loss_delta is not None:
        assert sel.loss_delta[0].abs().sum() == 0


@pytest.mark.parametrize("name", ALL)
def test_weights_are_detached_and_float(name):
    lp = torch.full((2, 3), -1.0, dtype=torch.float64, requires_grad=True)
    inp = make_input(torch.ones(2, 3), logprob=lp, old_logprob=lp.detach(), advantages=[1.0, -1.0],
                     entropy=torch.rand(2, 3, dtype=torch.float64))
    sel = get_selector(name)(inp)
    assert not sel.weights.requires_grad
    assert sel.weights.dtype == torch.float64
    assert sel.weights.shape == inp.mask.shape


# --- ict -----------------------------------------------------------------------------------------------------------


def test_ict_keeps_top_ten_percent_per_completion_with_sparse_grpo_weights():
    mask = torch.ones(2, 20)
    js = torch.arange(40, dtype=torch.float64).view(2, 20) / 100
    js[1] = js[1].flip(0)
    sel = get_selector("ict", warmup_steps=0)(make_input(mask, group_js=js))
    # n_i = 20 -> k_i = 2: weights n_i/k_i = 10 on the two highest-scoring positions
    expected = torch.zeros(2, 20, dtype=torch.float64)
    expected[0, [18, 19]] = 10.0
    expected[1, [0, 1]] = 10.0
    assert torch.equal(sel.weights, expected)
    assert sel.metrics["warmup"] == 0.0
    assert float(sel.metrics["threshold"]) == pytest.approx((0.18 + 0.38) / 2)


def test_ict_completion_shorter_than_one_over_fraction_keeps_one_token():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])
    sel = get_selector("ict", warmup_steps=0)(make_input(mask, group_js=[[0.1, 0.3, 0.2, 0.9, 0.9]]))
    assert sel.weights.tolist() == [[0.0, 3.0, 0.0, 0.0, 0.0]]


def test_ict_keeps_every_token_tied_with_the_percentile():
    js = torch.full((1, 10), 0.3)
    sel = get_selector("ict", warmup_steps=0, fraction=0.2)(make_input(torch.ones(1, 10), group_js=js))
    assert sel.weights.tolist() == [[1.0] * 10]  # all ten at the 80th percentile: n/k = 10/10


def test_ict_zero_score_tokens_never_fill_the_kept_set():
    # a shared prefix scores 0 (one distribution for every rollout): only the one positive-score token is kept,
    # although ceil(0.1 * 20) = 2 tokens would be
    js = torch.zeros(2, 20)
    js[0, 7] = 0.05
    js[1, :5] = 3e-7  # float32 rounding noise of identical distributions counts as zero
    sel = get_selector("ict", warmup_steps=0)(make_input(torch.ones(2, 20), group_js=js))
    assert sel.weights.nonzero().tolist() == [[0, 7]]
    assert sel.weights[0, 7] == 20.0  # Sparse-GRPO: the completion's loss is its one kept token's


def test_ict_warmup_is_dense_until_warmup_steps():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    bound = get_selector("ict")  # default warmup_steps = 10
    during = bound(make_input(mask, step=9, group_js=None))
    assert during.weights.tolist() == [[1.0, 1.0, 0.0]]
    assert during.metrics["warmup"] == 1.0
    after = bound(make_input(mask, step=10, group_js=[[0.1, 0.2, 0.0]]))
    assert after.metrics["warmup"] == 0.0
    assert after.weights.tolist() == [[0.0, 2.0, 0.0]]


def test_ict_refuses_a_missing_group_js_after_warmup():
    with pytest.raises(ValueError, match="group_js"):
        get_selector("ict", warmup_steps=0)(make_input(torch.ones(1, 3), group_js=None))


def test_ict_group_scope_takes_the_cut_off_over_the_prompt_group():
    mask = torch.ones(3, 5)
    js = torch.tensor([[0.9, 0.8, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1, 0.1], [0.5, 0.1, 0.1, 0.1, 0.1]])
    sel = get_selector("ict", warmup_steps=0, fraction=0.2, scope="group")(
        make_input(mask, group_js=js, group_ids=torch.tensor([0, 0, 1]))
    )
    # group 0: 10 tokens -> 2 kept, both in row 0 (row 1 keeps none); group 1: 5 tokens -> 1 kept
    assert sel.weights.tolist() == [[2.5, 2.5, 0, 0, 0], [0] * 5, [5.0, 0, 0, 0, 0]]


def test_ict_batch_scope_with_bnpo_uses_batch_normaliser():
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    js = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.05, 0.9, 0.9]])
    sel = get_selector("ict", warmup_steps=0, fraction=0.34, scope="batch")(
        make_input(mask, group_js=js, loss_type="bnpo")
    )
    # N = 6 -> K = ceil(2.04) = 3: 0.5, 0.4, 0.3; weight N/K = 2
    assert sel.weights.tolist() == [[0, 0, 2.0, 2.0], [2.0, 0, 0, 0]]


def test_ict_normalize_all_gives_zero_one_weights():
    sel = get_selector("ict", warmup_steps=0, normalize="all")(make_input(torch.ones(1, 10),
                                                                          group_js=torch.rand(1, 10)))
    assert sorted(sel.weights.unique().tolist()) == [0.0, 1.0]


# --- high_entropy ------------------------------------------------------------------------------------------------


def test_high_entropy_quantile_is_over_the_batch_and_keeps_ties():
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    ent = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 3.0, 3.0]])
    sel = get_selector("high_entropy", normalize="all")(make_input(mask, entropy=ent))
    threshold = torch.quantile(ent[mask > 0].float(), 0.8)
    assert float(sel.metrics["threshold"]) == pytest.approx(float(threshold))
    assert sel.weights.tolist() == [[0] * 5, [0, 0, 1.0, 1.0, 1.0]]  # threshold 3.0: all three ties kept
    kept = get_selector("high_entropy")(make_input(mask, entropy=ent))
    # grpo, the authors' mean over all K = 3 kept tokens of the batch: w = B·n_i / K = 2·5/3
    assert torch.allclose(kept.weights, torch.tensor([[0.0] * 5, [0, 0, 10 / 3, 10 / 3, 10 / 3]], dtype=torch.float64))


def test_high_entropy_uses_the_gather_for_a_global_quantile():
    mask = torch.ones(1, 4)
    ent = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    other_rank = torch.tensor([10.0, 10.0, 10.0, 10.0])
    inp = make_input(mask, entropy=ent, gather=lambda x: torch.cat([x, other_rank]))
    sel = get_selector("high_entropy", normalize="all")(inp)
    assert sel.weights.sum() == 0  # the global top 20 % lies on the other rank


# --- random --------------------------------------------------------------------------------------------------------


def test_random_is_reproducible_per_seed_and_leaves_the_global_rng_alone():
    mask = torch.ones(4, 30)
    state = torch.random.get_rng_state()
    a = get_selector("random")(make_input(mask, generator=torch.Generator().manual_seed(7)))
    b = get_selector("random")(make_input(mask, generator=torch.Generator().manual_seed(7)))
    c = get_selector("random")(make_input(mask, generator=torch.Generator().manual_seed(8)))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.weights, b.weights)
    assert not torch.equal(a.weights, c.weights)
    assert ((a.weights > 0).sum(-1) == 3).all()  # ceil(0.1 * 30) per completion


def test_random_has_icts_warm_up_and_draws_nothing_during_it():
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    during = get_selector("random")(make_input(torch.ones(2, 10), step=9, generator=gen))
    assert during.weights.tolist() == [[1.0] * 10] * 2 and during.metrics["warmup"] == 1.0
    assert torch.equal(gen.get_state(), state)
    after = get_selector("random")(make_input(torch.ones(2, 10), step=10, generator=gen))
    assert int((after.weights > 0).sum()) == 2 and after.metrics["warmup"] == 0.0


def test_random_batch_scope_keeps_the_fraction_of_the_batch():
    sel = get_selector("random", scope="batch", fraction=0.25)(make_input(torch.ones(4, 10)))
    assert int((sel.weights > 0).sum()) == 10


# --- clip_cov ------------------------------------------------------------------------------------------------------


def _cov_batch():
    # Two completions with opposite advantages; large |A| and spread log-probs make covariances of order 1-10.
    mask = torch.ones(2, 50, dtype=torch.float64)
    adv = torch.tensor([-3.0, 3.0], dtype=torch.float64)
    lp = torch.linspace(-3.0, 0.0, 100, dtype=torch.float64).view(2, 50)
    return mask, adv, lp


def test_clip_cov_zeroes_a_seeded_sample_of_band_candidates():
    mask, adv, lp = _cov_batch()
    cov = selectors.token_covariance(adv, lp, mask)
    band = (cov > 1.0) & (cov < 5.0)
    bound = get_selector("clip_cov", fraction=0.05)  # max(1, int(0.05 * 100)) = 5 tokens
    a = bound(make_input(mask, advantages=adv, logprob=lp, old_logprob=lp, generator=torch.Generator().manual_seed(0)))
    b = bound(make_input(mask, advantages=adv, logprob=lp, old_logprob=lp, generator=torch.Generator().manual_seed(0)))
    dropped = a.weights == 0
    assert int(dropped.sum()) == 5
    assert bool(band[dropped].all())
    assert torch.equal(a.weights, b.weights)
    assert a.metrics["affected_tokens"] == 5.0
    assert a.metrics["candidate_tokens"] == float(band.sum())


def test_clip_cov_takes_the_papers_floor_of_r_times_n_not_at_least_one():
    mask, adv, lp = _cov_batch()
    inp = make_input(mask, advantages=adv, logprob=lp, old_logprob=lp)
    assert int((get_selector("clip_cov")(inp).weights == 0).sum()) == 0  # floor(2e-4 * 100) = 0
    assert int((get_selector("clip_cov", fraction=0.0099)(inp).weights == 0).sum()) == 0  # floor(0.99)
    assert int((get_selector("clip_cov", fraction=0.01)(inp).weights == 0).sum()) == 1


def test_clip_cov_never_picks_tokens_ppo_already_clipped():
    mask, adv, lp = _cov_batch()
    old = lp - 1.0  # ratio e > 1 + eps: clipped wherever A > 0
    sel = get_selector("clip_cov", fraction=1.0)(make_input(mask, advantages=adv, logprob=lp, old_logprob=old))
    assert (sel.weights[1] == 1).all()
    assert (sel.weights[0] == 0).any()


# --- kl_cov --------------------------------------------------------------------------------------------------------


def test_kl_cov_penalises_the_top_k_covariance_tokens():
    mask, adv, lp = _cov_batch()
    cov = selectors.token_covariance(adv, lp, mask)
    sel = get_selector("kl_cov", fraction=0.03)(make_input(mask, advantages=adv, logprob=lp, old_logprob=lp - 0.1))
    assert float(sel.metrics["affected_tokens"]) == 3.0
    assert float(sel.metrics["threshold"]) == pytest.approx(float(cov.flatten().sort(descending=True).values[2]))
    assert torch.equal(sel.weights, mask)


# --- stapo ---------------------------------------------------------------------------------------------------------


def test_stapo_silences_positive_rare_low_entropy_tokens_and_renormalises():
    mask = torch.ones(2, 5, dtype=torch.float64)
    lp = torch.full((2, 5), -0.1, dtype=torch.float64)
    lp[0, 1] = math.log(0.001)  # rare, A > 0, low entropy: spurious
    lp[0, 3] = math.log(0.001)  # rare, A > 0, but high entropy: kept
    lp[1, 1] = math.log(0.001)  # rare, low entropy, but A < 0: kept
    ent = torch.tensor([[2.0, 0.01, 2.0, 3.0, 2.0], [2.0, 0.01, 2.0, 2.0, 2.0]], dtype=torch.float64)
    sel = get_selector("stapo")(make_input(mask, logprob=lp, old_logprob=lp, entropy=ent, advantages=[1.0, -1.0]))
    assert float(sel.metrics["affected_tokens"]) == 1.0
    # the loss is the mean over the K = 9 remaining tokens of the batch: grpo weights B·n_i / K = 10/9
    assert torch.allclose(sel.weights, torch.tensor([[10 / 9, 0.0, 10 / 9, 10 / 9, 10 / 9], [10 / 9] * 5],
                                                    dtype=torch.float64))


def test_stapo_default_entropy_cut_is_the_80th_percentile():
    mask = torch.ones(1, 10, dtype=torch.float64)
    ent = torch.linspace(0.1, 1.0, 10, dtype=torch.float64).view(1, 10)  # q0.2 = 0.28, q0.8 = 0.82
    lp = torch.full((1, 10), -0.1, dtype=torch.float64)
    lp[0, 5] = math.log(0.001)  # rare, A > 0, entropy 0.6: below q0.8, above q0.2
    inp = make_input(mask, logprob=lp, old_logprob=lp, entropy=ent, advantages=[1.0])
    assert get_selector("stapo")(inp).weights[0, 5] == 0
    assert get_selector("stapo", entropy_quantile=0.2)(inp).weights[0, 5] > 0


# --- registry --------------------------------------------------------------------------------------------------------


def test_builtin_names_are_registered():
    assert set(ALL) <= set(selector_names())


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("ict", {"fraction": 0.0}, "fraction"),
        ("ict", {"scope": "prompt"}, "scope"),
        ("ict", {"warmup_steps": -1}, "warmup_steps"),
        ("high_entropy", {"normalize": "some"}, "normalize"),
        ("random", {"fraction": 1.5}, "fraction"),
        ("clip_cov", {"cov_low": 5.0, "cov_high": 1.0}, "cov_low"),
        ("kl_cov", {"beta": -1.0}, "beta"),
        ("stapo", {"prob_threshold": 0.0}, "prob_threshold"),
        ("gppo", {"epsilon_low": 1.5}, "epsilon_low"),
        ("gppo", {"fraction": 0.1}, "does not take"),
    ],
)
def test_bad_options_are_refused_when_bound(name, options, match):
    with pytest.raises(ValueError, match=match):
        get_selector(name, **options)


def _first_token(inp: SelectionInput, *, scale: float = 1.0) -> Selection:
    weights = torch.zeros_like(inp.mask)
    weights[:, 0] = scale * inp.mask[:, 0]
    return Selection(weights)


def test_a_user_selector_is_usable_by_name_and_gone_after_its_block():
    with registered_selector("test_first_token", _first_token):
        sel = get_selector("test_first_token", scale=2.0)(make_input(torch.ones(2, 3)))
        assert sel.weights.tolist() == [[2.0, 0, 0], [2.0, 0, 0]]
    assert "test_first_token" not in selector_names()
    with pytest.raises(ValueError, match="valid names"):
        get_selector("test_first_token")


def test_register_selector_decorator_then_unregister():
    register_selector("test_decorated")(_first_token)
    try:
        assert "test_decorated" in selector_names()
    finally:
        unregister_selector("test_decorated")
    assert "test_decorated" not in selector_names()
    with pytest.raises(KeyError, match="registered"):
        unregister_selector("test_decorated")


def test_selector_names_lists_the_builtins_in_a_fresh_interpreter():
    import subprocess
    import sys

    code = "from forkwatch.plugin.selection.registry import selector_names; print(','.join(selector_names()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert set(ALL) <= set(out.split(","))
