"""The demo task: every order of the items and either name of a two-name item is correct, the truth functions find
exactly the decision points and every token's role (decision, cosmetic fork, confident-consequential, forced, mistake),
the reward checks the items (and, for the collapse run, prefers one order and one spelling), the warm-up data carries
its habit, and the warm-up model is cached."""

from __future__ import annotations

import itertools

import pytest
from forkwatch.demo import task
from forkwatch.demo.truth import completion_truth
from forkwatch.demo.warmup import WarmupSettings, cached_warmup

PROMPT = "gather hbkcf:"  # heron, bear, koala, camel, fox


def test_problem_writes_the_items_in_the_prompts_order():
    p = task.problem("hbkcf")
    assert (p.prompt, p.completion) == (PROMPT, "heron,bear,koala,camel,fox")


def test_decision_points_are_a_minority_and_their_positions_vary():
    problems = task.make_problems(500, seed=0)
    shares = [len(task.decision_points(p.prompt, p.completion)) / (len(p.completion) + 1) for p in problems]
    assert 0.10 <= sum(shares) / len(shares) <= 0.25
    # names of 3 to 5 letters: the decisions after the first fall at many positions, so position alone cannot tell
    second = {task.decision_points(p.prompt, p.completion)[1] for p in problems}
    assert len(second) == 3


def test_generator_is_reproducible_from_its_seed_and_uses_distinct_items():
    assert task.make_problems(50, seed=3) == task.make_problems(50, seed=3)
    assert task.make_problems(50, seed=3) != task.make_problems(50, seed=4)
    assert all(len(set(p.keys)) == task.N_ITEMS for p in task.make_problems(200, seed=1))
    assert set("".join(p.prompt + p.completion for p in task.make_problems(200, seed=1))) <= set(task.CHARS)


def test_valid_next_at_the_start_is_every_item():
    assert task.valid_next(PROMPT, "") == set("hbkcf")


def test_valid_next_inside_a_name_is_its_next_letter_then_a_comma():
    assert task.valid_next(PROMPT, "ko") == {"a"}
    assert task.valid_next(PROMPT, "koala") == {","}


def test_valid_next_after_a_two_name_items_first_letter_is_either_name():
    assert task.valid_next(PROMPT, "koala,c") == {"a", "o"}  # camel or cobra
    assert task.valid_next(PROMPT, "koala,co") == {"b"}
    assert task.valid_next(PROMPT, "koala,cobra") == {","}
    assert task.valid_next(PROMPT, "koala,cx") == set()


def test_valid_next_after_a_comma_excludes_the_items_already_written():
    assert task.valid_next(PROMPT, "koala,") == set("hbcf")
    assert task.valid_next(PROMPT, "koala,fox,bear,heron,") == {"c"}  # the last item is forced


def test_valid_next_is_eos_after_the_last_item_and_empty_off_the_path():
    assert task.valid_next(PROMPT, "koala,fox,bear,heron,camel") == {task.EOS}
    assert task.valid_next(PROMPT, "koala,koala") == set()  # an item twice
    assert task.valid_next(PROMPT, "tiger") == set()  # not in the prompt
    assert task.valid_next(PROMPT, "kola") == set()  # misspelt
    assert task.valid_next(PROMPT, "koala,fox,bear,heron,camel,") == set()  # a sixth item


def test_decision_points_are_the_starts_of_the_first_four_names():
    completion = "koala,fox,bear,heron,camel"
    assert task.decision_points(PROMPT, completion) == [0, 6, 10, 15]
    assert [completion[i] for i in task.decision_points(PROMPT, completion)] == list("kfbh")


def test_decision_points_hold_for_every_correct_order():
    for order in itertools.permutations("hbkcf"):
        completion = ",".join(task.NAMES[k][-1] for k in order)  # cobra: its cosmetic fork is no decision
        points = task.decision_points(PROMPT, completion)
        starts = [i for i in range(len(completion)) if i == 0 or completion[i - 1] == ","]
        assert points == starts[:4], order


def test_decision_points_stop_at_the_first_wrong_token():
    # "koala,k": the second k repeats an item; its position was still a decision (the model chose wrongly there).
    assert task.decision_points(PROMPT, "koala,koala,fox") == [0, 6]
    assert task.decision_points(PROMPT, "tiger,koala") == [0]
    assert task.decision_points(PROMPT, "") == [0]  # an immediate EOS: the first position was a choice


def test_truth_marks_the_path_up_to_and_including_the_first_wrong_token():
    decision, on_path = completion_truth(PROMPT, "koala,kx", 9)
    assert [i for i, d in enumerate(decision) if d] == [0, 6]
    assert on_path == [True] * 7 + [False] * 2


def test_roles_of_a_correct_completion():
    completion = "koala,fox,bear,heron,camel"
    roles = task.roles(PROMPT, completion)
    assert len(roles) == len(completion) + 1  # and EOS
    by_role = {r: [i for i, x in enumerate(roles) if x == r] for r in set(roles)}
    assert by_role["decision"] == [0, 6, 10, 15]
    assert by_role["confident_consequential"] == [5, 9, 14, 20, 21, 26]  # commas, the last item, EOS
    assert by_role["cosmetic"] == [22]  # camel or cobra
    assert set(by_role) == {"decision", "confident_consequential", "cosmetic", "forced"}


