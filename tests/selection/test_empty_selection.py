"""A selection that keeps nothing is never silent (real tiny GRPOTrainer runs): ICT against the reference without a
warm-up is refused at attach; for any selector a step that keeps no token, or keeps only tokens that carry no
gradient, is counted and warned about with the selector and the step, and `max_empty_selection_steps` such steps in
a row stop training with an error naming the cause. Clip-Cov's ⌊r·N⌋ at small micro-batches is logged at attach."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from forkwatch.plugin.selection.registry import Selection, registered_selector

import forkwatch


def _nothing(inp, *, fraction: float = 0.1) -> Selection:
    """Keeps no token (what ICT against an unmoved reference does)."""
    return Selection(weights=torch.zeros_like(inp.mask), metrics={})


def _zero_advantage_only(inp, *, fraction: float = 0.1) -> Selection:
    """Keeps every token of the completions whose advantage is 0, and nothing else: tokens kept, no gradient."""
    return Selection(weights=inp.mask * (inp.advantages == 0).float().unsqueeze(1), metrics={})


def _reward_only_for_some_prompts(prompts, completions, **kwargs) -> list[float]:
    """Varies within the groups of prompts "1+b=" and "2+b=", constant for the others, whose advantages are 0."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) if p[0] in "12" else 0.5
            for p, c in zip(prompts, completions, strict=True)]


def test_ict_against_the_reference_without_a_warm_up_is_refused_at_attach(make_trainer, tmp_path):
    with pytest.raises(ValueError, match=r"warmup_steps=0 would train on nothing: the reference score .* is 0 for "
                                         r"every token until the policy moves.*warmup_steps >= 1"):
        forkwatch.attach(make_trainer(max_steps=1), log_dir=str(tmp_path / "runs"), select="ict", warmup_steps=0,
                         select_options={"against": "reference"})
    # with a warm-up, or against the siblings, the same options attach
    forkwatch.attach(make_trainer(max_steps=1), log_dir=str(tmp_path / "runs"), select="ict", warmup_steps=1,
                     select_options={"against": "reference"})
    forkwatch.attach(make_trainer(max_steps=1), log_dir=str(tmp_path / "runs"), select="ict", warmup_steps=0)


def test_a_step_that_keeps_no_token_is_counted_and_warned_with_the_selector_and_the_step(make_trainer, tmp_path,
                                                                                         caplog):
    trainer = make_trainer(max_steps=2)
    with registered_selector("keeps_nothing", _nothing):
        forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r", select="keeps_nothing",
                         max_empty_selection_steps=0)  # 0: never stop, only count and warn
        with caplog.at_level(logging.WARNING, logger="forkwatch"):
            trainer.train()
    warned = [r.getMessage() for r in caplog.records if "trains on nothing" in r.getMessage()]
    assert len(warned) == 2
    assert all("select='keeps_nothing' kept no token" in m for m in warned)
    assert "at step 1" in warned[0] and "at step 2" in warned[1] and "2 in a row" in warned[1]
    meta = json.loads((tmp_path / "runs" / "r" / "run.json").read_text())
    assert meta["empty_selection_steps"] == [1, 2] and meta["status"] == "finished"
    logged = [h["forkwatch/select/empty_steps"] for h in trainer.state.log_history if "forkwatch/select/empty_steps" in h]
    assert logged == [1.0, 2.0]


def test_empty_steps_in_a_row_stop_training_with_an_error_naming_the_cause(make_trainer, tmp_path):
    trainer = make_trainer(max_steps=6)
    with registered_selector("keeps_nothing", _nothing):
        forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r", select="keeps_nothing",
                         max_empty_selection_steps=3)
        with pytest.raises(RuntimeError, match=r"select='keeps_nothing' kept no token at 3 steps in a row "
                                               r"\(steps 1-3\).*training on nothing.*max_empty_selection_steps=3"):
            trainer.train()
    assert trainer.state.global_step == 3  # not one step more
    meta = json.loads((tmp_path / "runs" / "r" / "run.json").read_text())
    assert meta["status"] == "failed" and "3 steps in a row" in meta["stopped_by_selection"]
    assert meta["empty_selection_steps"] == [1, 2, 3]


def test_kept_tokens_that_carry_no_gradient_count_as_an_empty_step(make_trainer, tmp_path, caplog):
    trainer = make_trainer(max_steps=4, reward_funcs=[_reward_only_for_some_prompts])
    with registered_selector("zero_advantage_only", _zero_advantage_only):
        forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r", select="zero_advantage_only",
                         max_empty_selection_steps=0)
        advantages: dict[int, list[float]] = {}
        fw_loss = trainer._compute_loss

        def spy(model, inputs):  # the advantages the selector sees, per step
            advantages.setdefault(trainer.state.global_step + 1, []).extend(inputs["advantages"].tolist())
            return fw_loss(model, inputs)

        trainer._compute_loss = spy
        with caplog.at_level(logging.WARNING, logger="forkwatch"):
            trainer.train()
    warned = {int(r.getMessage().split(" at step ")[1].split(",")[0]): r.getMessage() for r in caplog.records
              if "trains on nothing" in r.getMessage()}
    # a step trains on nothing unless its kept tokens (the zero-advantage completions) are all there is to train on
    expected = {s for s, a in advantages.items() if not (any(x == 0 for x in a) and all(x == 0 for x in a))}
    assert set(warned) == expected
    zero_grad = [s for s, a in advantages.items() if any(x == 0 for x in a) and any(x != 0 for x in a)]
    assert zero_grad  # this seed has steps whose kept tokens carry no gradient while others would
    assert all("kept " in warned[s] and "tokens, all of zero gradient weight" in warned[s] for s in zero_grad)


def test_a_selector_that_trains_is_never_counted(make_trainer, tmp_path, caplog):
    trainer = make_trainer(max_steps=2)
    forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r", select="high_entropy")
    with caplog.at_level(logging.WARNING, logger="forkwatch"):
        trainer.train()
    assert not [r for r in caplog.records if "trains on nothing" in r.getMessage()]
    meta = json.loads((tmp_path / "runs" / "r" / "run.json").read_text())
    assert meta["empty_selection_steps"] == []


def test_clip_cov_logs_at_attach_that_small_micro_batches_detach_nothing(make_trainer, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="forkwatch"):
        forkwatch.attach(make_trainer(max_steps=1), log_dir=str(tmp_path / "runs"), select="clip_cov")
    (message,) = [r.getMessage() for r in caplog.records if "clip_cov" in r.getMessage()]
    assert "r = 0.0002" in message and "N = 5000" in message and "at most 64" in message  # 8 completions x 8 tokens
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="forkwatch"):  # r·N >= 1 is reachable: nothing to say
        forkwatch.attach(make_trainer(max_steps=1), log_dir=str(tmp_path / "runs"), select="clip_cov", fraction=0.02)
    assert not [r for r in caplog.records if "clip_cov" in r.getMessage()]
