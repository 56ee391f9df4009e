"""Fork value during training (`fork_value_every`, plugin/fork_value_online.py) on a real tiny GRPOTrainer: training
with it on is bit-identical to training with it off (losses, grad norms, every logged scalar, final weights), with a
selector drawing from forkwatch's own generator too; the rows reach the fork_values table at the due steps; what it
cannot reproduce is refused at attach naming the fix; a failure while measuring is counted, not raised."""

from __future__ import annotations

import pytest
import torch
from conftest import digit_reward, length_reward
from forkwatch.store import connect
from forkwatch.store.fork_values import fork_value_positions

import forkwatch

SMALL = dict(fork_value_positions=6, fork_value_branches=2, fork_value_rollouts=2)
TRAINER_KEYS = ("loss", "grad_norm", "reward", "entropy", "completions/mean_length")


def _train(make_trainer, log_dir, name: str, **options):
    trainer = make_trainer(max_steps=3, model_seed=0)
    # handoff_interval_s=0: the health rules' scalars every step (by default a hand-off waits for a second's steps,
    # and a slower step with fork value on would move them to another step's log)
    forkwatch.attach(trainer, log_dir=str(log_dir), run_name=name, select="random", warmup_steps=1,
                     handoff_interval_s=0, **options)
    trainer.train()
    logs = [{k: v for k, v in entry.items() if k in TRAINER_KEYS or k.startswith("forkwatch/")
             and not k.endswith("seconds")} for entry in trainer.state.log_history if "loss" in entry]
    return logs, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_training_with_fork_value_on_is_bit_identical_to_training_with_it_off(make_trainer, tmp_path):
    off_logs, off_weights = _train(make_trainer, tmp_path, "off")
    on_logs, on_weights = _train(make_trainer, tmp_path, "on", fork_value_every=1, **SMALL)
    assert len(on_logs) == len(off_logs) == 3
    assert on_logs == off_logs  # losses, grad norms, rewards, entropies and forkwatch's own scalars, exactly
    assert off_weights.keys() == on_weights.keys()
    assert all(torch.equal(off_weights[k], on_weights[k]) for k in off_weights)
    positions = fork_value_positions(connect(tmp_path), "on")
    assert sorted(positions["step"].unique()) == [1, 2, 3]
    assert (positions.groupby("step").size() <= 6).all() and (positions["source"] == "training").all()
    assert positions["inclusion_prob"].between(0, 1, inclusive="right").all()
    assert fork_value_positions(connect(tmp_path), "off").empty


def test_fork_value_every_n_measures_only_the_due_steps(make_trainer, tmp_path):
    trainer = make_trainer(max_steps=3)
    forkwatch.attach(trainer, log_dir=str(tmp_path), run_name="every2", fork_value_every=2, **SMALL)
    trainer.train()
    assert sorted(fork_value_positions(connect(tmp_path), "every2")["step"].unique()) == [2]


@pytest.mark.parametrize("grpo, options, message", [
    ({}, {"record_tokens": False}, "set record_tokens=True"),
    ({"generation_kwargs": {"no_repeat_ngram_size": 2}}, {}, "generation_kwargs ['no_repeat_ngram_size'] is not"),
    ({}, {"fork_value_rollouts": 1}, "fork_value_rollouts=1"),
    ({}, {"fork_value_positions": 0}, "fork_value_positions=0"),
])  # fmt: skip
def test_what_fork_value_cannot_reproduce_is_refused_at_attach(make_trainer, tmp_path, grpo, options, message):
    trainer = make_trainer(**grpo)
    with pytest.raises(ValueError, match="fork_value") as e:
        forkwatch.attach(trainer, log_dir=str(tmp_path), fork_value_every=1, **options)
    assert message in str(e.value)


def test_completions_of_a_rollout_func_are_refused_at_attach(make_trainer, tmp_path):
    trainer = make_trainer()
    trainer.rollout_func = lambda prompts, trainer: None  # completions `generate` did not make
    with pytest.raises(ValueError, match="made by a rollout_func cannot be rolled out again") as e:
        forkwatch.attach(trainer, log_dir=str(tmp_path), fork_value_every=1)
    assert "fork_value_every=0" in str(e.value)


def test_a_failure_while_measuring_is_counted_and_training_goes_on(make_trainer, tmp_path):
    batch = 8  # the trainer's own reward calls score 8 completions; the measurement's, more

    def fragile(completions, **kwargs):
        if len(completions) > batch:
            raise RuntimeError("this reward cannot score a batch that large")
        return digit_reward(completions, **kwargs)

    trainer = make_trainer(max_steps=2, reward_funcs=[fragile, length_reward])
    callback = forkwatch.attach(trainer, log_dir=str(tmp_path), run_name="fragile", fork_value_every=1, **SMALL)
    trainer.train()
    assert trainer.state.global_step == 2
    assert callback.capture.faults.faults.get("fork_value") == 2
    assert fork_value_positions(connect(tmp_path), "fragile").empty
