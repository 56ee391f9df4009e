"""The demo task: written-out solutions follow operator precedence, the reward checks the final answer, and the
warm-up model is cached under a key of its settings."""

from __future__ import annotations

import pytest
from forkwatch.demo import task
from forkwatch.demo.warmup import WarmupSettings, cached_warmup


def test_multiplication_after_addition_is_done_first():
    p = task.solve(7, "+", 5, "*", 2)
    assert (p.prompt, p.completion, p.answer) == ("7+5*2=", "5*2=10;7+10=17", 17)


def test_left_to_right_otherwise_and_negative_results_are_written_out():
    p = task.solve(2, "-", 9, "+", 3)
    assert (p.completion, p.answer) == ("2-9=-7;-7+3=-4", -4)


def test_every_problem_fits_the_completion_budget_and_matches_python_arithmetic():
    problems = task.make_problems(2000, seed=0)
    assert max(len(p.completion) for p in problems) <= task.MAX_COMPLETION_CHARS
    assert max(len(p.prompt) for p in problems) == 6
    assert all(p.answer == eval(p.prompt[:-1]) for p in problems)  # noqa: S307 (digits and + - * only)
    assert set("".join(p.prompt + p.completion for p in problems)) <= set(task.CHARS)


def test_generator_is_reproducible_from_its_seed():
    assert task.make_problems(50, seed=3) == task.make_problems(50, seed=3)
    assert task.make_problems(50, seed=3) != task.make_problems(50, seed=4)


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("5*2=10;7+10=17", task.CORRECT_REWARD + task.FORMAT_REWARD),
        ("7+5=12;12*2=17", task.CORRECT_REWARD + task.FORMAT_REWARD),  # only the final answer is verified
        ("=17", task.CORRECT_REWARD),  # the answer follows the last "="; no steps, no format reward
        ("17", 0.0),
        ("5*2=10;7+10=24", task.FORMAT_REWARD),
        ("5*2=10;7+10=1", task.FORMAT_REWARD),
        ("5*2=10;7+10=", 0.0),
        ("", 0.0),
    ],
)
def test_reward_is_correctness_plus_a_small_format_reward(completion, reward):
    assert task.reward_fn(["7+5*2="], [completion]) == [pytest.approx(reward)]


def test_reward_refuses_a_prompt_that_is_not_from_the_task():
    with pytest.raises(ValueError, match="not a demo prompt"):
        task.score("import os", "1")


def test_warmup_cache_key_changes_with_the_settings():
    assert WarmupSettings().key() == WarmupSettings().key()
    assert WarmupSettings(steps=10).key() != WarmupSettings().key()


def test_second_warmup_call_reuses_the_saved_model(tmp_path):
    settings = WarmupSettings(hidden=32, layers=1, steps=2, batch_size=4)
    path = cached_warmup(tmp_path, settings, progress=False)
    saved = (path / "model.safetensors").stat().st_mtime_ns
    assert cached_warmup(tmp_path, settings, progress=False) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == saved
