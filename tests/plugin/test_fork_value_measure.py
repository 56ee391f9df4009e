"""`measure` (plugin/fork_value.py) on a tiny model: it leaves the caller's RNG untouched, samples from exactly the
distribution `generate` samples from, batches its rollouts, and calls the reward functions as GRPOTrainer does."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from forkwatch.demo.tiny import char_tokenizer, tiny_model
from forkwatch.plugin.fork_value import (
    ForkValueSettings,
    Position,
    RewardFunctions,
    Sampling,
    measure,
)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(len(tok), seed=3).eval()


def _sampling(model, tok, **kw) -> Sampling:
    return Sampling.from_settings({"max_completion_length": 6, **kw}, model=model, tokenizer=tok)


def _positions(tok, n: int = 3) -> list[Position]:
    prompt = tuple(tok("1+2=")["input_ids"])
    completion = tuple(tok("3a+b")["input_ids"])
    return [Position(prompt, completion, pos, "1+2=", step=4, completion_id=7, stratum="other", inclusion_prob=0.5)
            for pos in range(n)]


def _digits(completions, **_):
    return [sum(ch.isdigit() for ch in c) for c in completions]


def test_measure_leaves_the_callers_rng_as_it_was(model, tok):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    expected = torch.rand(3)  # what the caller would draw next without the measurement
    torch.set_rng_state(before)
    measure(model, tok, _positions(tok), sampling=_sampling(model, tok), rewards=RewardFunctions.of([_digits]),
            settings=ForkValueSettings(branches=2, rollouts=4, bootstrap=10, permutations=10), seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(3), expected)


def test_a_reward_that_draws_from_python_or_numpy_leaves_their_global_generators_alone(model, tok):
    import random

    def noisy(completions, **_):  # a reward function that uses the global generators
        return [random.random() + np.random.rand() for _ in completions]

    random.seed(5)
    np.random.seed(5)
    expected = (random.random(), np.random.rand())
    random.seed(5)
    np.random.seed(5)
    measure(model, tok, _positions(tok), sampling=_sampling(model, tok), rewards=RewardFunctions.of([noisy]),
            settings=ForkValueSettings(branches=2, rollouts=2, bootstrap=10, permutations=10), seed=0)
    assert (random.random(), np.random.rand()) == expected


def test_lockstep_makes_up_the_other_ranks_calls_with_idle_ones(model, tok):
    # a rank with fewer calls than the busiest rank (sharded weights: each forward is a collective) makes as many
    calls = {"forward": 0, "generate": 0}
    asked = []

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            calls["forward"] += 1
            return self.inner(*args, **kwargs)

        def generate(self, *args, **kwargs):
            # every rank steps until all are done (one process here: no group to sync with; tests/sharded_run.py
            # runs it on two)
            assert kwargs.pop("synced_gpus") is True
            calls["generate"] += 1
            return self.inner.generate(*args, **kwargs)

    def lockstep(n: int) -> int:
        asked.append(n)
        return n + 2  # another rank makes two more calls of each kind

    m = measure(Counting(model), tok, _positions(tok, 2), sampling=_sampling(model, tok),
                rewards=RewardFunctions.of([_digits]), seed=0, lockstep=lockstep,
                settings=ForkValueSettings(branches=2, rollouts=2, bootstrap=10, permutations=10))
    assert asked == [1, 1]  # one completion -> one forward of its own; its rollouts fit one generate call
    assert calls["generate"] == 3 and len(m.estimates) == 2
    # a rank without positions still makes the calls, and measures nothing
    calls.update(forward=0, generate=0)
    empty = measure(Counting(model), tok, [], sampling=_sampling(model, tok), rewards=RewardFunctions.of([_digits]),
                    seed=0, lockstep=lambda n: 3, settings=ForkValueSettings(branches=2, rollouts=2))
    assert calls["forward"] == 3 and calls["generate"] == 3 and not empty.estimates


def test_same_seed_same_measurement_other_seed_other_rollouts(model, tok):
    kw = dict(sampling=_sampling(model, tok), rewards=RewardFunctions.of([_digits]),
              settings=ForkValueSettings(branches=3, rollouts=6, bootstrap=10, permutations=10))
    a = measure(model, tok, _positions(tok), seed=1, **kw)
    b = measure(model, tok, _positions(tok), seed=1, **kw)
    c = measure(model, tok, _positions(tok), seed=2, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(a.rewards, b.rewards, strict=True))
    assert a.columns["value"].tolist() == b.columns["value"].tolist()
    assert any(not np.array_equal(x, y) for x, y in zip(a.rewards, c.rewards, strict=True))


def test_pi_is_the_distribution_generate_samples_from(model, tok):
    """At temperature 0.7, top-k 8, top-p 0.9 and a repetition penalty, π of the branches equals the softmax of the
    scores `generate` itself produced for the same first token."""
    sampling = _sampling(model, tok, temperature=0.7, top_k=8, top_p=0.9, repetition_penalty=1.3)
    prompt = tok("1+2=")["input_ids"]
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), output_scores=True,
                         return_dict_in_generate=True, generation_config=sampling.generation_config(1))
    want = torch.softmax(out.scores[0][0].float(), dim=-1)
    p = Position(tuple(prompt), (int(out.sequences[0, -1]),), 0, "1+2=")
    m = measure(model, tok, [p], sampling=sampling, rewards=RewardFunctions.of([_digits]),
                settings=ForkValueSettings(branches=5, rollouts=2, other_mass=1.0, bootstrap=2, permutations=2),
                seed=0)
    tokens = [t for t in m.columns["branch_token_id"]]
    assert m.columns["pi"] == pytest.approx(want[tokens].numpy(), abs=1e-6)
    assert (want > 0).sum() <= 8  # the warpers are active: the comparison is not of two plain softmaxes


def test_other_branch_draws_only_tokens_outside_the_branches(model, tok):
    seen = []

    def spy(completions, completion_ids, **_):
        seen.extend(completion_ids)
        return [0.0] * len(completions)

    positions = _positions(tok, 1)
    m = measure(model, tok, positions, sampling=_sampling(model, tok), rewards=RewardFunctions.of([spy]),
                settings=ForkValueSettings(branches=2, rollouts=5, other_mass=0.01, bootstrap=2, permutations=2),
                seed=0)
    kinds = m.columns["branch"].tolist()
    assert kinds == ["sampled", "alternative", "alternative", "other"]  # a random model leaves most mass outside
    named = set(m.columns["branch_token_id"][:3])
    firsts = [ids[0] for ids in seen]
    assert sum(t not in named for t in firsts) == 5  # exactly the other branch's 5 rollouts
    assert m.columns["pi"][3] == pytest.approx(1 - sum(m.columns["pi"][:3]), abs=1e-6)
    assert m.columns["branch_token_id"][3] is None


def test_rollouts_are_batched_into_as_few_generate_calls_as_the_batch_allows(model, tok):
    positions = _positions(tok, 3)
    settings = ForkValueSettings(branches=3, rollouts=4, other_mass=1.0, batch_rows=10, bootstrap=2, permutations=2)
    m = measure(model, tok, positions, sampling=_sampling(model, tok), rewards=RewardFunctions.of([_digits]),
                settings=settings, seed=0)
    generated = m.cost.rollouts - m.cost.terminal_rollouts
    assert m.cost.generate_calls == math.ceil(generated / 10)
    assert m.cost.forward_calls == 1  # the three positions share one completion: one forward gives π at each
    assert m.cost.reward_calls == 1


def test_model_mode_and_gradients_are_left_alone(model, tok):
    model.train()
    try:
        measure(model, tok, _positions(tok, 1), sampling=_sampling(model, tok), rewards=RewardFunctions.of([_digits]),
                settings=ForkValueSettings(branches=2, rollouts=2, bootstrap=2, permutations=2), seed=0)
        assert model.training
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()


def test_reward_functions_get_what_grpo_trainer_passes(model, tok):
    """Chat prompts give completions as assistant messages; the prompt's extra dataset columns arrive as keyword
    lists, one value per rollout; the total is the weighted sum."""
    calls = {}

    def judge(prompts, completions, completion_ids, answer, trainer_state, **_):
        calls.update(prompts=prompts, completions=completions, answer=answer, state=trainer_state)
        return [1.0 if a == "3" else 0.0 for a in answer]

    def length(completions, **_):
        return [len(c[0]["content"]) for c in completions]

    messages = [{"role": "user", "content": "1+2="}]
    p = Position(tuple(tok("1+2=")["input_ids"]), tuple(tok("3a")["input_ids"]), 1, messages, columns={"answer": "3"})
    rewards = RewardFunctions.of([judge, length], [2.0, 0.5])
    m = measure(model, tok, [p], sampling=_sampling(model, tok), rewards=rewards,
                settings=ForkValueSettings(branches=2, rollouts=3, other_mass=1.0, bootstrap=2, permutations=2),
                seed=0, state="the-state")
    assert calls["answer"] == ["3"] * len(calls["prompts"]) and calls["state"] == "the-state"
    assert all(pr == messages for pr in calls["prompts"])
    assert all(isinstance(c, list) and c[0]["role"] == "assistant" and c[0]["content"].startswith("3")
               for c in calls["completions"])
    lengths = np.array([len(c[0]["content"]) for c in calls["completions"]])
    assert np.concatenate(m.rewards, axis=None).tolist() == pytest.approx((2.0 + 0.5 * lengths).tolist())


def test_sampling_and_rewards_are_read_from_a_real_trainer(make_trainer):
    trainer = make_trainer(temperature=0.8, top_p=0.95, max_completion_length=5, reward_weights=[1.0, 0.5])
    s = Sampling.from_trainer(trainer)
    assert (s.temperature, s.top_p, s.max_completion_length) == (0.8, 0.95, 5)
    assert s.eos_token_ids == tuple(trainer.eos_token_ids)
    r = RewardFunctions.from_trainer(trainer)
    assert r.names == ["digit_reward", "length_reward"] and r.weights.tolist() == [1.0, 0.5]


def test_settings_refuse_what_the_estimate_cannot_use():
    with pytest.raises(ValueError, match="rollouts=1"):
        ForkValueSettings(rollouts=1)
    with pytest.raises(ValueError, match="other_mass"):
        ForkValueSettings(other_mass=0.0)
