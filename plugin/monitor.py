"""The runtime state behind the hooks: what one rank captures from TRL's generation and loss passes, by step.

hooks.py calls these methods from TRL's seams; the callback drains `take_step(step)` once per optimizer step. The
jobs are each in their own module and this class only routes between them:

    row_ids.py        which completion and prompt group each row is (ids carried in TRL's batch dict)
    gen_evidence.py   generation-time group_js and fork alternatives, agreed over ranks; the fallbacks
    select_seam.py    the selector's weights and loss term, and its metrics
    rank_budget.py    which steps and completions get an effective rank of hidden states
    recording.py      the sampled rows of a micro-batch as references, for the hand-off
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from forkwatch.plugin import metrics
from forkwatch.plugin.captures import GenBatch, StepAccumulator
from forkwatch.plugin.gen_evidence import GenEvidence
from forkwatch.plugin.metrics import no_grad
from forkwatch.plugin.rank_budget import RankBudget
from forkwatch.plugin.recording import MicroBatchValues, record
from forkwatch.plugin.reference_js import KEY as REFERENCE_KEY
from forkwatch.plugin.reference_js import ReferencePolicy
from forkwatch.plugin.row_ids import completion_and_group_ids, generation_key, rows_in_generation
from forkwatch.plugin.select_seam import SelectSeam
from forkwatch.plugin.trl_batch import eos_ids, response_mask
from forkwatch.store.ledger import Ledger


@dataclass
class MicroBatch:
    """What the forward hooks saw of one loss micro-batch (lists: one entry per forward of it)."""

    inputs: dict[str, Any]
    logps: list[torch.Tensor] = field(default_factory=list)
    entropies: list[torch.Tensor] = field(default_factory=list)
    log_sum_sq: list[torch.Tensor] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)
    selection: Any = None

    def completion(self, name: str, t: int) -> torch.Tensor | None:
        """(B, T) the completion positions of a captured fused-head output (None when not captured)."""
        xs = getattr(self, name)
        return _cat(xs)[:, -t:] if xs else None


class Monitor:
    def __init__(self, trainer, config, *, selector=None, project: Any = None, backbone=None) -> None:
        self.trainer = trainer
        self.config = config
        self.backbone = backbone
        acc = trainer.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.faults = Ledger()  # this rank's faults and dropped records: the writer reports the same ledger
        # forkwatch's own randomness: sampling of recorded completions (the selectors' generator is SelectSeam's)
        self.sample_gen = torch.Generator().manual_seed(config.seed * 7919 + self.rank)
        self.group_js_on = config.group_js is True or (
            config.group_js == "auto" and selector is not None and selector.needs_group_js
        )
        self.forks_on = config.record_tokens and config.record_forks and config.fork_fraction > 0
        self.evidence = GenEvidence(trainer, config, rank=self.rank, world=self.world, faults=self.faults,
                                    project=project, backbone=backbone, group_js=self.group_js_on, forks=self.forks_on)
        self.selection = SelectSeam(trainer, config, selector, rank=self.rank, world=self.world, faults=self.faults)
        self.ranks = RankBudget(config.effective_rank_every, config.effective_rank_completions)
        self.project = project  # (N, H) -> (N, V) temperature-scaled logits (head.py)
        self.steps: dict[int, StepAccumulator] = {}
        self.gen: GenBatch | None = None  # the current generation batch
        self.last_rewards: torch.Tensor | None = None
        self._eos: torch.Tensor | None = None
        # the initial policy, for ict against the reference (plugin/reference_js.py): scored once per generation batch
        self.reference = (ReferencePolicy(trainer, project=project, backbone=backbone, chunk=config.group_js_chunk)
                          if selector is not None and selector.needs_reference_js else None)
        self._mb: MicroBatch | None = None

    @property
    def selector(self):
        """The configured selector (None: nothing selects); select_seam.py owns it."""
        return self.selection.selector

    @selector.setter
    def selector(self, selector) -> None:
        self.selection.selector = selector

    # what run.json reports of the generation evidence (gen_evidence.py)
    @property
    def gen_scorer(self):
        return self.evidence.scorer

    @property
    def group_js_fallbacks(self):
        return self.evidence.group_js_fallbacks

    @property
    def fork_fallbacks(self):
        return self.evidence.fork_fallbacks

    @property
    def split_groups(self) -> int:
        return self.evidence.split_groups

    # ------------------------------------------------------------------ steps
    def step_now(self) -> int:
        """The step number the current optimizer step will be logged under (TRL logs global_step + 1)."""
        return self.trainer.state.global_step + 1

    def _acc(self) -> StepAccumulator:
        step = self.step_now()
        acc = self.steps.get(step)
        if acc is None:
            acc = self.steps[step] = StepAccumulator()
        return acc

    def take_step(self, step: int) -> StepAccumulator:
        """The accumulator of `step` (empty when nothing was captured); older leftovers are merged in."""
        acc = self.steps.pop(step, StepAccumulator())
        if self.steps:
            for old in sorted(s for s in self.steps if s < step):
                acc.merge(self.steps.pop(old))
        return acc

    # ------------------------------------------------------------------ generation batch
    @no_grad
    def on_generation(self, out: dict[str, Any]) -> None:
        """The generation batch's row ids (into TRL's batch dict) and per-completion facts, kept on the device as
        (b,) tensors: no per-row Python and no text decoding here (the sampled rows are decoded on the writer's
        thread when their step is handed over)."""
        t0 = time.perf_counter()
        tr = self.trainer
        ids = out["completion_ids"]
        b, t = ids.shape
        device = ids.device
        gen_key = generation_key(tr)
        cid, gid = completion_and_group_ids(gen_key, self.rank, b, tr.num_generations, device)
        out["forkwatch_row_id"] = cid
        out["forkwatch_group_id"] = gid
        acc = self._acc()
        if self.evidence.scorer is not None:  # local only: `share_evidence` decides with the other ranks what to use
            acc.seconds += self.evidence.take(out, gid)
        if self._eos is None or self._eos.device != device:
            self._eos = torch.tensor(eos_ids(tr), device=device)
        # TRL cuts a completion after its first EOS; no EOS means it hit max_completion_length (truncated)
        is_eos = torch.isin(ids, self._eos)
        has_eos = is_eos.any(1)
        length = torch.where(has_eos, is_eos.int().argmax(1) + 1, t)
        rewards = None
        if self.last_rewards is not None and self.last_rewards.size(0) >= (self.rank + 1) * b:
            rewards = self.last_rewards[self.rank * b : (self.rank + 1) * b].float().to(device)  # (b, F)
        if rewards is not None:
            total = (rewards * tr.reward_weights.float().to(device)).nansum(1)
        else:
            total = torch.full((b,), math.nan, device=device)
        self.gen = GenBatch(
            key=gen_key, offset=self.rank * b, completion_id=cid, group_id=gid, reward=total, rewards=rewards,
            advantage=out["advantages"].float(), length=length, truncated=~has_eos, sampled=self._sample(b, device),
            recorded=torch.zeros(b, dtype=torch.bool, device=device), prompt_ids=out["prompt_ids"],
            prompt_mask=out["prompt_mask"], completion_ids=ids,
        )
        acc.seconds += time.perf_counter() - t0

    def _sample(self, b: int, device: torch.device) -> torch.Tensor:
        """(b,) bool: this rank's share of `record_completions_per_step`, drawn with forkwatch's own generator."""
        n = self.config.record_completions_per_step
        args = self.trainer.args
        k = b if n is None else min(b, math.ceil(n * args.steps_per_generation
                                                 / (args.gradient_accumulation_steps * self.world)))
        if k >= b:  # every completion: no draw (and forkwatch's generator is not advanced)
            return torch.ones(b, dtype=torch.bool, device=device)
        sampled = torch.zeros(b, dtype=torch.bool)
        sampled[torch.randperm(b, generator=self.sample_gen)[:k]] = True
        return sampled.to(device)

    def share_evidence(self, out: dict[str, Any], recorded: bool) -> None:
        """Every rank, after `on_generation`, outside the fault guards (gen_evidence.py: one collective)."""
        if self.reference is not None:  # every rank, outside the fault guards: its forwards may be sharded
            out[REFERENCE_KEY] = self.reference.score(out, response_mask(out))
        if self.evidence.scorer is not None and not self.evidence.share(out, recorded):
            self.gen = None

    # ------------------------------------------------------------------ loss pass
    @property
    def capturing(self) -> bool:
        """Whether a training loss micro-batch with forkwatch's row ids is being captured now."""
        return self._mb is not None

    def begin_micro_batch(self, inputs: dict[str, Any]) -> None:
        self._mb = None
        if self.trainer.model.training and torch.is_grad_enabled() and "forkwatch_row_id" in inputs:
            self._mb = MicroBatch(inputs)

    def on_model_forward(self, kwargs: dict[str, Any], output: Any) -> None:
        if self._mb is not None and kwargs.get("fused_lm_head") and torch.is_grad_enabled():
            self._mb.logps.append(output.log_probs)
            self._mb.entropies.append(output.entropy)
            self._mb.log_sum_sq.append(output.log_sum_sq_probs)

    def on_backbone_forward(self, output: Any) -> None:
        if self._mb is not None and torch.is_grad_enabled():
            hs = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            self._mb.hidden.append(hs.detach())

    def wants_hidden(self) -> bool:
        """Whether the backbone's output is needed for this micro-batch (fallbacks or an effective-rank step)."""
        if self.backbone is None:
            return False
        return self.forks_on or self.group_js_on or self.ranks.due(self.step_now())

    def select(self, entropies: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`get_high_entropy_mask` replacement: the selector's (B, T) weights for this micro-batch (select_seam.py)."""
        if not (self.trainer.model.training and torch.is_grad_enabled()):
            return mask.float()  # an evaluation loss: nothing is optimised, every token counts (as TRL's eval)
        mb = self._mb
        if mb is None:
            return self.selection.select({}, None, None, entropies, mask, {})  # raises, naming the cause
        t = mask.size(1)
        if self.selector.needs_group_js:
            self.evidence.score_at_loss_pass(mb.inputs, _cat(mb.hidden) if mb.hidden else None)
        weights, mb.selection = self.selection.select(
            mb.inputs, mb.completion("logps", t), mb.completion("log_sum_sq", t), entropies, mask,
            self._acc().select_metrics)
        return weights

    def selection_loss(self) -> torch.Tensor | None:
        """The selector's loss term for this micro-batch (None when it has none); before and apart from recording."""
        mb = self._mb
        return None if mb is None else self.selection.loss(mb.selection, mb.inputs)

    @no_grad
    def end_micro_batch(self) -> None:
        """The micro-batch's per-token values into the step's accumulator, and its sampled rows recorded (after
        `selection_loss`)."""
        mb, self._mb = self._mb, None
        if mb is None or not mb.logps:
            return
        t0 = time.perf_counter()
        cfg, inputs = self.config, mb.inputs
        t = inputs["completion_ids"].size(1)
        mask = response_mask(inputs)
        valid = mask.bool()
        hidden = _cat(mb.hidden) if mb.hidden else None
        lp = mb.completion("logps", t).float()  # no_grad: what is computed from these carries no graph
        ent = mb.completion("entropies", t).float()
        renyi2 = -mb.completion("log_sum_sq", t).float()
        if self.group_js_on:
            self.evidence.score_at_loss_pass(inputs, hidden)
        gjs = inputs.get("forkwatch_group_js")
        sel = mb.selection
        weights = sel.weights.detach().float() if sel is not None else None  # None: every token weighs 1
        ent_valid = ent[valid]
        forks = metrics.fork_mask(ent, valid, cfg.fork_fraction, values=ent_valid)
        step = self.step_now()
        acc = self._acc()
        # tokens that get any gradient: every response token when nothing selects
        n_selected = valid.sum() if weights is None else ((weights != 0) & valid).sum()
        series = dict(entropy=ent_valid, renyi2=renyi2[valid], n_forks=forks.sum().view(1),
                      n_selected=n_selected.view(1))
        if gjs is not None:
            series["group_js"] = gjs[valid]
        gen = self.gen
        if gen is not None:
            local, ok = rows_in_generation(inputs["forkwatch_row_id"], gen.key, gen.offset, gen.completion_id.numel())
            rows = local[ok]
            series.update(rewards=gen.reward[rows], lengths=gen.length[rows], truncated=gen.truncated[rows])
            if hidden is not None and self.ranks.due(step):
                with self.faults.guard("effective_rank"):
                    series["effective_rank"] = self.ranks.measure(step, hidden, mask, ok & gen.sampled[local])
        acc.add(**series)
        if gen is not None and (step - 1) % cfg.record_every_steps == 0:
            # forks without generation-time alternatives are projected through the head, gathered on every rank
            # alike (a collective) whether or not this rank has a fork to record
            fallback = self.forks_on and "forkwatch_alt_ids" not in inputs and hidden is not None
            with self.project.materialised() if fallback else nullcontext() as project:
                pick = (ok & gen.sampled[local] & ~gen.recorded[local]).nonzero().squeeze(1)  # micro-batch rows
                if pick.numel():
                    gen.recorded[local[pick]] = True
                    values = MicroBatchValues(inputs=inputs, logprob=lp, entropy=ent, renyi2=renyi2, group_js=gjs,
                                              weights=weights, forks=forks, valid=valid, hidden=hidden)
                    record(acc, values, gen=gen, idx=pick, gen_rows=local[pick],
                           reward_names=tuple(self.trainer.reward_func_names), tokens=cfg.record_tokens,
                           forks=self.forks_on, top_k=cfg.fork_top_k, project=project)
        acc.seconds += time.perf_counter() - t0


def _cat(xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0] if len(xs) == 1 else torch.cat(xs)
