"""ICT against the reference policy (plugin/selection/reference.py) and the demo's oracle selector: the reference JS a real
GRPOTrainer hands the selector equals a float64 recomputation from the initial and the current policy, for each way
of holding the reference (frozen copy, TRL's ref_model, PEFT with adapters disabled); `against` is validated; the
oracle keeps the ground truth's tokens at the budget, with the demo's label source."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from forkwatch.plugin.selection.methods import _dense
from forkwatch.plugin.selection.registry import SelectionInput, get_selector, registered_selector
from forkwatch.plugin.token_math import js_from_logits

import forkwatch


def _js64(z_p: torch.Tensor, z_q: torch.Tensor, temperature: float) -> torch.Tensor:
    p = torch.softmax(z_p.double() / temperature, -1)
    q = torch.softmax(z_q.double() / temperature, -1)
    m = (p + q) / 2
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731  (all entries positive here)
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_js_from_logits_matches_float64_and_is_zero_for_equal_distributions():
    g = torch.Generator().manual_seed(0)
    z_p, z_q = torch.randn(37, 50, generator=g) * 3, torch.randn(37, 50, generator=g) * 3
    got = js_from_logits(z_p, z_q, temperature=0.7, chunk=8)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _js64(z_p, z_q, 0.7), atol=2e-6, rtol=1e-4)
    assert js_from_logits(z_p, z_p.clone()).abs().max() < 1e-6
    assert float(js_from_logits(torch.tensor([[100.0, 0.0]]), torch.tensor([[0.0, 100.0]]))) == pytest.approx(
        math.log(2), abs=1e-6)  # disjoint supports: ln 2


def test_against_is_validated_and_decides_which_score_ict_needs():
    with pytest.raises(ValueError, match="against='parents'"):
        get_selector("ict", against="parents")
    siblings, reference = get_selector("ict"), get_selector("ict", against="reference")
    assert (siblings.needs_group_js, siblings.needs_reference_js) == (True, False)
    assert (reference.needs_group_js, reference.needs_reference_js) == (False, True)


def _inp(**kw) -> SelectionInput:
    b, t = kw["mask"].shape
    base = dict(entropy=torch.zeros(b, t), logprob=torch.zeros(b, t), old_logprob=torch.zeros(b, t),
                advantages=torch.ones(b), group_ids=torch.zeros(b, dtype=torch.long), group_js=None, step=5,
                generator=torch.Generator().manual_seed(0), epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo")
    return SelectionInput(**{**base, **kw})


def test_ict_against_the_reference_keeps_the_top_reference_js_tokens():
    mask = torch.ones(1, 10)
    ref = torch.tensor([[0.0, 0.3, 0.0, 0.1, 0.0, 0.0, 0.2, 0.0, 0.0, 0.05]])
    sel = get_selector("ict", against="reference", warmup_steps=0, fraction=0.2)(_inp(mask=mask, reference_js=ref))
    assert (sel.weights[0] > 0).nonzero().flatten().tolist() == [1, 6]
    with pytest.raises(ValueError, match="needs inp.reference_js"):
        get_selector("ict", against="reference", warmup_steps=0)(_inp(mask=mask))


def test_oracle_keeps_mistakes_then_decisions_within_the_budget():
    mask = torch.ones(2, 10)
    mask[1, 8:] = 0
    prio = torch.tensor([[0, 2, 0, 1, 0, 2, 0, 0, 3, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    labels = lambda p, c, m: prio  # noqa: E731
    ids = torch.zeros(2, 10, dtype=torch.long)
    sel = get_selector("oracle", labels=labels, warmup_steps=0, fraction=0.2)(
        _inp(mask=mask, prompt_ids=ids, completion_ids=ids))
    kept = (sel.weights[0] > 0).nonzero().flatten().tolist()
    assert len(kept) == 2 and 8 in kept and set(kept) - {8} <= {1, 5}  # ceil(0.2·10): the mistake, one decision
    assert int((sel.weights[1] > 0).sum()) == 2  # ceil(0.2·8): two of the three tied priority-1 tokens
    with pytest.raises(ValueError, match="oracle needs select_options"):
        get_selector("oracle")


def test_the_demos_label_source_gives_each_token_its_roles_priority():
    from forkwatch.demo import task
    from forkwatch.demo.oracle import PRIORITY, task_labels
    from forkwatch.demo.tiny import char_tokenizer

    tok = char_tokenizer(task.CHARS)
    prompt, completion = "gather hbkcf:", "koala,fox,bear,heran,camel"
    p = torch.tensor([tok(prompt)["input_ids"]])
    c = torch.tensor([tok(completion)["input_ids"] + [tok.eos_token_id]])
    got = task_labels(tok)(p, c, torch.ones_like(c))
    want = [PRIORITY.get(r, 0.0) for r in task.roles(prompt, completion)]
    assert got[0].tolist() == want
    assert got[0, 18] == PRIORITY["mistake"] and got[0, 0] == PRIORITY["decision"]


def _plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy running the class's own forward (TRL's fused-head wrapper closes over the original model)."""
    out = copy.deepcopy(model).double().eval()
    for m in out.modules():
        m.__dict__.pop("forward", None)
    return out


@pytest.mark.parametrize("holder", ["frozen_copy", "ref_model", "peft_adapters_disabled"])
def test_reference_js_handed_to_the_selector_equals_a_float64_recomputation(make_trainer, tmp_path, holder):
    """Two real GRPO steps; at step 2 the policy has moved, and the selector's reference JS must equal JS of the
    current policy against the initial one, both recomputed in float64 from the same token ids."""
    overrides = {"ref_model": dict(beta=0.04), "peft_adapters_disabled": dict(peft=True)}.get(holder, {})
    trainer = make_trainer(max_steps=2, learning_rate=5e-2, **overrides)
    initial = _plain_copy(trainer.accelerator.unwrap_model(trainer.model))
    seen = []

    def capture(inp: SelectionInput):
        if inp.step >= 1:
            model = trainer.accelerator.unwrap_model(trainer.model)
            current = _plain_copy(model)
            ids = torch.cat([inp.prompt_ids, inp.completion_ids], 1)
            t = inp.completion_ids.size(1)
            attn = torch.cat([(inp.prompt_ids != trainer.processing_class.pad_token_id).long(),
                              inp.mask.long()], 1)
            with torch.no_grad():
                if holder == "peft_adapters_disabled":
                    with current.disable_adapter():
                        z_q = current(input_ids=ids, attention_mask=attn).logits[:, -t - 1 : -1]
                else:
                    z_q = initial(input_ids=ids, attention_mask=attn).logits[:, -t - 1 : -1]
                z_p = current(input_ids=ids, attention_mask=attn).logits[:, -t - 1 : -1]
            want = _js64(z_p, z_q, trainer.temperature) * inp.mask.double()
            seen.append((inp.reference_js.double(), want))
        return _dense(inp.mask)

    with registered_selector("capture_reference_js", capture, needs_reference_js=True):
        forkwatch.attach(trainer, log_dir=str(tmp_path / "logs"), run_name=holder, select="capture_reference_js")
        assert trainer._forkwatch.capture.reference.kind == holder
        trainer.train()
    assert seen, "the selector never saw step 2"
    for got, want in seen:
        assert float(want.max()) > 1e-4  # the policy really moved: a test of 0 == 0 would prove nothing
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-4)
