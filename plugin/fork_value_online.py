"""Fork value during training (`fork_value_every=N`): at the end of every N-th optimizer step, a stratified sample of
the positions the step recorded is measured (plugin/fork_value.py `measure`) with the trainer's own model, its own
sampling settings and its own reward functions, and the rows go to the `fork_values` table through the run's writer.

What is measured, and with what:

- **Positions**: each rank measures its own recorded completions of the step (`record_tokens` must be on), a
  stratified sample of ⌈`fork_value_positions` / ranks⌉ of their positions (`strata_of`: fork or not, kept or
  dropped by the selector; with several ranks the rank is part of the stratum, so each rank's inclusion
  probabilities are its own and the union is one stratified sample of the step).
- **Policy**: the model as the step leaves it, after the step's optimizer update (one update past the weights that
  sampled the completions: the positions are contexts, π and Q are the policy's now), reached as TRL reaches it to
  generate (`trl.models.unwrap_model_for_generation`: DDP unwrapped, ZeRO-3's weights gathered when TRL gathers
  them for generation, `ds3_gather_for_generation`). Under ZeRO-3 and FSDP2 every forward is a collective: every
  rank measures at the same steps and keeps its model calls in step with the others' (`measure(..., lockstep=)`);
  under FSDP2 the parameters a forward left gathered are freed afterwards, as after the probes.
- **Sampling and reward**: `Sampling.from_trainer` (temperature, top-p, top-k, min-p, repetition penalty, length
  limit, stop tokens) and `RewardFunctions.from_trainer` (the reward functions, weights, the prompt's extra dataset
  columns as TRL passes them); both read at attach, where what cannot be reproduced is refused (`check`).

Training is not changed: the measurement runs under `no_grad` with the model's mode restored, on its own seeded
generators with every global RNG state put back (`measure`), between the optimizer step and the next generation; its
reward calls get no-op `log_metric` / `log_extra`. A failure while measuring is counted (ledger place "fork_value")
and shown with the run's other faults, never raised into training.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from forkwatch.plugin.fork_value import ForkValueSettings, Position, RewardFunctions, Sampling, measure
from forkwatch.plugin.fork_value_stats import strata_of, stratified_sample
from forkwatch.plugin.step_data import StepAccumulator
from forkwatch.plugin.trl_seams import custom_rollouts, policy_for_generation, weights_sharded

logger = logging.getLogger(__name__)

SOURCE = "training"  # the `source` column of rows measured during training (a checkpoint path after it)


@dataclass(frozen=True)
class Recorded:
    """One completion this rank recorded at the step, as the measurement needs it."""

    completion_id: int
    prompt_ids: tuple[int, ...]  # unpadded, as generation saw them
    completion_ids: tuple[int, ...]  # through the first stop token
    prompt: Any  # as TRL gives it to the reward functions
    columns: dict[str, Any]  # the prompt's extra dataset columns
    positions: np.ndarray  # (n,) recorded positions
    is_fork: np.ndarray  # (n,) bool
    selected: np.ndarray | None  # (n,) the selector's gradient weight; None: nothing selects
    alternatives: dict[int, tuple[int, ...]]  # position -> the top-k ids stored at a fork


def check(trainer: Any, config: Any) -> tuple[Sampling, RewardFunctions]:
    """At attach: what the measurement needs from the trainer, or a ValueError naming what cannot be reproduced and
    the fix."""
    off = "or leave fork_value_every=0"
    if not config.record_tokens:
        raise ValueError(f"fork_value_every={config.fork_value_every} measures the recorded positions: set "
                         f"record_tokens=True, {off}")
    if (custom := custom_rollouts(trainer)) is not None:
        raise ValueError(f"fork_value_every: completions made by {custom} cannot be rolled out again with `generate` "
                         f"(the rollouts must continue them as training made them); {off}")
    try:
        sampling = Sampling.from_trainer(trainer)  # refuses vLLM and generation_kwargs it cannot reproduce
    except ValueError as e:
        raise ValueError(f"fork_value_every: {e}") from None
    rewards = RewardFunctions.from_trainer(trainer)
    if weights_sharded(trainer) and any(isinstance(f, torch.nn.Module) for f in rewards.funcs):
        raise ValueError("fork_value_every: a reward model under ZeRO-3 / FSDP is a collective every rank would have "
                         "to call in step; use reward functions, measure after training with `forkwatch "
                         f"forkvalue`, {off}")
    return sampling, rewards


def lockstep_of(device: Any):
    """n -> the largest n over the ranks (one all-reduce)."""
    import torch.distributed as dist

    def most(n: int) -> int:
        t = torch.tensor([n], device=device, dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    return most


def recorded_completions(acc: StepAccumulator) -> list[Recorded]:
    """This rank's recorded completions of one step, from the step's carriers (plugin/step_data.py): each recorded
    micro-batch appended its `CompletionBatch` and its `TokenBatch` together (plugin/capture.py `_record`), and its
    forks' alternatives as a `ForkBatch`."""
    alternatives: dict[tuple[int, int], tuple[int, ...]] = {}
    for f in acc.forks:
        for cid, pos, alts in zip(f.completion_id.tolist(), f.position.tolist(), f.alt_token_ids.tolist(),
                                  strict=True):
            alternatives[cid, pos] = tuple(alts)
    out = []
    for c, t in zip(acc.completions, acc.tokens, strict=False):  # tokens: only with record_tokens (checked at attach)
        gen = c.gen
        if gen.inputs is None:
            continue
        for g, i in zip(c.gen_rows.tolist(), c.idx.tolist(), strict=True):
            cid = int(t.completion_id[i])
            n = int(gen.length[g])
            positions = t.take[i, :n].nonzero().squeeze(1)
            row = gen.inputs[g]
            out.append(Recorded(
                completion_id=cid, prompt_ids=tuple(gen.prompt_ids[g][gen.prompt_mask[g].bool()].tolist()),
                completion_ids=tuple(gen.completion_ids[g, :n].tolist()), prompt=row["prompt"],
                columns={k: v for k, v in row.items() if k not in ("prompt", "completion", "completion_ids")},
                positions=positions.cpu().numpy(), is_fork=t.is_fork[i, positions].cpu().numpy(),
                selected=None if t.selected is None else t.selected[i, positions].float().cpu().numpy(),
                alternatives={p: a for (c_, p), a in alternatives.items() if c_ == cid}))
    return out


