"""The row-id scheme: which completion (and prompt group) a row of any TRL batch is, once for a run.

A generation call gets `gen_key = global_step * GA + micro-step`, unique within a run and across a resume. Its rows
are numbered over ranks in the order TRL gathers rewards (`global_row = rank * B + row`), and a completion's id is
`gen_key * ROWS_PER_GENERATION + global_row`; its prompt group's id is the same with the group in place of the row.
The ids ride in TRL's batch dict (`forkwatch_row_id`, `forkwatch_group_id`), so they survive TRL's shuffle and split
into loss micro-batches, and a micro-batch row finds its generation row again from its id alone.
"""

from __future__ import annotations

import torch
from forkwatch.plugin.trl_batch import group_of

ROWS_PER_GENERATION = 2**20  # how many rows of one generation batch (all ranks together) the ids can tell apart


def generation_key(trainer) -> int:
    """The key of the generation call TRL is making now (one per optimizer micro-step)."""
    ga = trainer.args.gradient_accumulation_steps
    return trainer.state.global_step * ga + trainer._step % ga


def completion_and_group_ids(gen_key: int, rank: int, b: int, num_generations: int, device: torch.device
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(b,) completion ids and (b,) group ids of this rank's b rows of generation `gen_key`."""
    global_row = rank * b + torch.arange(b, device=device)
    base = gen_key * ROWS_PER_GENERATION
    return base + global_row, base + group_of(global_row, num_generations)


def rows_in_generation(row_ids: torch.Tensor, gen_key: int, offset: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each micro-batch row id: its row in this rank's generation batch `gen_key` (whose first row is global row
    `offset`, b rows), clamped into [0, b), and whether it is one of them (False: a row of another generation)."""
    local = row_ids - (gen_key * ROWS_PER_GENERATION + offset)
    ok = (local >= 0) & (local < b)
    return local.clamp(0, b - 1), ok
