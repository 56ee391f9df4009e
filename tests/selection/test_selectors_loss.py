"""plugin/selection/policy_loss.py against float64 references: TRL's surrogate, KL-Cov's and GPPO's deltas, TRL's normalisers,
and the attach-time refusals and warnings of `validate_selection`."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from forkwatch.plugin.selection import policy_loss
from forkwatch.plugin.selection.registry import SelectionInput, get_selector

EPS_LOW, EPS_HIGH = 0.2, 0.28


def _tensors(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(3, 6, generator=gen, dtype=torch.float64) * 3
    # Ratios spread over (e^-0.6, e^0.6) so that both clip bounds are crossed for both advantage signs.
    lp = (old + (torch.rand(3, 6, generator=gen, dtype=torch.float64) - 0.5) * 1.2).requires_grad_(True)
    adv = torch.tensor([1.0, -0.7, 0.4], dtype=torch.float64)
    mask = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2, [1.0] * 5 + [0.0]], dtype=torch.float64)
    return lp, old, adv, mask


def _inp(lp, old, adv, mask) -> SelectionInput:
    return SelectionInput(
        mask=mask, entropy=torch.ones_like(mask), logprob=lp, old_logprob=old, advantages=adv,
        group_ids=torch.zeros(3, dtype=torch.long), group_js=None, step=0,
        generator=torch.Generator().manual_seed(0), epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, loss_type="grpo",
    )


def _ppo_reference(lp, old, adv, el, eh):
    # Scalar-by-scalar: PPO's clipped surrogate value.
    out = torch.zeros_like(old)
    for b in range(old.size(0)):
        for t in range(old.size(1)):
            r = float(torch.exp(lp[b, t].detach() - old[b, t]))
            a = float(adv[b])
            out[b, t] = -min(r * a, min(max(r, 1 - el), 1 + eh) * a)
    return out


def test_trl_policy_loss_is_the_clipped_surrogate():
    lp, old, adv, _ = _tensors()
    got = policy_loss.trl_policy_loss(lp, old, adv, EPS_LOW, EPS_HIGH)
    torch.testing.assert_close(got.detach(), _ppo_reference(lp, old, adv, EPS_LOW, EPS_HIGH), rtol=0, atol=1e-12)


def test_kl_cov_delta_turns_trl_loss_into_kl_cov_value_and_gradient():
    lp, old, adv, mask = _tensors()
    sel = get_selector("kl_cov", fraction=0.2)(_inp(lp, old, adv, mask))
    total = policy_loss.trl_policy_loss(lp, old, adv, EPS_LOW, EPS_HIGH) * sel.weights + sel.loss_delta
    # reference: -A·r + |log r| on the top-k covariance tokens, by hand
    from forkwatch.plugin.selection.methods import token_covariance

    cov = token_covariance(adv, lp.detach(), mask).flatten()
    top = set(cov.sort(descending=True, stable=True).indices[: int(0.2 * 15)].tolist())
    assert sel.metrics["affected_tokens"] == 3.0
    lp_ref = lp.detach().clone().requires_grad_(True)
    terms = []
    for b in range(3):
        for t in range(6):
            if not mask[b, t]:
                continue
            log_r = lp_ref[b, t] - old[b, t]
            term = -adv[b] * torch.exp(log_r) + (log_r.abs() if b * 6 + t in top else 0.0)
            terms.append(term)
    ref = torch.stack(terms).sum()
    got = (total * mask).sum()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(got, lp)
    (grad_ref,) = torch.autograd.grad(ref, lp_ref)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-12)


def test_gppo_keeps_ppo_value_and_gives_clipped_tokens_a_bounded_gradient():
    lp, old, adv, mask = _tensors(1)
    loss = policy_loss.gppo_policy_loss(lp, old, adv, EPS_LOW, EPS_HIGH)
    assert torch.equal(loss.detach(), policy_loss.trl_policy_loss(lp, old, adv, EPS_LOW, EPS_HIGH).detach())
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    ratio = torch.exp(lp.detach() - old)
    expected = torch.zeros_like(old)
    n_clipped = 0
    for b in range(3):
        for t in range(6):
            r, a = float(ratio[b, t]), float(adv[b])
            if a > 0 and r > 1 + EPS_HIGH:
                expected[b, t] = -(1 + EPS_HIGH) * a  # d/dlogp of -(1+ε_h)·δ/sg(δ)·A
                n_clipped += 1
            elif a < 0 and r < 1 - EPS_LOW:
                expected[b, t] = -(1 - EPS_LOW) * a
                n_clipped += 1
            else:
                expected[b, t] = -a * r  # d/dlogp of -δ·A
    assert n_clipped >= 2
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)


def test_gppo_selector_delta_reaches_gppo_loss_with_the_papers_epsilons():
    lp, old, adv, mask = _tensors(2)
    inp = _inp(lp, old, adv, mask)
    inp = SelectionInput(**{**inp.__dict__, "epsilon_low": 0.2, "epsilon_high": 0.2})  # TRL's default clip range
    sel = get_selector("gppo")(inp)
    total = policy_loss.trl_policy_loss(lp, old, adv, 0.2, 0.2) * sel.weights + sel.loss_delta
    target = policy_loss.gppo_policy_loss(lp, old, adv, 0.2, 0.28) * mask
    torch.testing.assert_close(total, target, rtol=0, atol=1e-12)
    (g1,) = torch.autograd.grad(total.sum(), lp, retain_graph=True)
    (g2,) = torch.autograd.grad(target.sum(), lp)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)
    ratio = torch.exp(lp.detach() - old)
    assert float(sel.metrics["affected_tokens"]) == float(
        (policy_loss.gppo_clipped(ratio, adv, 0.2, 0.28) & (mask > 0)).sum()
    )


# --- aggregate_loss ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["grpo", "sapo", "bnpo", "dr_grpo", "dapo", "cispo", "vespo", "luspo"])
def test_aggregate_loss_matches_the_normaliser_formula(loss_type):
    x = torch.arange(18, dtype=torch.float64).view(3, 6) / 7
    _, _, _, mask = _tensors()
    got = policy_loss.aggregate_loss(x, mask, loss_type, accumulation=2.0, max_completion_length=10,
                                     batch_normaliser=torch.tensor(40.0, dtype=torch.float64))
    rows = [sum(float(x[b, t]) for t in range(6) if mask[b, t]) for b in range(3)]
    n = [float(mask[b].sum()) for b in range(3)]
    expected = {
        "grpo": sum(r / k for r, k in zip(rows, n, strict=True)) / 3 / 2,
        "bnpo": sum(rows) / sum(n) / 2,
        "dr_grpo": sum(rows) / (3 * 10) / 2,
        "dapo": sum(rows) / 40.0,
        "luspo": sum(rows) / 3 / 2,
    }
    expected["sapo"] = expected["grpo"]
    expected["cispo"] = expected["vespo"] = expected["dapo"]
    assert float(got) == pytest.approx(expected[loss_type], rel=1e-12)


def test_aggregate_loss_is_linear_so_a_delta_adds_to_trls_per_token_loss():
    a, b = torch.rand(3, 6, dtype=torch.float64), torch.rand(3, 6, dtype=torch.float64)
    _, _, _, mask = _tensors()
    for loss_type in ("grpo", "bnpo", "luspo"):
        whole = policy_loss.aggregate_loss(a + b, mask, loss_type)
        parts = policy_loss.aggregate_loss(a, mask, loss_type) + policy_loss.aggregate_loss(b, mask, loss_type)
        assert float(whole) == pytest.approx(float(parts), rel=1e-12)


def test_aggregate_loss_refuses_an_unknown_loss_type_or_a_missing_constant():
    with pytest.raises(ValueError, match="loss_type='new_loss'.*known: grpo"):
        policy_loss.aggregate_loss(torch.ones(1, 1), torch.ones(1, 1), "new_loss")
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss.aggregate_loss(torch.ones(1, 1), torch.ones(1, 1), "dr_grpo")
    with pytest.raises(ValueError, match="batch_normaliser"):
        policy_loss.aggregate_loss(torch.ones(1, 1), torch.ones(1, 1), "dapo")


# --- validate_selection ----------------------------------------------------------------------------------------------


def _args(tmp_path, **overrides):
    from trl import GRPOConfig

    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                num_generations=4)
    base.update(overrides)
    return GRPOConfig(**base)


@pytest.mark.parametrize(
    ("name", "overrides", "match"),
    [
        ("ict", {"top_entropy_quantile": 0.2}, "top_entropy_quantile=1.0"),
        ("random", {"top_entropy_quantile": 0.5}, "top_entropy_quantile=1.0"),
        ("kl_cov", {"loss_type": "cispo"}, "loss_type"),
        ("gppo", {"loss_type": "sapo"}, "loss_type"),
        ("gppo", {"loss_type": "vespo"}, "loss_type"),
        ("kl_cov", {"loss_type": "grpo", "importance_sampling_level": "sequence"}, "importance_sampling_level"),
        ("gppo", {"entropy_coef": 0.01}, "entropy_coef=0.0"),
        ("kl_cov", {"use_adaptive_entropy": True}, "use_adaptive_entropy=False"),
        ("gppo", {"off_policy_mask_threshold": 0.5}, "off_policy_mask_threshold=None"),
        ("kl_cov", {"delta": 2.0}, "delta=None"),
    ],
)
@pytest.mark.filterwarnings("ignore:select=")
def test_validate_selection_refuses_what_cannot_combine(tmp_path, name, overrides, match):
    with pytest.raises(ValueError, match=match):
        policy_loss.validate_selection(get_selector(name), _args(tmp_path, **overrides))


def test_validate_selection_refuses_a_fused_liger_loss():
    args = SimpleNamespace(top_entropy_quantile=1.0, loss_type="grpo", use_liger_loss=True)
    with pytest.raises(ValueError, match="Liger"):
        policy_loss.validate_selection(get_selector("high_entropy"), args)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("ict", {}),
        ("high_entropy", {"loss_type": "luspo", "importance_sampling_level": "sequence"}),
        ("stapo", {"loss_type": "cispo"}),
        ("clip_cov", {"entropy_coef": 0.01}),
        ("kl_cov", {"loss_type": "dapo", "beta": 0.04}),
        ("gppo", {"loss_type": "dr_grpo", "num_iterations": 2}),
    ],
)
def test_validate_selection_accepts_what_works(tmp_path, name, overrides):
    args = _args(tmp_path, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the on-policy warning has its own tests
        policy_loss.validate_selection(get_selector(name), args)


@pytest.mark.parametrize("name", ["kl_cov", "gppo"])
def test_ratio_methods_on_policy_warn_naming_the_setting_to_change(tmp_path, name):
    with pytest.warns(UserWarning, match="exactly 1.*steps_per_generation to a multiple.*num_iterations > 1"):
        policy_loss.validate_selection(get_selector(name), _args(tmp_path))


@pytest.mark.parametrize("name", ["kl_cov", "gppo"])
@pytest.mark.parametrize("overrides", [{"num_iterations": 2}, {"steps_per_generation": 2}])
def test_ratio_methods_reusing_rollouts_do_not_warn(tmp_path, name, overrides):
    args = _args(tmp_path, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy_loss.validate_selection(get_selector(name), args)


@pytest.mark.parametrize("name", ["ict", "high_entropy", "random", "stapo", "clip_cov"])
def test_methods_that_act_on_policy_do_not_warn(tmp_path, name):
    args = _args(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy_loss.validate_selection(get_selector(name), args)
