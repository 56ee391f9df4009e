"""group_js scored during generation (plugin/gen_scores.py) equals the extra-pass scores; what it cannot serve falls
back to the extra pass, counted by reason."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from forkwatch.plugin.gen_scores import extra_pass

import forkwatch

logger = logging.getLogger(__name__)


def _capture(trainer) -> list[dict]:
    """Outermost spy on the generation batch: sees `forkwatch_group_js` as the loss will, with the weights that
    generated it (no optimizer step has run yet)."""
    seen: list[dict] = []
    inner = trainer._generate_and_score_completions

    def spy(inputs):
        out = inner(inputs)
        monitor = trainer._forkwatch.monitor
        mask = out["completion_mask"]
        groups = torch.unique(out["forkwatch_group_id"], return_inverse=True)[1]
        ref = extra_pass(trainer, monitor.backbone, monitor.project, out, mask, groups, chunk=3)
        seen.append(dict(gen=out["forkwatch_group_js"].clone(), ref=ref, mask=mask.bool()))
        return out

    trainer._generate_and_score_completions = spy
    return seen


@pytest.mark.parametrize("overrides", [
    dict(temperature=0.7),
    dict(steps_per_generation=2, max_completion_length=12),  # 16-row generation batch, longer completions
    dict(pad_to_multiple_of=16),  # TRL pads completion columns past the last decode step
    dict(peft=True),  # generate calls the base causal LM, not the PeftModel
])
def test_generation_time_group_js_equals_the_extra_pass_on_the_same_batch(make_trainer, tmp_path, overrides):
    trainer = make_trainer(max_steps=2, **overrides)
    cb = forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r", group_js=True)
    seen = _capture(trainer)
    trainer.train()
    assert seen and not cb.monitor.group_js_fallbacks and not cb.monitor.faults.counts
    diff = max(float((s["gen"] - s["ref"]).abs().max()) for s in seen)
    logger.info("generation-time vs extra-pass group_js: max |diff| = %.3g", diff)
    assert diff < 1e-4
    assert all(bool((s["gen"][~s["mask"]] == 0).all()) for s in seen)
    assert any(float(s["gen"].max()) > 1e-3 for s in seen)  # not trivially zero


def test_generation_the_hook_never_sees_falls_back_to_the_extra_pass(make_trainer, tmp_path, tokenizer):
    # a custom rollout_func produces the completions without the policy's generate: no logits reach the hook
    trainer = make_trainer(max_steps=2)

    def rollout(prompts, trainer):
        prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
        completions = [tokenizer(str(i % 4) * (1 + i % 3))["input_ids"] for i in range(len(prompts))]
        return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": None}

    trainer.rollout_func = rollout
    cb = forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r", group_js=True)
    seen = _capture(trainer)
    trainer.train()
    assert dict(cb.monitor.group_js_fallbacks) == {"no_logits": 2} and not cb.monitor.faults.counts
    meta = json.loads((tmp_path / "runs" / "r" / "run.json").read_text())
    assert meta["group_js_fallbacks"] == {"no_logits": 2}  # the count reaches run.json
    for s in seen:
        torch.testing.assert_close(s["gen"], s["ref"], atol=0, rtol=0)
    assert any(float(s["gen"].max()) > 0 for s in seen)  # siblings differ: the pass really scored them
