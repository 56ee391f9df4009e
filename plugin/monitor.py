"""The runtime state behind the hooks: what one rank captured from TRL's generation and loss passes.

hooks.py calls these methods from TRL's seams; the callback drains `take_step(step)` once per optimizer step.
Completion ids: `gen_key * 2**20 + global_row`, gen_key = global_step * GA + micro-step (one per generation call, so
unique within a run and across a resume); global_row = rank * B + row, the order TRL gathers rewards in.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from forkwatch.plugin import metrics
from forkwatch.plugin.batch_rules import eos_ids, group_of, response_mask
from forkwatch.plugin.captures import CompletionBatch, ForkBatch, GenBatch, StepAccumulator, TokenBatch
from forkwatch.plugin.gen_scores import GenScorer, extra_pass
from forkwatch.plugin.hidden_rank import completion_ranks
from forkwatch.plugin.reference_js import KEY as REFERENCE_KEY
from forkwatch.plugin.reference_js import ReferencePolicy, reference_js_of
from forkwatch.store.ledger import Ledger

logger = logging.getLogger(__name__)
ROW_BITS = 2**20  # rows per generation batch (all ranks) that completion ids can tell apart


@dataclass
class MicroBatch:
    inputs: dict[str, Any]
    logps: list[torch.Tensor] = field(default_factory=list)
    entropies: list[torch.Tensor] = field(default_factory=list)
    log_sum_sq: list[torch.Tensor] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)
    selection: Any = None


class Monitor:
    def __init__(self, trainer, config, *, selector=None, project: Callable | None = None, backbone=None) -> None:
        self.trainer = trainer
        self.config = config
        self.selector = selector
        self.project = project  # (N, H) -> (N, V) temperature-scaled logits
        self.backbone = backbone
        acc = trainer.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        # forkwatch's own randomness: sampling of recorded completions, and the selectors' generator
        self.sample_gen = torch.Generator().manual_seed(config.seed * 7919 + self.rank)
        self.select_gen = torch.Generator(device=acc.device).manual_seed(config.seed + self.rank)
        self.group_js_on = config.group_js is True or (
            config.group_js == "auto" and selector is not None and selector.needs_group_js
        )
        self.faults = Ledger()  # this rank's faults and dropped records: the writer reports the same ledger
        self.steps: dict[int, StepAccumulator] = {}
        self.gen: GenBatch | None = None  # the current generation batch
        self._eos: torch.Tensor | None = None
        self.last_rewards: torch.Tensor | None = None
        self.split_groups = 0  # groups whose rollouts were not all on this rank (group_js over local siblings)
        # group_js is scored during generation (gen_scores.py); the extra pass serves what that cannot, by reason
        self.group_js_fallbacks: Counter[str] = Counter()
        # fork alternatives come from generation's logits too; where they cannot, from the gathered head
        self.forks_on = config.record_tokens and config.record_forks and config.fork_fraction > 0
        self.fork_fallbacks: Counter[str] = Counter()
        self.gen_scorer: GenScorer | None = None
        if self.group_js_on or self.forks_on:
            self.gen_scorer = GenScorer(temperature=trainer.temperature, num_generations=trainer.num_generations,
                                        rank=self.rank, chunk=config.group_js_chunk, group_js=self.group_js_on,
                                        top_k=config.fork_top_k if self.forks_on else None)
            self.gen_scorer.eos = torch.tensor(eos_ids(trainer))
        # testbed hook (2/3): the initial policy, for ict against the reference (plugin/reference_js.py)
        self.reference = (ReferencePolicy(trainer, project=project, backbone=backbone, chunk=config.group_js_chunk)
                          if selector is not None and selector.needs_reference_js else None)
        self._mb: MicroBatch | None = None
        self._local_evidence: tuple[Any, str | None] | None = None  # from on_generation, for share_evidence
        self._rank_left: dict[int, int] = {}  # step -> completions whose effective rank this rank may still measure

    # ------------------------------------------------------------------ helpers
    def step_now(self) -> int:
        """The step number the current optimizer step will be logged under (TRL logs global_step + 1)."""
        return self.trainer.state.global_step + 1

    def _acc(self) -> StepAccumulator:
        step = self.step_now()
        acc = self.steps.get(step)
        if acc is None:
            acc = self.steps[step] = StepAccumulator()
        return acc

    def _recording(self, step: int) -> bool:
        return (step - 1) % self.config.record_every_steps == 0

    def take_step(self, step: int) -> StepAccumulator:
        """The accumulator of `step` (empty when nothing was captured); older leftovers are merged in."""
        acc = self.steps.pop(step, StepAccumulator())
        for old in sorted(s for s in self.steps if s < step):
            acc.merge(self.steps.pop(old))
        return acc

    # ------------------------------------------------------------------ generation batch
    @torch.no_grad()
    def on_generation(self, out: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        tr = self.trainer
        ids = out["completion_ids"]
        mask = response_mask(out)
        b, t = ids.shape
        device = ids.device
        ga = tr.args.gradient_accumulation_steps
        gen_key = tr.state.global_step * ga + tr._step % ga
        global_row = self.rank * b + torch.arange(b, device=device)
        cid = gen_key * ROW_BITS + global_row
        gid = gen_key * ROW_BITS + group_of(global_row, tr.num_generations)
        out["forkwatch_row_id"] = cid
        out["forkwatch_group_id"] = gid
        if self.gen_scorer is not None:  # local only: `share_evidence` decides with the other ranks what to use
            self._local_evidence = self._take_evidence(out, mask, gid)

        # Per-completion facts stay on the device as (b,) tensors: no per-row Python and no text decoding here
        # (the sampled rows are decoded on the writer's thread when their step is handed over).
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
        n = self.config.record_completions_per_step
        k = b if n is None else min(b, math.ceil(n * tr.args.steps_per_generation / (ga * self.world)))
        if k < b:
            sampled = torch.zeros(b, dtype=torch.bool)
            sampled[torch.randperm(b, generator=self.sample_gen)[:k]] = True
        else:  # every completion: no draw (and forkwatch's generator is not advanced)
            sampled = torch.ones(b, dtype=torch.bool)
        self.gen = GenBatch(
            key=gen_key, offset=self.rank * b, completion_id=cid, group_id=gid, reward=total, rewards=rewards,
            advantage=out["advantages"].float(), length=length, truncated=~has_eos, sampled=sampled.to(device),
            recorded=torch.zeros(b, dtype=torch.bool, device=device), prompt_ids=out["prompt_ids"],
            prompt_mask=out["prompt_mask"], completion_ids=ids,
        )
        self._acc().seconds += time.perf_counter() - t0

    def _take_evidence(self, out: dict[str, Any], mask: torch.Tensor, gid: torch.Tensor) -> tuple[Any, str | None]:
        """This rank's generation-time evidence (or None and the reason it cannot be used). No collective here."""
        tr = self.trainer
        if self.group_js_on:
            groups = torch.unique(gid, return_inverse=True)[1]
            self.split_groups += int((torch.bincount(groups) < tr.num_generations).sum())
        self._acc().seconds += self.gen_scorer.seconds
        self.gen_scorer.seconds = 0.0
        return self.gen_scorer.take(out["completion_ids"], mask)

    # agreed states of a generation batch over the ranks (the minimum wins)
    _UNRECORDED, _FALLBACK, _EVIDENCE = 0, 1, 2

    def share_evidence(self, out: dict[str, Any], recorded: bool) -> None:
        """Called on every rank after `on_generation`, outside the fault guards (`recorded`: it ran without a
        fault), because it holds the generation batch's one collective. The ranks agree on one path: generation's own
        evidence, the fallbacks (which gather the sharded head: collectives every rank must enter), or, when
        `on_generation` failed on any rank, nothing recorded from this batch on any rank, so that no rank waits in a
        collective another skipped. What is optimised never depends on this (a selector that needs the evidence
        stops training with an error instead)."""
        if self.reference is not None:  # testbed hook (3/3): every rank, outside the fault guards (sharded forwards)
            out[REFERENCE_KEY] = self.reference.score(out, response_mask(out))
        if self.gen_scorer is None:
            return
        local, self._local_evidence = (self._local_evidence if recorded else (None, "error")), None
        evidence, reason = local if local is not None else (None, "error")
        state = self._EVIDENCE if evidence is not None else self._FALLBACK if recorded else self._UNRECORDED
        agreed = state
        if self.world > 1:
            device = out["completion_ids"].device
            t = torch.tensor([state], dtype=torch.int32, device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            agreed = int(t.item())
        if agreed == self._UNRECORDED:
            for key in [k for k in out if k.startswith("forkwatch_")]:
                del out[key]
            self.gen = None
            if recorded:  # the fault itself is counted on the rank that had it
                self.faults.drop("completions", out["completion_ids"].size(0), "other_rank",
                                 "forkwatch: another rank could not record a generation batch; no rank records it")
            return
        if agreed == self._FALLBACK and evidence is not None:
            evidence, reason = None, "other_rank"
        with self.faults.guard("generation_evidence"):
            self._use_evidence(out, evidence, reason)

    def _use_evidence(self, out: dict[str, Any], evidence: Any, reason: str | None) -> None:
        """Per-position evidence as extra per-row tensors of the generation batch (they survive TRL's shuffle and
        split into the loss micro-batches): generation's own scores, else the fallbacks (the same path on every
        rank, as `share_evidence` agreed)."""
        tr = self.trainer
        mask = response_mask(out)
        if evidence is not None:
            if self.group_js_on:
                out["forkwatch_group_js"] = evidence.group_js
            if self.forks_on:
                out["forkwatch_alt_ids"], out["forkwatch_alt_probs"] = evidence.alt_ids, evidence.alt_probs
                out["forkwatch_alt_rank"] = evidence.rank
            return
        if self.forks_on:  # the loss pass projects its forks through the gathered head
            self.fork_fallbacks[reason] += 1
        if not self.group_js_on:
            return
        self.group_js_fallbacks[reason] += 1
        at_loss = self._group_js_at_loss_pass()
        if self.group_js_fallbacks[reason] == 1:
            logger.info("forkwatch: group_js from %s (generation-time scores unusable: %s)",
                        "the loss pass's hidden states" if at_loss else "an extra backbone pass", reason)
        if at_loss:  # scored in the loss pass (`_loss_pass_group_js`): no second pass through the backbone
            out["forkwatch_group_js_pending"] = torch.ones(mask.size(0), dtype=torch.bool, device=mask.device)
            return
        groups = torch.unique(out["forkwatch_group_id"], return_inverse=True)[1]
        hidden = extra_pass(tr, self.project.model, self.backbone, out)
        with self.project.materialised() as project:
            out["forkwatch_group_js"] = metrics.group_js(hidden, mask, groups, project, chunk=self.config.group_js_chunk)

    def _group_js_at_loss_pass(self) -> bool:
        """Whether the loss pass can score group_js from its own hidden states: when its one micro-batch is this
        rank's whole generation batch (every sibling present) under the weights that generated it."""
        tr = self.trainer
        return (self.backbone is not None and tr.args.steps_per_generation == 1 and tr.num_iterations == 1
                and tr.args.gradient_accumulation_steps == 1)

    def _loss_pass_group_js(self, mb: MicroBatch) -> None:
        """group_js of a generation batch the fallback left to the loss pass (`forkwatch_group_js_pending`), from the
        states the backbone computed for the loss, through the gathered head (a collective: every rank calls this
        for every such micro-batch)."""
        inputs = mb.inputs
        if "forkwatch_group_js_pending" not in inputs or inputs.get("forkwatch_group_js") is not None or not mb.hidden:
            return
        mask = response_mask(inputs)
        p, t = inputs["prompt_ids"].size(1), mask.size(1)
        hidden = _cat(mb.hidden)[:, p - 1 : p - 1 + t]  # (B, T, H): the states that predicted each token
        groups = torch.unique(inputs["forkwatch_group_id"], return_inverse=True)[1]
        with self.project.materialised() as project:
            inputs["forkwatch_group_js"] = metrics.group_js(hidden, mask, groups, project,
                                                            chunk=self.config.group_js_chunk)

    # ------------------------------------------------------------------ loss pass
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

    def select(self, entropies: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`get_high_entropy_mask` replacement: the selector's (B, T) weights for this micro-batch.

        Also records the selector's metrics and the selection diagnostics (`diagnostics.selection_diagnostics`)
        with one device-to-host copy; a fault there is counted and never changes the weights returned.
        """
        from forkwatch.plugin.registry import SelectionInput

        tr, mb = self.trainer, self._mb
        name = self.config.select
        if not (tr.model.training and torch.is_grad_enabled()):
            return mask.float()  # an evaluation loss: nothing is optimised, every token counts (as TRL's eval)
        if mb is None or not mb.logps:
            raise RuntimeError(
                f"forkwatch: select={name!r} cannot compute its selection for this micro-batch: the loss pass was not "
                f"captured (faults so far: {dict(self.faults.counts)}; the first of each is logged above). Training "
                "stops rather than train this step without the selection; fix the logged error, or set select=None.")
        inputs = mb.inputs
        if self.selector.needs_group_js:
            self._loss_pass_group_js(mb)
        if self.selector.needs_group_js and inputs.get("forkwatch_group_js") is None:
            cause = (f"the generation hook failed (faults: {dict(self.faults.counts)}; logged above)"
                     if self.faults.counts else "it was not computed for this generation batch")
            raise RuntimeError(
                f"forkwatch: select={name!r} scores tokens by group_js, which is missing for this micro-batch: {cause}. "
                "Training stops rather than train this step densely; fix the logged error, or choose a selector that "
                "does not need group_js (e.g. select='high_entropy').")
        t = mask.size(1)
        logprob = _cat(mb.logps)[:, -t:]
        old = inputs.get("old_per_token_logps")
        acc = tr.accelerator
        inp = SelectionInput(
            mask=mask.float(),
            entropy=entropies.detach(),
            logprob=logprob,
            old_logprob=logprob.detach() if old is None else old,
            advantages=inputs["advantages"],
            group_ids=inputs["forkwatch_group_id"],
            group_js=inputs.get("forkwatch_group_js"),
            step=tr.state.global_step,
            generator=self.select_gen,
            epsilon_low=tr.epsilon_low,
            epsilon_high=tr.epsilon_high,
            loss_type=tr.loss_type,
            gather=None if self.world == 1 else (lambda x: _gather_1d(acc, x)),
            # testbed hook (1/3): the reference JS and TRL's ids for selectors that read them (ict against the
            # reference, the demo's oracle)
            reference_js=reference_js_of(self.selector, inputs),
            prompt_ids=inputs.get("prompt_ids"), completion_ids=inputs.get("completion_ids"),
        )
        sel = mb.selection = self.selector(inp)
        weights = sel.weights.detach()
        with self.faults.guard("select_metrics"):
            self._record_selection(sel.metrics, weights, inp, _cat(mb.log_sum_sq)[:, -t:])
        return weights

    @torch.no_grad()
    def _record_selection(self, metrics: dict[str, Any], weights: torch.Tensor, inp: Any, log_sum_sq: torch.Tensor
                          ) -> None:
        """The selector's metrics and the `DIAGNOSTICS` of this micro-batch into the step's select_metrics."""
        from forkwatch.plugin.diagnostics import DIAGNOSTICS, selection_diagnostics

        diag = selection_diagnostics(weights, inp.mask, inp.logprob.detach(), inp.entropy, log_sum_sq.detach(),
                                     inp.advantages)  # (4,)
        values = {k: v for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
        lazy = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
        stacked = torch.cat([*(metrics[k].detach().reshape(1).to(diag) for k in lazy), diag])
        values.update(zip([*lazy, *DIAGNOSTICS], stacked.tolist(), strict=True))  # the one host copy
        sink = self._acc().select_metrics
        for k, v in values.items():
            sink.setdefault(k, []).append(float(v))

    # ------------------------------------------------------------------ checkpoints
    def _select_rng_path(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, f"forkwatch_select_rng_{self.rank}.pt")

    def save_select_rng(self, checkpoint: str) -> None:
        """Write this rank's selector generator state into `checkpoint` (a resume then draws the same tokens)."""
        torch.save(self.select_gen.get_state(), self._select_rng_path(checkpoint))

    def load_select_rng(self, checkpoint: str) -> None:
        """Restore the selector generator saved in `checkpoint`; without one, say that selections will differ."""
        path = self._select_rng_path(checkpoint)
        if not os.path.isfile(path):
            if self.selector is not None:
                logger.warning("forkwatch: %s has no selector generator state (%s); the resumed run's random "
                               "selections will differ from an uninterrupted run's", checkpoint, os.path.basename(path))
            return
        self.select_gen.set_state(torch.load(path, weights_only=True))

    def selection_loss(self) -> torch.Tensor | None:
        """The selector's loss_delta for this micro-batch, aggregated like TRL (None when it has none). Runs before and
        apart from recording: a recording fault never drops a term of the objective."""
        mb = self._mb
        sel = None if mb is None else mb.selection
        if sel is None or sel.loss_delta is None:
            return None
        from forkwatch.plugin.policy_loss import aggregate_like_trl

        inputs = mb.inputs
        return aggregate_like_trl(sel.loss_delta, response_mask(inputs), self.trainer, inputs)

    @torch.no_grad()
    def end_micro_batch(self) -> None:
        """Record the micro-batch (after `selection_loss`)."""
        mb, self._mb = self._mb, None
        if mb is None or not mb.logps:
            return
        t0 = time.perf_counter()
        cfg, inputs = self.config, mb.inputs
        cids = inputs["completion_ids"]
        t = cids.size(1)
        mask = response_mask(inputs)
        valid = mask.bool()
        lp = _cat(mb.logps)[:, -t:].float()  # no_grad: what is computed from these carries no graph
        ent = _cat(mb.entropies)[:, -t:].float()
        renyi2 = -_cat(mb.log_sum_sq)[:, -t:].float()
        if self.group_js_on:
            self._loss_pass_group_js(mb)
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
            row_ids = inputs["forkwatch_row_id"]
            b = gen.completion_id.numel()
            local = row_ids - (gen.key * ROW_BITS + gen.offset)  # out of [0, b) for rows of another generation
            ok = (local >= 0) & (local < b)
            local = local.clamp(0, b - 1)
            rows = local[ok]
            series.update(rewards=gen.reward[rows], lengths=gen.length[rows], truncated=gen.truncated[rows])
        if gen is not None and mb.hidden and self.rank_due(step):
            with self.faults.guard("effective_rank"):
                series["effective_rank"] = self._effective_ranks(step, mb, mask, ok & gen.sampled[local])
        acc.add(**series)
        if gen is not None and self._recording(step):
            # forks without generation-time alternatives are projected through the head, gathered on every rank
            # alike (a collective) whether or not this rank has a fork to record
            fallback = self.forks_on and "forkwatch_alt_ids" not in inputs and bool(mb.hidden)
            with self.project.materialised() if fallback else nullcontext() as project:
                pick = (ok & gen.sampled[local] & ~gen.recorded[local]).nonzero().squeeze(1)  # micro-batch rows
                if pick.numel():
                    gen.recorded[local[pick]] = True
                    self._record(acc, pick, local[pick], mb, inputs, lp, ent, renyi2, gjs, weights, forks, valid,
                                 project)
        acc.seconds += time.perf_counter() - t0

    def rank_due(self, step: int) -> bool:
        """Whether the effective rank of hidden states is measured at `step` (the backbone is hooked for it)."""
        every = self.config.effective_rank_every
        return every > 0 and step % every == 0 and self._rank_left.get(step, 1) > 0

    def _effective_ranks(self, step: int, mb: MicroBatch, mask: torch.Tensor, recorded: torch.Tensor) -> torch.Tensor:
        """Effective rank of up to the step's remaining budget of recorded rows, from the loss pass's backbone output
        (full activations under every sharded stack: only parameters are sharded). -> (n,) float32."""
        left = self._rank_left.setdefault(step, self.config.effective_rank_completions)
        rows = recorded.nonzero().squeeze(1)[:left].tolist()
        self._rank_left[step] = left - len(rows)
        for old in [s for s in self._rank_left if s < step]:
            del self._rank_left[old]
        values = completion_ranks(_cat(mb.hidden), mask, rows) if rows else []
        return torch.tensor(values, dtype=torch.float32, device=mask.device)

    def _record(self, acc, idx, gen_rows, mb, inputs, lp, ent, renyi2, gjs, weights, forks, valid, project) -> None:
        """Rows `idx` of the micro-batch (rows `gen_rows` of the generation batch): completions, tokens, forks.
        Tokens and completions keep references, copied out at the step's hand-off. Fork alternatives are looked up in
        what generation recorded; `project` (the gathered head, or None) serves batches generation could not."""
        cfg = self.config
        b, t = lp.shape
        acc.completions.append(CompletionBatch(gen=self.gen, gen_rows=gen_rows, idx=idx, entropy=ent, mask=valid,
                                               reward_names=tuple(self.trainer.reward_func_names)))
        if not cfg.record_tokens:
            return
        take = torch.zeros(b, dtype=torch.bool, device=lp.device).index_fill_(0, idx, True).unsqueeze(1) & valid
        row_ids = inputs["forkwatch_row_id"]
        acc.tokens.append(TokenBatch(
            take=take, logprob=lp.detach(), entropy=ent.detach(), renyi2=renyi2, group_js=gjs, selected=weights,
            is_fork=forks, advantages=inputs["advantages"], mask=valid, completion_id=row_ids,
            token_id=inputs["completion_ids"],
        ))
        if not self.forks_on:
            return
        row, pos = (forks & take).nonzero().unbind(1)  # (F,) each, row-major
        if "forkwatch_alt_ids" in inputs:
            alt_ids, alt_probs = inputs["forkwatch_alt_ids"][row, pos], inputs["forkwatch_alt_probs"][row, pos]
            rank = inputs["forkwatch_alt_rank"][row, pos]
        elif project is not None:
            p = inputs["prompt_ids"].size(1)
            hidden = _cat(mb.hidden)[:, p - 1 : p - 1 + t]  # (B, T, H): the states that predicted each token
            alt_ids, alt_probs, rank = metrics.topk_alternatives(
                hidden[row, pos], inputs["completion_ids"][row, pos], project, cfg.fork_top_k)
        else:
            return
        acc.forks.append(ForkBatch(completion_id=row_ids[row], position=pos, sampled_rank=rank, alt_ids=alt_ids,
                                   alt_probs=alt_probs))


def _cat(xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0] if len(xs) == 1 else torch.cat(xs)


def _gather_1d(accelerator, x: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of any length over ranks (NaN pads, then dropped)."""
    padded = accelerator.pad_across_processes(x.float(), dim=0, pad_index=float("nan"))
    out = accelerator.gather(padded)
    return out[~torch.isnan(out)]
