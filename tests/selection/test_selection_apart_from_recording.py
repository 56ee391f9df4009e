"""The selection (mask and loss term) is computed apart from recording: a recording fault leaves the optimised
objective unchanged, and a selection that cannot be computed stops training with an error naming cause and fix."""

from __future__ import annotations

import pytest

import forkwatch


def _boom(*args, **kwargs):
    raise RuntimeError("injected recording fault")


def _curve(trainer) -> list[tuple[float, float]]:
    return [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]


def test_a_recording_fault_leaves_kl_cov_losses_and_grad_norms_unchanged(make_trainer, tmp_path):
    # steps_per_generation=2: the second step is off-policy, so KL-Cov's extra term is not zero
    runs = []
    for fault in (False, True):
        trainer = make_trainer(max_steps=2, steps_per_generation=2)
        cb = forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name=f"f{fault}", select="kl_cov",
                              fraction=0.2)
        if fault:
            cb.capture.end_micro_batch = _boom
        trainer.train()
        runs.append((_curve(trainer), dict(cb.capture.faults.faults)))
    (clean, clean_faults), (faulty, faults) = runs
    assert not clean_faults and faults == {"loss_end": 2}
    assert len(clean) == 2
    assert clean == faulty  # exactly: the fault touched nothing that is optimised


def test_ict_without_group_js_stops_with_an_error_naming_the_cause(make_trainer, tmp_path):
    trainer = make_trainer(max_steps=2)
    cb = forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r", select="ict", warmup_steps=0)
    cb.capture.evidence._use = _boom  # the generation-time evidence fails: no group_js for this batch
    with pytest.raises(RuntimeError, match="group_js, which is missing") as err:
        trainer.train()
    assert "generation" in str(err.value) and "select='high_entropy'" in str(err.value)
    assert trainer.state.global_step == 0  # not one step trained densely


def test_a_failing_selector_stops_training_instead_of_training_densely(make_trainer, tmp_path):
    trainer = make_trainer(max_steps=2)
    cb = forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r", select="random", fraction=0.5)
    cb.capture.selection_seam.selector = _boom_selector(cb.capture.selection_seam.selector)
    with pytest.raises(RuntimeError, match="injected selector fault"):
        trainer.train()
    assert trainer.state.global_step == 0


class _boom_selector:
    def __init__(self, inner) -> None:
        self.needs_group_js = inner.needs_group_js

    def __call__(self, inp):
        raise RuntimeError("injected selector fault")



def test_evaluation_with_a_selector_computes_a_dense_eval_loss(make_trainer, tmp_path):
    from datasets import Dataset
    from transformers import TrainerCallback

    trainer = make_trainer(max_steps=1, per_device_eval_batch_size=8)
    cb = forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r", select="random", fraction=0.5,
                          warmup_steps=0)
    calls, evals = [], []
    inner = cb.capture.select

    def spy(entropies, mask):
        weights = inner(entropies, mask)
        calls.append(bool((weights == mask.float()).all()))
        return weights

    class EvaluateMidTraining(TrainerCallback):  # an evaluation while forkwatch's seams are installed
        def on_step_end(self, args, state, control, **kwargs):
            evals.append(trainer.evaluate(Dataset.from_dict({"prompt": ["1+1=", "2+2="] * 4})))

    cb.capture.select = spy
    trainer.add_callback(EvaluateMidTraining())
    trainer.train()
    assert "eval_loss" in evals[0] and not cb.capture.faults.faults
    assert calls[0] is False and calls[-1] is True  # trained on the selection; evaluated on every token
