"""Writer thread: the recorded completions of a hand-off (numpy, from plugin/record_copy.py) as table columns, with
the prompt and completion text decoded. numpy and the tokenizer only: no torch op runs on this thread."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np


def completion_columns(c: dict[str, Any], rank: int, tokenizer: Any) -> dict[str, Any]:
    """COMPLETIONS columns (minus run_id) with the prompt and completion text. Writer thread: numpy and decoding."""
    n = len(c["step"])
    prompts = [tuple(p[m.astype(bool)].tolist()) for p, m in zip(c["prompt_ids"], c["prompt_mask"], strict=True)]
    completions = [ids[:k].tolist() for ids, k in zip(c["completion_ids"], c["length"], strict=True)]
    # a prompt comes back once per rollout of its group (and again under num_iterations): decode each one once
    unique = list(dict.fromkeys(prompts))
    prompt_text = dict(zip(unique, decode(tokenizer, [list(u) for u in unique]), strict=True))
    rewards = c.get("rewards")
    return {
        "step": c["step"],
        "rank": np.full(n, rank),
        "completion_id": c["completion_id"],
        "group_id": c["group_id"],
        "prompt": [prompt_text[p] for p in prompts],
        "completion": decode(tokenizer, completions),
        "rewards": None if rewards is None else dict(zip(c["reward_names"], rewards.T, strict=True)),
        "reward": c["reward"],
        "advantage": c["advantage"],
        "length": c["length"],
        "truncated": c["truncated"],
        "entropy_mean": c["entropy_mean"],
    }


def decode(tokenizer, seqs: list[list[int]]) -> list[str]:
    """`tokenizer.batch_decode(seqs, skip_special_tokens=True)`, one sequence at a time on this thread. A fast
    tokenizer whose decoding transformers does not change (no clean-up, methods not overridden) is decoded by its
    backend directly, which is what `_decode` would do, without transformers' per-token type checks. Never the
    backend's `decode_batch`: that fans out to the tokenizers library's own thread pool, which would compete with
    training for the cores."""
    if _plain_fast_tokenizer(type(tokenizer)) and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        backend = tokenizer.backend_tokenizer
        return [backend.decode(s, skip_special_tokens=True) for s in seqs]
    return [tokenizer.decode(s, skip_special_tokens=True) for s in seqs]


@functools.cache
def _plain_fast_tokenizer(cls: type) -> bool:
    try:
        from transformers import PreTrainedTokenizerFast as Fast
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase as Base
    except ImportError:  # pragma: no cover - transformers always present with the plugin
        return False
    return (issubclass(cls, Fast) and cls._decode is Fast._decode and cls.decode is Base.decode
            and cls.batch_decode is Base.batch_decode)
