"""The demo's ground truth as the `oracle` selector's label source (plugin/selection/methods.py `oracle`):

    attach(trainer, select="oracle", select_options={"labels": task_labels(tokenizer)})

`task_labels` returns a function of TRL's token ids that gives each completion token a priority from its role in the
task (`task.roles`): the mistake first, then decisions, then confident-consequential tokens; every other token 0
(never kept). The tokenizer has one token per character, so position i of the completion is character i and EOS sits
at position len(completion). Pure: ids in, priorities out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from forkwatch.demo import task
from transformers import PreTrainedTokenizerFast

PRIORITY = {"mistake": 3.0, "decision": 2.0, "confident_consequential": 1.0}


def completion_priorities(prompt: str, completion: str, n_positions: int) -> list[float]:
    """PRIORITY of each position 0..n_positions-1 of one completion (0 for every other role)."""
    return [PRIORITY.get(r, 0.0) for r in task.roles(prompt, completion, n_positions)]


def task_labels(tok: PreTrainedTokenizerFast) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The oracle's `labels` for the demo task, decoding TRL's ids with `tok`."""
    eos, pad = tok.eos_token_id, tok.pad_token_id

    def labels(prompt_ids: torch.Tensor, completion_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(completion_ids.shape, dtype=torch.float64)
        for i, (p_row, c_row, m_row) in enumerate(zip(prompt_ids.tolist(), completion_ids.tolist(),
                                                      mask.tolist(), strict=True)):
            prompt = tok.decode([x for x in p_row if x != pad], skip_special_tokens=True)
            n = int(sum(v > 0 for v in m_row))  # response tokens, EOS included
            chars = [x for x in c_row[:n] if x != eos]
            completion = tok.decode(chars, skip_special_tokens=True)
            out[i, :n] = torch.tensor(completion_priorities(prompt, completion, n), dtype=torch.float64)
        return out

    return labels