def sample_positions(recorded: list[Recorded], budget: int, *, rng: np.random.Generator, step: int,
                     rank: int | None) -> list[Position]:
    """A stratified sample of `budget` of the recorded positions (`rank` is added to each stratum when given)."""
    owner = np.concatenate([np.full(r.positions.size, i) for i, r in enumerate(recorded)]) if recorded else \
        np.zeros(0, dtype=np.int64)
    if owner.size == 0:
        return []
    where = np.concatenate([r.positions for r in recorded])
    is_fork = np.concatenate([r.is_fork for r in recorded])
    selected = None if all(r.selected is None for r in recorded) else np.concatenate(
        [np.ones(r.positions.size) if r.selected is None else r.selected for r in recorded])
    strata = strata_of(is_fork, selected)
    if rank is not None:
        strata = np.char.add(f"r{rank}/", strata.astype(str))
    idx, inclusion = stratified_sample(strata, budget, rng)
    out = []
    for i, p in zip(idx.tolist(), inclusion.tolist(), strict=True):
        r, pos = recorded[owner[i]], int(where[i])
        out.append(Position(prompt_ids=r.prompt_ids, completion_ids=r.completion_ids, position=pos, prompt=r.prompt,
                            columns=r.columns, alternatives=r.alternatives.get(pos), step=step,
                            completion_id=r.completion_id, stratum=str(strata[i]), inclusion_prob=float(p)))
    return out


class OnlineForkValue:
    """The measurement of due steps on one rank; the callback calls `measure_step` at every due step's end."""

    def __init__(self, trainer: Any, config: Any, *, rank: int, world: int) -> None:
        self.trainer, self.rank, self.world = trainer, rank, world
        self.every = config.fork_value_every
        self.budget = math.ceil(config.fork_value_positions / world)
        self.seed = config.seed
        self.settings = ForkValueSettings(branches=config.fork_value_branches, rollouts=config.fork_value_rollouts,
                                          min_value=config.fork_value_min_value)
        self.sampling, self.rewards = check(trainer, config)
        self.sharded = weights_sharded(trainer)
        proc = trainer.processing_class
        self.tokenizer = getattr(proc, "tokenizer", proc)
        self.measured = 0  # positions measured so far by this rank
        self.consequential = 0

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def measure_step(self, step: int, recorded: list[Recorded]) -> dict[str, Any] | None:
        """Every rank at a due step (under sharded weights every rank must call it, with or without records):
        measure a sample of `recorded` -> the `fork_values` columns to write (None: nothing measured here)."""
        tr = self.trainer
        rng = np.random.default_rng([self.seed, step, self.rank])
        positions = sample_positions(recorded, self.budget, rng=rng, step=step,
                                     rank=self.rank if self.world > 1 else None)
        seed = int(np.random.SeedSequence([self.seed, step, self.rank]).generate_state(1)[0])
        lockstep = lockstep_of(tr.accelerator.device) if self.sharded else None
        with policy_for_generation(tr) as model:
            try:
                m = measure(model, self.tokenizer, positions, sampling=self.sampling, rewards=self.rewards,
                            settings=self.settings, seed=seed, state=tr.state, lockstep=lockstep)
            finally:
                if self.sharded:
                    _reshard(model)
        n = len(m.columns["step"])
        if not n:
            return None
        self.measured += len(m.estimates)
        self.consequential += sum(e.consequential for e in m.estimates)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        return {**m.columns, "source": np.full(n, SOURCE, dtype=object),
                "measurement": np.full(n, f"{stamp}Z-train{step}", dtype=object)}


def _reshard(model: torch.nn.Module) -> None:
    """Under FSDP2, free the parameters the measurement's forwards left gathered (the root unit keeps its own until a
    backward that does not come); a no-op elsewhere."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
