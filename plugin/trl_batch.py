"""TRL 1.16's batch layout, each rule written once: which tokens are the response, which ids end a completion, which
prompt group a row belongs to, which states predicted each completion token. The monitor (loss pass, records) and the generation-time scorer both read them, so the
two can never disagree about a row."""

from __future__ import annotations

from typing import Any

import torch


def response_mask(batch: dict[str, Any]) -> torch.Tensor:
    """(B, T) the tokens TRL's loss sees: completion_mask, times tool_mask in tool-calling runs (tool output tokens
    are part of the completion but not of the policy's actions)."""
    mask = batch["completion_mask"]
    return mask if batch.get("tool_mask") is None else mask * batch["tool_mask"]


def eos_ids(trainer) -> list[int]:
    """The ids that end a completion for TRL (`eos_token_ids` when set, else the tokenizer's EOS), sorted."""
    ids = getattr(trainer, "eos_token_ids", None) or [trainer.processing_class.eos_token_id]
    return sorted(int(i) for i in ids)


def group_of(global_row: torch.Tensor, num_generations: int) -> torch.Tensor:
    """(B,) prompt group of each row, by its row in the generation batch gathered over ranks (rank * B + row): TRL's
    RepeatSampler puts the G rollouts of a prompt on consecutive global rows."""
    return global_row // num_generations


def predicting_states(hidden: torch.Tensor, prompt_len: int, t: int) -> torch.Tensor:
    """(B, T, H) the states that predicted each completion token, from a forward over prompt + completion (B, P + T,
    H): position P - 1 + i predicts completion token i."""
    return hidden[:, prompt_len - 1 : prompt_len - 1 + t]
