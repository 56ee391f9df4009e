"""Teacher-forced scores of a fixed probe completion: the same tokens' entropy, Rényi-2 and top-k at every probe.

Each training step samples new completions, so the tokens recorded at one step are never scored again. A probe
(prompt, completion) is scored with the current policy every few steps, without gradient, so a position's entropy
can be followed across training (arXiv:2506.01939 reports that 86 % of the high-entropy positions are shared before
and after RLVR).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ProbeScores:
    """Per completion token t (T tokens): the distribution that predicted it, p = softmax(z_t / temperature)."""

    logprob: torch.Tensor  # (T,) float32: log p(y_t)
    entropy: torch.Tensor  # (T,) float32: H1 = -Σ p log p
    renyi2: torch.Tensor  # (T,) float32: H2 = -log Σ p²
    top_ids: torch.Tensor  # (T, k) int64: the k most likely tokens, most likely first
    top_probs: torch.Tensor  # (T, k) float32


@torch.no_grad()
def probe_scores(
    logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0, k: int = 5, chunk: int = 128
) -> ProbeScores:
    """Scores of teacher-forced logits. logits (T, V): row t the raw logits that predict targets[t]; targets (T,)
    long. Works a chunk of positions at a time in float32, so at most chunk x V probabilities exist at once."""
    out: dict[str, list[torch.Tensor]] = {f: [] for f in ("logprob", "entropy", "renyi2", "top_ids", "top_probs")}
    for start in range(0, logits.size(0), chunk):
        z = logits[start : start + chunk].float() / temperature  # (c, V)
        logp = torch.log_softmax(z, dim=-1)  # (c, V)
        p = logp.exp()
        out["logprob"].append(logp.gather(-1, targets[start : start + chunk].unsqueeze(-1)).squeeze(-1))
        out["entropy"].append(-(p * logp.clamp_min(torch.finfo(torch.float32).min)).sum(-1))  # 0·(-inf) = 0 for masked z
        out["renyi2"].append(-torch.logsumexp(2.0 * logp, dim=-1))
        top = torch.topk(logp, min(k, logp.size(-1)), dim=-1)
        out["top_ids"].append(top.indices)
        out["top_probs"].append(top.values.exp())
    if not out["logprob"]:
        empty = logits.new_zeros((0,), dtype=torch.float32)
        return ProbeScores(empty, empty, empty, empty.new_zeros((0, k)).long(), empty.new_zeros((0, k)))
    return ProbeScores(**{name: torch.cat(parts) for name, parts in out.items()})
