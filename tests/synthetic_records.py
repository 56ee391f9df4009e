"""Synthetic records distributed like real ones, for the store tests and the store and dashboard benchmarks.

Token entropies of a trained policy are mostly near zero with a heavy tail (Wang et al., arXiv:2506.01939: over half below
0.01 nats, 80th percentile ~0.67 nats on Qwen3-8B math rollouts). Here: 60 % lognormal between ~1e-4 and ~1e-2 nats, 40 % spread
up to ~3 nats; the sampled token's logprob is correlated with the entropy (near 0 when the model is sure); Rényi-2
is below the entropy; token ids are Zipf-like over a 150k vocabulary; completions are 200-2000 tokens long.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

VOCAB_SIZE = 151_936


def token_columns(
    rng: np.random.Generator, step: int, completion_ids: np.ndarray, lengths: np.ndarray
) -> dict[str, Any]:
    """Columns of the tokens table (all but run_id) for completions of the given ids and lengths."""
    n = int(lengths.sum())
    low = rng.random(n) < 0.6
    entropy = np.where(
        low,
        np.exp(rng.normal(np.log(1e-3), 1.2, n)),  # ~1e-4 .. 1e-2
        np.minimum(rng.gamma(1.2, 0.6, n), 3.5),  # the tail, up to ~3 nats
    ).astype(np.float32)
    # Confident positions sample the argmax (logprob ~ -entropy); uncertain ones sample lower down.
    logprob = -(entropy * rng.uniform(0.2, 1.5, n) + rng.exponential(0.02, n) * (~low)).astype(np.float32)
    renyi2 = (entropy * rng.uniform(0.55, 1.0, n)).astype(np.float32)
    group_js = np.minimum(entropy * rng.uniform(0.0, 0.3, n), np.log(2)).astype(np.float32)
    adv = np.repeat(rng.normal(0, 1, len(lengths)), lengths)
    covariance = ((adv - adv.mean()) * (logprob - logprob.mean())).astype(np.float32)
    token_id = np.minimum(rng.zipf(1.3, n) - 1, VOCAB_SIZE - 1).astype(np.int32)
    fork_cut = np.quantile(entropy, 0.9) if n else 0.0
    return {
        "step": step,
        "completion_id": np.repeat(completion_ids.astype(np.int64), lengths),
        "position": np.concatenate([np.arange(k, dtype=np.int32) for k in lengths]) if n else np.zeros(0, np.int32),
        "token_id": token_id,
        "logprob": logprob,
        "entropy": entropy,
        "renyi2": renyi2,
        "group_js": group_js,
        "covariance": covariance,
        "selected": np.ones(n, np.float32),
        "is_fork": entropy >= fork_cut,
    }


def step_batches(
    *,
    steps: int,
    completions_per_step: int = 64,
    group_size: int = 8,
    seed: int = 0,
    min_len: int = 200,
    max_len: int = 2000,
    first_step: int = 0,
) -> Iterator[dict[str, dict[str, Any]]]:
    """One dict {table: columns} per step: tokens, completions, forks and a steps row."""
    rng = np.random.default_rng(seed)
    for step in range(first_step, first_step + steps):
        cids = np.arange(completions_per_step, dtype=np.int64) + step * completions_per_step
        lengths = rng.integers(min_len, max_len + 1, completions_per_step)
        tok = token_columns(rng, step, cids, lengths)
        n = len(tok["entropy"])
        ent_by_c = np.add.reduceat(tok["entropy"], np.r_[0, np.cumsum(lengths)[:-1]]) / lengths
        reward = rng.integers(0, 2, completions_per_step).astype(np.float32)
        fork_idx = np.flatnonzero(tok["is_fork"])
        k = 5
        alt = np.minimum(rng.zipf(1.3, (len(fork_idx), k)) - 1, VOCAB_SIZE - 1).astype(np.int32)
        probs = rng.dirichlet(np.ones(k), len(fork_idx)).astype(np.float32)
        probs = -np.sort(-probs, axis=1)
        ent = tok["entropy"]
        yield {
            "tokens": tok,
            "completions": {
                "step": step,
                "rank": np.zeros(completions_per_step, np.int16),
                "completion_id": cids,
                "group_id": cids // group_size,
                "prompt": [f"prompt {c // group_size}" for c in cids],
                "completion": [f"completion {c}" for c in cids],
                "rewards": [{"accuracy": float(r), "format": 1.0} for r in reward],
                "reward": reward,
                "advantage": (reward - reward.mean()).astype(np.float32),
                "length": lengths.astype(np.int32),
                "truncated": lengths >= max_len,
                "entropy_mean": ent_by_c.astype(np.float32),
            },
            "forks": {
                "step": step,
                "completion_id": tok["completion_id"][fork_idx],
                "position": tok["position"][fork_idx],
                "sampled_rank": rng.integers(0, k, len(fork_idx)).astype(np.int16),
                "alt_token_ids": list(alt),
                "alt_probs": list(probs),
            },
            "steps": {
                "step": [step],
                "time": np.array([1_700_000_000_000 + step * 1000], "datetime64[ms]"),
                "n_tokens": [n],
                "n_completions": [completions_per_step],
                "entropy_mean": [float(ent.mean())],
                "entropy_p50": [float(np.quantile(ent, 0.5))],
                "entropy_p90": [float(np.quantile(ent, 0.9))],
                "reward_mean": [float(reward.mean())],
                "fork_fraction": [float(tok["is_fork"].mean())],
                "selected_fraction": [1.0],
                "select_method": ["none"],
            },
        }


def vocab_columns(size: int = 1000, step: int = 0) -> dict[str, Any]:
    """A vocab batch mapping token ids 0..size-1 to printable strings."""
    return {"step": step, "token_id": np.arange(size, dtype=np.int32), "text": [f"<{i}>" for i in range(size)]}
