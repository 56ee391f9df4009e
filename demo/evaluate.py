"""Held-out evaluation of a demo policy: the task's reward on problems the runs never trained on."""

from __future__ import annotations

import torch
from forkwatch.demo import task
from transformers import PreTrainedTokenizerFast

HELDOUT_SEED = 999  # training prompts use seeds 0 (warm-up) and 10_000 + run seed (GRPO)


@torch.no_grad()
def heldout(
    model: torch.nn.Module, tok: PreTrainedTokenizerFast, *, n: int = 512, greedy: bool = False, seed: int = 0
) -> dict[str, float]:
    """Mean reward and accuracy (answer right) of `n` completions, sampled at temperature 1 (as in training) or
    greedy. All prompts have the same length, so one left-padded batch needs no padding at all."""
    problems = task.make_problems(n, seed=HELDOUT_SEED)
    enc = tok([p.prompt for p in problems], return_tensors="pt", padding=True)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kwargs = {"do_sample": False} if greedy else {"do_sample": True, "temperature": 1.0, "top_k": 0}
        out = model.generate(**enc, max_new_tokens=task.MAX_COMPLETION_CHARS + 3, **kwargs)
    model.train(was_training)
    completions = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    rewards = task.reward_fn([p.prompt for p in problems], completions)
    return {
        "reward": sum(rewards) / n,
        "accuracy": sum(r >= task.CORRECT_REWARD for r in rewards) / n,
    }
