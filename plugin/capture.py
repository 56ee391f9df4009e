"""The per-rank capture: what one rank takes from TRL's generation and loss passes, step by step. plugin/trl_seams.py
calls its methods from TRL's seams; the callback drains `take_step(step)` once per optimizer step.

    on_generation       the generation batch: row ids into TRL's batch dict, per-completion facts kept on the device
                        (rewards, advantage, length, truncation), which completions are sampled for recording
    share_evidence      every rank: the per-position evidence agreed (gen_evidence.py), the reference JS scored
    begin_micro_batch   a loss micro-batch starts: the loss-pass values arrive through `on_loss_values` /
    ...                 `on_loss_logits` and, when needed, the backbone's states through `on_backbone_forward`
    select              (only with a selector) the weights TRL's get_high_entropy_mask returns (selection/seam.py)
    selection_loss      the selector's loss term, computed before and apart from recording
    end_micro_batch     the micro-batch's values into the step's accumulator; its sampled rows recorded
                        (step_data.py's carriers: references to the micro-batch's tensors, copied at the hand-off)

Every value is named as the store's schema names its column (step_data.py).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from forkwatch.plugin import token_math
from forkwatch.plugin.gen_evidence import Evidence, HeadProjector
from forkwatch.plugin.lens_budget import LensClock
from forkwatch.plugin.lenses import EffectiveRankBudget, ProbeRunner
from forkwatch.plugin.selection.seam import SelectionSeam
from forkwatch.plugin.step_data import CompletionBatch, ForkBatch, GenBatch, StepAccumulator, TokenBatch
from forkwatch.plugin.token_math import no_grad
from forkwatch.plugin.trl_seams import (
    ALT_IDS,
    ALT_PROBS,
    ALT_RANK,
    GROUP_ID,
    GROUP_JS,
    REFERENCE_JS,
    ROW_ID,
    completion_and_group_ids,
    eos_ids,
    generation_key,
    predicting_states,
    response_mask,
    rewards_of,
    rows_in_generation,
)
from forkwatch.store.ledger import Ledger


@dataclass
class _LossPass:
    """What the hooks saw of one loss micro-batch (lists: one entry per forward of it), named as the schema."""

    inputs: dict[str, Any]
    logprob: list[torch.Tensor] = field(default_factory=list)  # with gradient: the selection reads it
    entropy: list[torch.Tensor] = field(default_factory=list)
    renyi2: list[torch.Tensor] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)  # (B, P + T, H) the backbone's output, when hooked
    chosen: Any = None  # the selector's `Selection` of this micro-batch

    def completion(self, name: str, t: int) -> torch.Tensor | None:
        """(B, T) the completion positions of a captured value (None when not captured)."""
        xs = getattr(self, name)
        return _cat(xs)[:, -t:] if xs else None


class Capture:
    def __init__(self, trainer, config, *, selector=None, project: HeadProjector | None = None,
                 backbone: torch.nn.Module | None = None, lens_clock: LensClock | None = None,
                 probes: ProbeRunner | None = None) -> None:
        self.trainer = trainer
        self.config = config
        self.backbone = backbone
        self.project = project  # (N, H) -> (N, V) temperature-scaled logits through the gathered head
        acc = trainer.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.faults = Ledger()  # this rank's faults and dropped records: the writer reports the same ledger
        # forkwatch's own randomness: sampling of recorded completions (the selectors' generator is the seam's)
        self.sample_gen = torch.Generator().manual_seed(config.seed * 7919 + self.rank)
        self.group_js_on = config.group_js is True or (
            config.group_js == "auto" and selector is not None and selector.needs_group_js
        )
        self.forks_on = config.record_tokens and config.record_forks and config.fork_fraction > 0
        self.evidence = Evidence(trainer, config, rank=self.rank, world=self.world, faults=self.faults,
                                 project=project, backbone=backbone, group_js=self.group_js_on, forks=self.forks_on)
        self.selection_seam = SelectionSeam(trainer, config, selector, rank=self.rank, world=self.world,
                                            faults=self.faults)
        # when the periodic lenses run (plugin/lens_budget.py); the probes' runner takes the first step's rows
        self.lens_clock = lens_clock if lens_clock is not None else LensClock.from_config(config)
        self.effective_rank_budget = EffectiveRankBudget(config.effective_rank_completions, self.lens_clock)
        self.probes = probes
        self.steps: dict[int, StepAccumulator] = {}
        self.gen: GenBatch | None = None  # the current generation batch
        self.last_rewards: torch.Tensor | None = None  # `_calculate_rewards`' result, for `on_generation`
        self._eos: torch.Tensor | None = None
        # the initial policy, for ict against the reference: scored once per generation batch
        self.reference = None
        if selector is not None and selector.needs_reference_js:
            from forkwatch.plugin.selection.reference import ReferencePolicy

            self.reference = ReferencePolicy(trainer, project=project, backbone=backbone, chunk=config.group_js_chunk)
        self._mb: _LossPass | None = None

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
    def on_generation(self, out: dict[str, Any], inputs: list[dict[str, Any]] | None = None) -> None:
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
        out[ROW_ID] = cid
        out[GROUP_ID] = gid
        acc = self._acc()
        if self.evidence.scorer is not None:  # local only: `share_evidence` decides with the other ranks what to use
            acc.seconds += self.evidence.take(out, gid)
        if self._eos is None or self._eos.device != device:
            self._eos = torch.tensor(eos_ids(tr), device=device)
        # TRL cuts a completion after its first EOS; no EOS means it hit max_completion_length (truncated)
        is_eos = torch.isin(ids, self._eos)
        has_eos = is_eos.any(1)
        length = torch.where(has_eos, is_eos.int().argmax(1) + 1, t)
        rewards, total = rewards_of(tr, self.last_rewards, self.rank, b, device)
        self.gen = GenBatch(
            key=gen_key, offset=self.rank * b, completion_id=cid, group_id=gid, reward=total, rewards=rewards,
            advantage=out["advantages"].float(), length=length, truncated=~has_eos, sampled=self._sample(b, device),
            recorded=torch.zeros(b, dtype=torch.bool, device=device), prompt_ids=out["prompt_ids"],
            prompt_mask=out["prompt_mask"], completion_ids=ids,
            inputs=list(inputs) if inputs is not None and self.config.fork_value_every else None,
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
        """Every rank, after `on_generation`, outside the fault guards: the reference JS (its forwards may be
        sharded) and the generation evidence agreed over ranks (one collective)."""
        if self.reference is not None:
            out[REFERENCE_JS] = self.reference.score(out, response_mask(out))
        if self.evidence.scorer is not None and not self.evidence.share(out, recorded):
            self.gen = None

    # ------------------------------------------------------------------ loss pass
    @property
    def capturing(self) -> bool:
        """Whether a training loss micro-batch with forkwatch's row ids is being captured now."""
        return self._mb is not None

    def begin_micro_batch(self, inputs: dict[str, Any]) -> None:
        self._mb = None
        if self.trainer.model.training and torch.is_grad_enabled() and ROW_ID in inputs:
            self._mb = _LossPass(inputs)

    def on_loss_values(self, **values: torch.Tensor) -> None:
        """Per-token values of one forward of the loss pass, (B, L) each ending at the completion's last token:
        `logprob` (with gradient), `entropy`, `renyi2` (trl_seams.py reads them from TRL's fused head or its
        loss pass)."""
        if self._mb is not None:
            for name, value in values.items():
                getattr(self._mb, name).append(value)

    def on_loss_logits(self, logits: torch.Tensor) -> None:
        """TRL releases whose loss pass returns full logits (B, L, V) (trl_seams.py): Rényi-2 from them, a chunk of
        positions at a time, at the positions that predict the completion's tokens."""
        if self._mb is not None:
            t = self._mb.inputs["completion_ids"].size(1)
            self._mb.renyi2.append(token_math.renyi2_from_logits(logits[:, :-1][:, -t:], self.trainer.temperature))

    def on_backbone_forward(self, output: Any) -> None:
        if self._mb is not None and torch.is_grad_enabled():
            hs = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            self._mb.hidden.append(hs.detach())

    def wants_hidden(self) -> bool:
        """Whether the backbone's output is needed for this micro-batch (fallbacks or an effective-rank step)."""
        if self.backbone is None:
            return False
        return self.forks_on or self.group_js_on or self.effective_rank_budget.due(self.step_now())

    def select(self, entropies: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`get_high_entropy_mask` replacement: the selector's (B, T) weights for this micro-batch."""
        if not (self.trainer.model.training and torch.is_grad_enabled()):
            return mask.float()  # an evaluation loss: nothing is optimised, every token counts (as TRL's eval)
        mb, step = self._mb, self.step_now()
        if mb is None:  # raises, naming the cause
            return self.selection_seam.select({}, None, None, entropies, mask, {}, step)[0]
        t = mask.size(1)
        if self.selection_seam.selector.needs_group_js:
            self.evidence.score_at_loss_pass(mb.inputs, _cat(mb.hidden) if mb.hidden else None)
        weights, mb.chosen = self.selection_seam.select(
            mb.inputs, mb.completion("logprob", t), mb.completion("renyi2", t), entropies, mask,
            self._acc().select_metrics, step)
        return weights

    def selection_loss(self) -> torch.Tensor | None:
        """The selector's loss term for this micro-batch (None when it has none); before and apart from recording."""
        mb = self._mb
        return None if mb is None else self.selection_seam.loss(mb.chosen, mb.inputs)

    @no_grad
    def end_micro_batch(self) -> None:
        """The micro-batch's per-token values into the step's accumulator, and its sampled rows recorded (after
        `selection_loss`)."""
        mb, self._mb = self._mb, None
        if mb is None or not mb.logprob:
            return
        t0 = time.perf_counter()
        cfg, inputs = self.config, mb.inputs
        t = inputs["completion_ids"].size(1)
        mask = response_mask(inputs)
        valid = mask.bool()
        hidden = _cat(mb.hidden) if mb.hidden else None
        entropy = mb.completion("entropy", t).float()
        renyi2 = mb.completion("renyi2", t).float()
        if self.group_js_on:
            self.evidence.score_at_loss_pass(inputs, hidden)
        group_js = inputs.get(GROUP_JS)
        selected = mb.chosen.weights.detach().float() if mb.chosen is not None else None  # None: every token 1
        ent_valid = entropy[valid]
        is_fork = token_math.fork_mask(entropy, valid, cfg.fork_fraction, values=ent_valid)
        step = self.step_now()
        acc = self._acc()
        # tokens that get any gradient: every response token when nothing selects
        n_selected = valid.sum() if selected is None else ((selected != 0) & valid).sum()
        series = dict(entropy=ent_valid, renyi2=renyi2[valid], n_forks=is_fork.sum().view(1),
                      n_selected=n_selected.view(1))
        if group_js is not None:
            series["group_js"] = group_js[valid]
        gen = self.gen
        if gen is not None:
            local, ok = rows_in_generation(inputs[ROW_ID], gen.key, gen.offset, gen.completion_id.numel())
            rows = local[ok]
            series.update(rewards=gen.reward[rows], lengths=gen.length[rows], truncated=gen.truncated[rows])
            if hidden is not None and self.effective_rank_budget.due(step):
                with self.faults.guard("effective_rank"):
                    series["effective_rank"] = self.effective_rank_budget.measure(step, hidden, mask,
                                                                                  ok & gen.sampled[local])
        acc.add(**series)
        if gen is not None and (step - 1) % cfg.record_every_steps == 0:
            # forks without generation-time alternatives are projected through the head, gathered on every rank
            # alike (a collective) whether or not this rank has a fork to record
            fallback = self.forks_on and ALT_IDS not in inputs and hidden is not None
            with self.project.materialised() if fallback else nullcontext() as project:
                pick = (ok & gen.sampled[local] & ~gen.recorded[local]).nonzero().squeeze(1)  # micro-batch rows
                if pick.numel():
                    gen.recorded[local[pick]] = True
                    tokens = TokenBatch(
                        take=torch.zeros(valid.size(0), dtype=torch.bool, device=valid.device).index_fill_(
                            0, pick, True).unsqueeze(1) & valid,
                        logprob=mb.completion("logprob", t).float(), entropy=entropy, renyi2=renyi2,
                        group_js=group_js, selected=selected, is_fork=is_fork, advantages=inputs["advantages"],
                        mask=valid, completion_id=inputs[ROW_ID], token_id=inputs["completion_ids"])
                    if self.probes is not None and self.probes.collecting(step):  # the default probes' first scoring
                        alts = (inputs[ALT_IDS][pick], inputs[ALT_PROBS][pick]) if ALT_IDS in inputs else (None, None)
                        self.probes.offer(gen.key, local[pick], dict(
                            logprob=tokens.logprob[pick], entropy=entropy[pick], renyi2=renyi2[pick],
                            alt_ids=alts[0], alt_probs=alts[1]))
                    self._record(acc, tokens, inputs, gen=gen, gen_rows=local[pick], idx=pick, hidden=hidden,
                                 project=project)
        acc.seconds += time.perf_counter() - t0

    def _record(self, acc: StepAccumulator, tokens: TokenBatch, inputs: dict[str, Any], *, gen: GenBatch,
                gen_rows: torch.Tensor, idx: torch.Tensor, hidden: torch.Tensor | None, project: Any) -> None:
        """Rows `idx` of the micro-batch (rows `gen_rows` of the generation batch `gen`) into `acc`: completions,
        and with `record_tokens` their tokens, and with forks on the alternatives at their forks, looked up in what
        generation recorded; `project` (the gathered head, or None) serves batches generation could not."""
        cfg = self.config
        acc.completions.append(CompletionBatch(gen=gen, gen_rows=gen_rows, idx=idx, entropy=tokens.entropy,
                                               mask=tokens.mask, reward_names=tuple(self.trainer.reward_func_names)))
        if not cfg.record_tokens:
            return
        acc.tokens.append(tokens)
        if not self.forks_on:
            return
        row, pos = (tokens.is_fork & tokens.take).nonzero().unbind(1)  # (F,) each, row-major
        if ALT_IDS in inputs:
            alt_ids, alt_probs = inputs[ALT_IDS][row, pos], inputs[ALT_PROBS][row, pos]
            rank = inputs[ALT_RANK][row, pos]
        elif project is not None and hidden is not None:
            states = predicting_states(hidden, inputs["prompt_ids"].size(1), tokens.take.size(1))  # (B, T, H)
            alt_ids, alt_probs, rank = token_math.topk_alternatives(
                states[row, pos], inputs["completion_ids"][row, pos], project, cfg.fork_top_k)
        else:
            return
        acc.forks.append(ForkBatch(completion_id=tokens.completion_id[row], position=pos, sampled_rank=rank,
                                   alt_token_ids=alt_ids, alt_probs=alt_probs))


def _cat(xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0] if len(xs) == 1 else torch.cat(xs)
