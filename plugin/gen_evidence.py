"""Per-position evidence of a generation batch (group_js, the fork alternatives), agreed over ranks, and the
fallbacks where generation could not provide it.

`GenScorer` (gen_scores.py) reads each decoding step's logits while TRL generates; `GenEvidence` takes its result
after the batch is generated, agrees with the other ranks on which path every rank uses (one collective), and puts
the evidence into TRL's batch dict as extra per-row tensors (they survive TRL's shuffle and split into the loss
micro-batches). Where generation's own scores are unusable (vLLM, continuous batching, a fault), group_js comes from
the loss pass's hidden states or an extra backbone pass, and the fork alternatives from the gathered head at the
loss pass; each fallback is counted by reason (run.json).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
from forkwatch.plugin import metrics
from forkwatch.plugin.gen_scores import GenScorer, extra_pass
from forkwatch.plugin.trl_batch import eos_ids, predicting_states, response_mask
from forkwatch.store.ledger import Ledger

logger = logging.getLogger(__name__)

# agreed states of a generation batch over the ranks (the minimum wins)
_UNRECORDED, _FALLBACK, _EVIDENCE = 0, 1, 2


class GenEvidence:
    def __init__(self, trainer, config, *, rank: int, world: int, faults: Ledger, project: Any, backbone: Any,
                 group_js: bool, forks: bool) -> None:
        self.trainer, self.config = trainer, config
        self.rank, self.world, self.faults = rank, world, faults
        self.project, self.backbone = project, backbone  # the gathered head (head.py) and the model's backbone
        self.group_js_on, self.forks_on = group_js, forks
        self.split_groups = 0  # groups whose rollouts were not all on this rank (group_js over local siblings)
        self.group_js_fallbacks: Counter[str] = Counter()  # by reason generation's scores were unusable
        self.fork_fallbacks: Counter[str] = Counter()
        self.scorer: GenScorer | None = None
        if group_js or forks:
            self.scorer = GenScorer(temperature=trainer.temperature, num_generations=trainer.num_generations,
                                    rank=rank, chunk=config.group_js_chunk, group_js=group_js,
                                    top_k=config.fork_top_k if forks else None)
            self.scorer.eos = torch.tensor(eos_ids(trainer))
        self._local: tuple[Any, str | None] | None = None  # this rank's evidence, until `share`

    def take(self, out: dict[str, Any], gid: torch.Tensor) -> float:
        """This rank's generation-time evidence of the batch just generated (no collective here); -> the scorer's
        seconds spent while TRL generated (counted into the step's forkwatch time)."""
        if self.group_js_on:
            groups = torch.unique(gid, return_inverse=True)[1]
            self.split_groups += int((torch.bincount(groups) < self.trainer.num_generations).sum())
        seconds, self.scorer.seconds = self.scorer.seconds, 0.0
        self._local = self.scorer.take(out["completion_ids"], response_mask(out))
        return seconds

    def share(self, out: dict[str, Any], recorded: bool) -> bool:
        """Called on every rank after the generation facts, outside the fault guards (`recorded`: they were taken
        without a fault), because it holds the generation batch's one collective. The ranks agree on one path:
        generation's own evidence, the fallbacks (which gather the sharded head: collectives every rank must enter),
        or, when any rank failed, nothing recorded from this batch on any rank, so that no rank waits in a collective
        another skipped. -> False when the batch is not recorded (its forkwatch_* keys are removed). What is optimised
        never depends on this (a selector that needs the evidence stops training with an error instead)."""
        local, self._local = (self._local if recorded else (None, "error")), None
        evidence, reason = local if local is not None else (None, "error")
        state = _EVIDENCE if evidence is not None else _FALLBACK if recorded else _UNRECORDED
        agreed = state
        if self.world > 1:
            t = torch.tensor([state], dtype=torch.int32, device=out["completion_ids"].device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            agreed = int(t.item())
        if agreed == _UNRECORDED:
            for key in [k for k in out if k.startswith("forkwatch_")]:
                del out[key]
            if recorded:  # the fault itself is counted on the rank that had it
                self.faults.drop("completions", out["completion_ids"].size(0), "other_rank",
                                 "forkwatch: another rank could not record a generation batch; no rank records it")
            return False
        if agreed == _FALLBACK and evidence is not None:
            evidence, reason = None, "other_rank"
        with self.faults.guard("generation_evidence"):
            self._use(out, evidence, reason)
        return True

    def _use(self, out: dict[str, Any], evidence: Any, reason: str | None) -> None:
        """Generation's own scores into the batch dict, else the fallbacks (the same path on every rank)."""
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
        at_loss = self._at_loss_pass()
        if self.group_js_fallbacks[reason] == 1:
            logger.info("forkwatch: group_js from %s (generation-time scores unusable: %s)",
                        "the loss pass's hidden states" if at_loss else "an extra backbone pass", reason)
        mask = response_mask(out)
        if at_loss:  # scored in the loss pass (`score_at_loss_pass`): no second pass through the backbone
            out["forkwatch_group_js_pending"] = torch.ones(mask.size(0), dtype=torch.bool, device=mask.device)
            return
        groups = torch.unique(out["forkwatch_group_id"], return_inverse=True)[1]
        hidden = extra_pass(self.trainer, self.project.model, self.backbone, out)
        with self.project.materialised() as project:
            out["forkwatch_group_js"] = metrics.group_js(hidden, mask, groups, project, chunk=self.config.group_js_chunk)

    def _at_loss_pass(self) -> bool:
        """Whether the loss pass can score group_js from its own hidden states: when its one micro-batch is this
        rank's whole generation batch (every sibling present) under the weights that generated it."""
        tr = self.trainer
        return (self.backbone is not None and tr.args.steps_per_generation == 1 and tr.num_iterations == 1
                and tr.args.gradient_accumulation_steps == 1)

    def score_at_loss_pass(self, inputs: dict[str, Any], hidden: torch.Tensor | None) -> None:
        """group_js of a generation batch the fallback left to the loss pass (`forkwatch_group_js_pending`), from
        `hidden` (B, P + T, H), the states the backbone computed for the loss, through the gathered head (a
        collective: every rank calls this for every such micro-batch)."""
        if "forkwatch_group_js_pending" not in inputs or inputs.get("forkwatch_group_js") is not None or hidden is None:
            return
        mask = response_mask(inputs)
        states = predicting_states(hidden, inputs["prompt_ids"].size(1), mask.size(1))  # (B, T, H)
        groups = torch.unique(inputs["forkwatch_group_id"], return_inverse=True)[1]
        with self.project.materialised() as project:
            inputs["forkwatch_group_js"] = metrics.group_js(states, mask, groups, project,
                                                            chunk=self.config.group_js_chunk)
