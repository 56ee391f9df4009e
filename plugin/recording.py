"""Recording the sampled rows of one loss micro-batch: completions, tokens and fork alternatives, as references to
the micro-batch's tensors (copied to the host at the hand-off, plugin/record_copy.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from forkwatch.plugin import metrics
from forkwatch.plugin.captures import CompletionBatch, ForkBatch, GenBatch, StepAccumulator, TokenBatch
from forkwatch.plugin.metrics import no_grad
from forkwatch.plugin.trl_batch import predicting_states


@dataclass
class MicroBatchValues:
    """What the loss pass captured of one micro-batch, (B, T) over its completion tokens unless said otherwise."""

    inputs: dict[str, Any]  # TRL's micro-batch dict (ids, advantages, forkwatch_* evidence)
    logprob: torch.Tensor
    entropy: torch.Tensor
    renyi2: torch.Tensor
    group_js: torch.Tensor | None  # None: not computed for this batch
    weights: torch.Tensor | None  # the selector's gradient weights; None: every token weighs 1
    forks: torch.Tensor  # bool
    valid: torch.Tensor  # bool response-token mask
    hidden: torch.Tensor | None  # (B, P + T, H) the backbone's output, when it was hooked


@no_grad
def record(acc: StepAccumulator, mb: MicroBatchValues, *, gen: GenBatch, idx: torch.Tensor, gen_rows: torch.Tensor,
           reward_names: tuple[str, ...], tokens: bool, forks: bool, top_k: int, project: Any) -> None:
    """Rows `idx` of the micro-batch (rows `gen_rows` of the generation batch `gen`) into `acc`: completions, and
    with `tokens` their tokens, and with `forks` the alternatives at their forks, looked up in what generation
    recorded; `project` (the gathered head, or None) serves batches generation could not."""
    inputs = mb.inputs
    acc.completions.append(CompletionBatch(gen=gen, gen_rows=gen_rows, idx=idx, entropy=mb.entropy, mask=mb.valid,
                                           reward_names=reward_names))
    if not tokens:
        return
    b, t = mb.logprob.shape
    take = torch.zeros(b, dtype=torch.bool, device=mb.logprob.device).index_fill_(0, idx, True).unsqueeze(1) & mb.valid
    row_ids = inputs["forkwatch_row_id"]
    acc.tokens.append(TokenBatch(
        take=take, logprob=mb.logprob, entropy=mb.entropy, renyi2=mb.renyi2, group_js=mb.group_js,
        selected=mb.weights, is_fork=mb.forks, advantages=inputs["advantages"], mask=mb.valid, completion_id=row_ids,
        token_id=inputs["completion_ids"],
    ))
    if not forks:
        return
    row, pos = (mb.forks & take).nonzero().unbind(1)  # (F,) each, row-major
    if "forkwatch_alt_ids" in inputs:
        alt_ids, alt_probs = inputs["forkwatch_alt_ids"][row, pos], inputs["forkwatch_alt_probs"][row, pos]
        rank = inputs["forkwatch_alt_rank"][row, pos]
    elif project is not None and mb.hidden is not None:
        states = predicting_states(mb.hidden, inputs["prompt_ids"].size(1), t)  # (B, T, H)
        alt_ids, alt_probs, rank = metrics.topk_alternatives(
            states[row, pos], inputs["completion_ids"][row, pos], project, top_k)
    else:
        return
    acc.forks.append(ForkBatch(completion_id=row_ids[row], position=pos, sampled_rank=rank, alt_ids=alt_ids,
                               alt_probs=alt_probs))
