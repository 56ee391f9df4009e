"""Q(s, a) computed exactly, by enumerating continuations: the reference the Monte Carlo fork value is checked against.

For a model that is near-certain almost everywhere (the demo's warm-up model), the continuations of a prefix that
carry any real probability are few. `exact_q` walks the tree of continuations breadth first, one batched forward per
level, under the same sampling distribution `measure` samples from (plugin/fork_value.py, `Sampling.processors`),
and keeps a path while its probability is at least `eps`. Every finished path (a stop token, or the length budget)
is scored once; the paths cut below `eps` carry the pruned mass, so

    Σ_finished p·r + pruned·r_lo  ≤  Q(s, a)  ≤  Σ_finished p·r + pruned·r_hi

for rewards in [r_lo, r_hi]. `ExactQ.q` is the middle of that interval and `ExactQ.error` half its width. A path whose
outcome is already decided (on the demo: a prefix that has left every correct completion earns 0 whatever follows)
is closed early with that reward when `settled` says so: exact, and it keeps the tree to the correct continuations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from forkwatch.plugin.fork_value import Sampling


@dataclass(frozen=True)
class ExactQ:
    q: np.ndarray  # (J,) the middle of the bound
    error: np.ndarray  # (J,) half the bound's width: |Q − q| ≤ error
    pruned: np.ndarray  # (J,) probability of the paths cut below eps
    paths: int  # finished paths scored, over all jobs


@torch.no_grad()
def exact_q(model: torch.nn.Module, starts: Sequence[Sequence[int]], budgets: Sequence[int], *, sampling: Sampling,
            reward: Callable[[list[int], list[list[int]]], np.ndarray], reward_range: tuple[float, float],
            settled: Callable[[list[int], list[list[int]]], np.ndarray] | None = None, eps: float = 1e-5,
            chunk: int = 2048, max_nodes: int = 200_000) -> ExactQ:
    """Q of each job j: `starts[j]` (prompt + completion so far + the branch token) continued by at most
    `budgets[j]` tokens (0: the start is already a finished completion). `reward(jobs, tails)` scores finished paths
    (the new tokens after each start, stop token included) -> (N,); `settled(jobs, tails)` -> (N,) the reward of
    paths whose outcome no continuation can change, NaN for the others. Raises RuntimeError when the tree outgrows
    `max_nodes` (the model is not near-certain enough for this eps)."""
    device = next(model.parameters()).device
    processors = sampling.processors()
    eos = set(sampling.eos_token_ids)
    n_jobs = len(starts)
    pruned = np.zeros(n_jobs)
    done_jobs: list[int] = []
    done_tails: list[list[int]] = []
    done_prob: list[float] = []
    settled_sum = np.zeros(n_jobs)  # Σ p·r over the paths closed early
    frontier: list[tuple[int, list[int], float]] = []
    for j, b in enumerate(budgets):
        if b > 0:
            frontier.append((j, [], 1.0))
        else:  # the branch token ended the completion
            done_jobs.append(j)
            done_tails.append([])
            done_prob.append(1.0)
    was_training = model.training
    model.eval()
    try:
        while frontier:
            if len(frontier) > max_nodes:
                raise RuntimeError(f"exact_q: {len(frontier)} open paths (> {max_nodes}); raise eps")
            nxt: list[tuple[int, list[int], float]] = []
            for c in range(0, len(frontier), chunk):
                part = frontier[c: c + chunk]
                rows = [[*starts[j], *tail] for j, tail, _ in part]
                width = max(map(len, rows))
                ids = torch.full((len(rows), width), sampling.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, row in enumerate(rows):
                    ids[r, width - len(row):] = torch.tensor(row)
                    mask[r, width - len(row):] = 1
                ids, mask = ids.to(device), mask.to(device)
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens
                logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                               logits_to_keep=1).logits[:, -1].float()
                probs = torch.softmax(processors(ids, logits), dim=-1).cpu().numpy()  # (B, V)
                for (j, tail, p), dist in zip(part, probs, strict=True):
                    keep = np.flatnonzero(p * dist >= eps)
                    pruned[j] += p * (1.0 - float(dist[keep].sum()))
                    for t in keep.tolist():
                        q = p * float(dist[t])
                        new_tail = [*tail, t]
                        if t in eos or len(new_tail) >= budgets[j]:
                            done_jobs.append(j)
                            done_tails.append(new_tail)
                            done_prob.append(q)
                        else:
                            nxt.append((j, new_tail, q))
            if settled is not None and nxt:
                known = np.asarray(settled([j for j, _, _ in nxt], [t for _, t, _ in nxt]), dtype=np.float64)
                for (j, _, q), r in zip(nxt, known, strict=True):
                    if not np.isnan(r):
                        settled_sum[j] += q * r
                nxt = [node for node, r in zip(nxt, known, strict=True) if np.isnan(r)]
            frontier = nxt
    finally:
        model.train(was_training)
    r = np.asarray(reward(done_jobs, done_tails), dtype=np.float64)
    lower = settled_sum + np.bincount(np.asarray(done_jobs, dtype=np.int64), weights=np.asarray(done_prob) * r,
                                      minlength=n_jobs)
    lo, hi = reward_range
    pruned = np.clip(pruned, 0.0, 1.0)
    return ExactQ(q=lower + pruned * (lo + hi) / 2, error=pruned * (hi - lo) / 2, pruned=pruned, paths=len(done_jobs))