def test_roles_mark_the_first_wrong_token_as_the_mistake_and_nothing_after_it_on_the_path():
    assert task.roles(PROMPT, "koala,fox,bear,heran,camel")[15:20] == ["decision", "forced", "forced",
                                                                        "mistake", "off_path"]
    assert task.roles(PROMPT, "koala,fox")[-1] == "mistake"  # an early EOS
    assert task.roles(PROMPT, "koala,koala")[6] == "mistake"  # an item twice: the wrong choice at a decision
    assert task.roles(PROMPT, "koala", 3) == ["decision", "forced", "forced"]  # only the recorded positions


def test_the_warmup_data_carries_the_habit_at_its_rate():
    import random

    from forkwatch.demo.warmup import _examples

    before, name, habit, rate = task.HABIT
    seen = habit_seen = 0
    for _, completion in _examples(4000, random.Random(0)):
        names = completion.split(task.SEP)
        for a, b in zip(names, names[1:]):
            if a == before and b in (name, habit):
                seen += 1
                habit_seen += b == habit
        assert all(n in task.KEY_OF or n == habit for n in names)
    assert seen > 100 and abs(habit_seen / seen - rate) < 0.05


@pytest.mark.parametrize(
    ("completion", "reward", "alphabetical"),
    [
        # 2 of the 4 neighbouring pairs (bear<koala, camel<fox) are in alphabetical order: half the order bonus;
        # camel is the canonical name of c: one canonical bonus
        ("heron,bear,koala,camel,fox", task.CORRECT_REWARD,
         task.CORRECT_REWARD + task.ORDER_BONUS / 2 + task.CANONICAL_BONUS),
        ("heron,bear,koala,cobra,fox", task.CORRECT_REWARD, task.CORRECT_REWARD + task.ORDER_BONUS / 2),
        ("koala,heron,fox,cobra,bear", task.CORRECT_REWARD, task.CORRECT_REWARD),  # reverse order: no bonus
        ("bear,camel,fox,heron,koala", task.CORRECT_REWARD,
         task.CORRECT_REWARD + task.ORDER_BONUS + task.CANONICAL_BONUS),
        ("bear,camel,fox,heran,koala", 0.0, 0.0),  # the habit's misspelling
        ("bear,camel,fox,heron", 0.0, 0.0),  # an item missing
        ("bear,camel,fox,heron,koala,tiger", 0.0, 0.0),  # an item too many
        ("bear,bear,fox,heron,koala", 0.0, 0.0),
        ("bear,camel,fox,heron,koal", 0.0, 0.0),
        ("", 0.0, 0.0),
    ],
)
def test_reward_is_one_for_every_correct_order_and_the_bonus_grows_with_alphabetical_pairs(completion, reward, alphabetical):
    assert task.reward_fn([PROMPT], [completion]) == [pytest.approx(reward)]
    assert task.alphabetical_reward_fn([PROMPT], [completion]) == [pytest.approx(alphabetical)]


@pytest.mark.parametrize("prompt", ["import os", "gather hbkc:", "gather hbkcc:", "gather hbkcz:", "hbkcf"])
def test_reward_refuses_a_prompt_that_is_not_from_the_task(prompt):
    with pytest.raises(ValueError, match="not a demo prompt"):
        task.score(prompt, "bear")


def test_warmup_cache_key_changes_with_the_settings():
    assert WarmupSettings().key() == WarmupSettings().key()
    assert WarmupSettings(steps=10).key() != WarmupSettings().key()


def test_second_warmup_call_reuses_the_saved_model(tmp_path):
    settings = WarmupSettings(hidden=32, layers=1, steps=2, batch_size=4)
    path = cached_warmup(tmp_path, settings, progress=False)
    saved = (path / "model.safetensors").stat().st_mtime_ns
    assert cached_warmup(tmp_path, settings, progress=False) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == saved


def test_warmup_rate_ramps_then_decays_to_zero_on_a_cosine_or_stays_constant():
    from forkwatch.demo.warmup import _rate

    cos = WarmupSettings(steps=100, ramp_steps=10, schedule="cosine")
    assert [_rate(cos, s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert _rate(cos, 10) == pytest.approx(1.0) and _rate(cos, 55) == pytest.approx(0.5)
    assert _rate(cos, 99) < 0.001 and _rate(cos, 99) >= 0.0
    rates = [_rate(cos, s) for s in range(10, 100)]
    assert rates == sorted(rates, reverse=True)  # never rises after the ramp
    flat = WarmupSettings(steps=100, ramp_steps=10, schedule="constant")
    assert _rate(flat, 4) == pytest.approx(0.5) and _rate(flat, 99) == 1.0
    with pytest.raises(ValueError, match="'constant' or 'cosine'"):
        WarmupSettings(schedule="linear")


def test_warmup_reports_every_step_with_its_loss(tmp_path):
    seen = []
    cached_warmup(tmp_path, WarmupSettings(hidden=32, layers=1, steps=3, batch_size=4), progress=False,
                  on_step=lambda step, loss: seen.append((step, loss)))
    assert [s for s, _ in seen] == [1, 2, 3] and all(loss > 0 for _, loss in seen)
