"""The recorded rows of a hand-off, from the device to table columns, in two halves on two threads.

Training thread (`to_host`): all the torch work of recording (stacking micro-batches, the statistics of
`TOKEN_STATS`, picking the recorded rows) happens here, between TRL's own ops, and ends in host copies — one per kind
of record, free views on a CPU device. What crosses to the writer thread is `HostRecords` (numpy).

Writer thread (`HostRecords.batches`): the numpy becomes table columns and the completions' text is decoded. No
torch op runs there: a second thread's torch ops start a second OpenMP team that fights the training thread's
threads for the same cores, which slows training far more than the work itself costs. Arrow types are the store's
business (the writer converts by the schema).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from forkwatch.plugin.step_data import (
    TOKEN_IDS,
    TOKEN_STATS,
    CompletionBatch,
    ForkBatch,
    StepAccumulator,
    TokenBatch,
    token_rows,
)
from forkwatch.plugin.token_math import no_grad


def _np(t: torch.Tensor) -> np.ndarray:
    """The one device -> host copy of a record tensor (a free view on a CPU device)."""
    return t.detach().to("cpu", non_blocking=False).numpy()


@dataclass
class HostRecords:
    """The recorded rows of some steps, on the host. Columns are numpy; `batches` turns them into table batches."""

    rank: int
    tokenizer: Any
    tokens: dict[str, np.ndarray | None] = field(default_factory=dict)
    forks: dict[str, np.ndarray] = field(default_factory=dict)
    completions: dict[str, Any] = field(default_factory=dict)  # ids and facts; text decoded in `batches`
    rows: dict[str, int] = field(default_factory=dict)  # {table: rows}, for the writer's queue bound

    def batches(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Writer thread: (table, columns) for every table with rows. numpy and decoding only."""
        if self.completions:
            yield "completions", completion_columns(self.completions, self.rank, self.tokenizer)
        if self.tokens:
            yield "tokens", self.tokens
        if self.forks:
            yield "forks", self.forks


# ------------------------------------------------------------------------------------------------ training thread
@no_grad
def to_host(records: list[tuple[int, StepAccumulator]], *, rank: int, tokenizer: Any) -> HostRecords:
    """Training thread: the recorded tokens, forks and completions of the handed-off steps, copied to numpy."""
    host = HostRecords(rank=rank, tokenizer=tokenizer)

    def of(name: str) -> list[tuple[int, list[Any]]]:
        return [(step, getattr(acc, name)) for step, acc in records if getattr(acc, name)]

    if steps := of("tokens"):
        host.tokens = token_columns(steps)
        host.rows["tokens"] = len(host.tokens["step"])
    if steps := of("forks"):
        host.forks = fork_columns(steps)
        host.rows["forks"] = len(host.forks["step"])
    if steps := of("completions"):
        host.completions = _completion_host(steps)
        host.rows["completions"] = len(host.completions["step"])
    return host


def token_columns(steps: list[tuple[int, list[TokenBatch]]]) -> dict[str, np.ndarray | None]:
    """TOKENS columns (minus run_id): same-shaped batches stacked (`token_rows`), then one host copy per kind; a
    statistic computed in none of the batches is a null column (None), not NaN."""
    groups: dict[tuple, tuple[list[int], list[TokenBatch]]] = {}
    for step, bs in steps:
        for b in bs:
            g = groups.setdefault(b.shape_key(), ([], []))
            g[0].append(step)
            g[1].append(b)
    parts = [token_rows(*g) for g in groups.values()]
    stats, ids = _np(torch.cat([p[0] for p in parts])), _np(torch.cat([p[1] for p in parts]))
    cols: dict[str, np.ndarray | None] = {"step": ids[:, 0]}
    cols.update({name: ids[:, i + 1] for i, name in enumerate(TOKEN_IDS)})
    for i, stat in enumerate(TOKEN_STATS):
        cols[stat.name] = stats[:, i] if any(p[3][i] for p in parts) else None
    cols["is_fork"] = _np(torch.cat([p[2] for p in parts]))
    return cols


def _step_column(steps: list[tuple[int, list[Any]]], rows: Any) -> np.ndarray:
    """The step of every row: each step repeated over the rows of its batches (`rows(batch)` of each)."""
    counts = [sum(int(rows(b)) for b in bs) for _, bs in steps]
    return np.repeat(np.array([s for s, _ in steps], np.int64), counts)


def fork_columns(steps: list[tuple[int, list[ForkBatch]]]) -> dict[str, np.ndarray]:
    """FORKS columns (minus run_id); the alternatives as (F, k) arrays (list columns)."""
    batches = [b for _, bs in steps for b in bs]
    return {
        "step": _step_column(steps, lambda b: b.alt_token_ids.size(0)),
        "completion_id": _np(torch.cat([b.completion_id for b in batches])),
        "position": _np(torch.cat([b.position for b in batches])),
        # int16 column: a rank beyond its range is "far down the list" either way
        "sampled_rank": np.minimum(_np(torch.cat([b.sampled_rank for b in batches])), 32767),
        "alt_token_ids": _np(torch.cat([b.alt_token_ids for b in batches])),
        "alt_probs": _np(torch.cat([b.alt_probs for b in batches]).float()),
    }


def _completion_host(steps: list[tuple[int, list[CompletionBatch]]]) -> dict[str, Any]:
    """Per recorded completion: its facts, prompt and completion ids (ragged: as row lists of numpy views), and its
    mean entropy. Each generation batch crosses to the host once; rows are picked in numpy."""
    batches = [b for _, bs in steps for b in bs]
    host = {id(b.gen): {f: _np(getattr(b.gen, f)) for f in (*CompletionBatch.FIELDS, *CompletionBatch.RAGGED)
                        if getattr(b.gen, f) is not None} for b in batches}
    cols: dict[str, list[np.ndarray]] = {}
    for b in batches:
        a, rows = host[id(b.gen)], _np(b.gen_rows)
        for f in (*CompletionBatch.FIELDS, *CompletionBatch.RAGGED):
            if f in a:
                cols.setdefault(f, []).append(a[f][rows])
        idx = b.idx
        ent, valid = b.entropy[idx], b.mask[idx] != 0  # (n, T): the recorded rows only
        cols.setdefault("entropy_mean", []).append(_np((ent * valid).sum(1) / valid.sum(1).clamp(min=1)))
    out: dict[str, Any] = {f: np.concatenate(v) for f, v in cols.items() if f not in CompletionBatch.RAGGED}
    # ragged: padded to each generation batch's width, so kept as one row list per field
    out.update({f: [row for part in cols[f] for row in part] for f in CompletionBatch.RAGGED})
    out["step"] = _step_column(steps, lambda b: b.idx.numel())
    out["reward_names"] = batches[0].reward_names
    return out


# ------------------------------------------------------------------------------------------------ writer thread
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
