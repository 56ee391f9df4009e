"""Evaluation of a demo policy on fresh samples: how often it is correct, and where its entropy sits (decision
points, cosmetic forks, confident-consequential tokens, forced tokens, mistakes).

Problems are drawn with their own seed. They are not held out in the strict sense: the task has only 6,720 distinct
prompts (56 item sets x 120 listing orders) and the warm-up sees most of them. What this measures is the policy's
shape (where it is certain and where it spreads), not generalisation.
"""

from __future__ import annotations

import math

import torch
from forkwatch.demo import task
from transformers import PreTrainedTokenizerFast

HELDOUT_SEED = 999  # GRPO prompts use 10_000 + run seed; the warm-up draws from its own generator
CERTAIN_NATS = 0.01  # a token below this entropy is "near-certain"


@torch.no_grad()
def heldout(
    model: torch.nn.Module, tok: PreTrainedTokenizerFast, *, n: int = 256, seed: int = 0
) -> dict[str, float]:
    """Sampled at temperature 1 (as in training): accuracy, alphabetical share of correct completions, share of
    near-certain tokens, and the mean entropy (nats) and share of the tokens of each role (`task.roles`)."""
    problems = task.make_problems(n, seed=HELDOUT_SEED)
    enc = tok([p.prompt for p in problems], return_tensors="pt", padding=True)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(
            **enc, max_new_tokens=task.MAX_COMPLETION_CHARS + 3, do_sample=True, temperature=1.0, top_k=0,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    model.train(was_training)
    width = enc["input_ids"].shape[1]
    seqs = out.sequences[:, width:]
    logp = torch.stack(out.scores, dim=1).float().log_softmax(-1)  # (n, T, V)
    ent = -(logp.exp() * logp).sum(-1)  # (n, T)
    completions = tok.batch_decode(seqs, skip_special_tokens=True)
    rewards = task.reward_fn([p.prompt for p in problems], completions)
    by_role: dict[str, list[float]] = {r: [] for r in task.ROLES}
    all_ent: list[float] = []
    for i, (p, c) in enumerate(zip(problems, completions, strict=True)):
        n_tok = int((seqs[i] != tok.pad_token_id).sum())  # completion tokens incl. EOS
        row = ent[i, :n_tok].tolist()
        all_ent += row
        for h, role in zip(row, task.roles(p.prompt, c, n_tok), strict=True):
            by_role[role].append(h)
    correct = [c for c, r in zip(completions, rewards, strict=True) if r >= task.CORRECT_REWARD]
    on_path = sum(len(v) for r, v in by_role.items() if r != "off_path")
    return {
        "accuracy": len(correct) / n,
        "alphabetical": sum(c.split(task.SEP) == sorted(c.split(task.SEP)) for c in correct) / max(1, len(correct)),
        "certain_share": sum(h < CERTAIN_NATS for h in all_ent) / max(1, len(all_ent)),
        "decision_entropy": _mean(by_role["decision"]),
        "forced_entropy": _mean(by_role["forced"]),
        "decision_share": len(by_role["decision"]) / max(1, on_path),
        # mean entropy (nats) and share of on-path tokens of every role (task.ROLES; "off_path" is after a mistake)
        **{f"{r}_entropy": _mean(v) for r, v in by_role.items() if r not in ("decision", "forced")},
        **{f"{r}_share": len(v) / max(1, on_path) for r, v in by_role.items() if r not in ("decision", "off_path")},
    }


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan
