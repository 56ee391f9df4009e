"""Per-position evidence of a generation batch — ICT's group_js, and the top-k alternatives with the sampled token's
rank that forks record — taken from the logits each decoding step already computes, agreed over ranks, and the
fallbacks where generation could not provide it. Read top to bottom:

    GenScorer        a forward hook's job, while TRL generates: each decode step's (B, V) logits, scored in bulk
    DecodeScores     what the scorer found for TRL's (B, T) completion tokens
    Evidence         after the batch is generated: the ranks agree on one path (one collective), and the evidence
                     goes into TRL's batch dict (plugin/trl_seams.py's keys), or a fallback computes it
    extra_pass       the fallback's no-grad backbone pass over a generation batch
    HeadProjector    the LM head gathered with the stack's own primitives, for the fallbacks' projections

Generation: a forward hook on the causal LM (armed only while TRL's `_generate_single_turn` runs for training) sees
each decode step's logits z. The G rollouts of a prompt are decoded in lockstep, so every sibling's p_{j,t} =
softmax(z/T) exists at once and u_{i,t} is scored there, O(B x V) per step; the top-k of each row is kept too, and
the rank of the sampled token once it is fed back at the next step. The probabilities are normalised from
generation's own logits (the loss pass's log-probs can differ from the sampler's: dropout, numerics). No backbone
pass, no projection through the LM head (which under ZeRO-3 or FSDP2 is sharded outside the forward), no (B, T, V)
storage. Step 0 is the prefill forward (its last position predicts completion token 0); step t >= 1 is fed the
token sampled at t-1, which is how the hook learns which rows have finished and which token each row drew. The
alternatives are those of the policy that sampled the token: the first loss pass on a batch sees the same
distribution up to float rounding.

Fallbacks, where generation's own scores are unusable (vLLM, continuous batching, a custom rollout, a fault; each
counted by reason in run.json): group_js from the loss pass's hidden states, or an extra backbone pass when a
micro-batch holds only part of the generation batch; the fork alternatives projected at the loss pass through the
gathered head.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from forkwatch.plugin import token_math
from forkwatch.plugin.token_math import no_grad
from forkwatch.plugin.trl_seams import (
    ALT_IDS,
    ALT_PROBS,
    ALT_RANK,
    GROUP_ID,
    GROUP_JS,
    GROUP_JS_PENDING,
    PREFIX,
    eos_ids,
    gathered_head,
    group_of,
    head_logit_scale,
    predicting_states,
    response_mask,
)
from forkwatch.store.ledger import Ledger

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ during generation
@dataclass
class DecodeScores:
    """Per-position evidence for TRL's (B, T) completion tokens, taken from generation's own logits. Each field is
    None when it was not asked for."""

    group_js: torch.Tensor | None = None  # (B, T) float32, 0 off the mask
    alt_ids: torch.Tensor | None = None  # (B, T, k) int64: the k most likely next tokens
    alt_probs: torch.Tensor | None = None  # (B, T, k) float32: their probabilities under softmax(z / T)
    sampled_rank: torch.Tensor | None = None  # (B, T) int64: the sampled token's rank in the vocabulary (0 = top)


class GenScorer:
    PENDING_VALUES = 2**24  # logits (B x V per step) held before the pending steps are scored: 64 MB of float32

    def __init__(self, *, temperature: float, num_generations: int, process_index: int, chunk: int,
                 eos: list[int], group_js: bool = True, top_k: int | None = None) -> None:
        self.temperature = temperature
        self.num_generations = num_generations
        self.process_index = process_index  # this rank: its rows are global rows process_index * B + row
        self.chunk = chunk
        self.group_js = group_js
        self.top_k = top_k  # None: no alternatives
        self.eos = torch.tensor(eos)  # TRL's eos ids
        self.seconds = 0.0  # hook time since the last `take` (host time: kernels are queued, not waited for)
        self.reset()

    def reset(self) -> None:
        """Forget everything: called before each generation batch."""
        self.armed = False
        self.calls = 0  # `_generate_single_turn` calls in this generation batch
        self.reason: str | None = None  # why this batch cannot be served (first reason wins)
        self.steps = 0
        self.b = 0  # rows of this generation batch
        # Each decode step only keeps its logits (and the token fed back); the scores are computed for many steps
        # at once (`_score_pending`): the same ops on (n·B, V) instead of n times on (B, V), which on small models
        # is most of the cost (per-op dispatch), while `PENDING_VALUES` bounds the logits held at once.
        self.pending: list[torch.Tensor] = []  # (B, V) logits of steps not yet scored
        self.rank_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (logits, token drawn from them), unranked
        self.scores: list[torch.Tensor] = []  # (B, n) per scored chunk of steps
        self.top_ids: list[torch.Tensor] = []  # (B, n, k)
        self.top_probs: list[torch.Tensor] = []  # (B, n, k)
        self.token_ranks: list[torch.Tensor] = []  # (B, n) for every step but the last: known once its token is fed
        self.active: list[torch.Tensor] = []  # (B, n) bool
        self.last_z: torch.Tensor | None = None  # (B, V) the latest step's logits, until its token is known
        self.fed: list[torch.Tensor] = []  # per decode step (B,): the token sampled at the previous step
        self.groups: torch.Tensor | None = None
        self.n_groups = 0
        self.finished: torch.Tensor | None = None  # (B,) bool: rows that fed an EOS, as of the last scored step

    def invalidate(self, reason: str) -> None:
        self.reason = self.reason or reason
        self.armed = False
        self.last_z = None
        self.pending, self.rank_pairs = [], []

    def arm(self) -> None:
        self.calls += 1
        if self.calls > 1:  # a tool-calling loop regenerates: positions no longer line up across siblings
            self.invalidate("multi_turn")
        elif self.reason is None:
            self.armed = True

    def disarm(self) -> None:
        self.armed = False

    @no_grad
    def on_forward(self, kwargs: dict[str, Any], output: Any) -> None:
        t0 = time.perf_counter()
        logits = getattr(output, "logits", None)
        if logits is None or logits.dim() != 3:
            self.invalidate("no_logits")
            return
        z = logits[:, -1].detach()  # (B, V): raw next-token logits (logit scale / softcap applied by the model)
        b = z.size(0)
        if not self.steps:  # prefill: predicts completion token 0; every row is active
            z = z.clone()  # a view of the prefill's (B, P, V) logits would hold all of them until scored
            self.b = b
            # the row ids' group rule, renumbered from 0 (no host sync)
            first = group_of(self.process_index * b, self.num_generations)
            last = group_of(self.process_index * b + b - 1, self.num_generations)
            rows = self.process_index * b + torch.arange(b, device=z.device)
            self.groups = group_of(rows, self.num_generations) - first
            self.n_groups = last - first + 1
            self.finished = torch.zeros(b, dtype=torch.bool, device=z.device)
            if self.eos.device != z.device:
                self.eos = self.eos.to(z.device)
        else:
            ids = kwargs.get("input_ids")
            if ids is None or ids.dim() != 2 or ids.size(1) != 1 or ids.size(0) != b or b != self.b:
                self.invalidate("decode_shape")  # not one new token per row (assisted decoding, embeds, no cache)
                return
            tok = ids[:, 0]
            self.fed.append(tok)
            if self.last_z is not None:
                self.rank_pairs.append((self.last_z, tok))
        self.steps += 1
        self.pending.append(z)
        if self.top_k is not None:
            self.last_z = z
        if len(self.pending) * z.numel() >= self.PENDING_VALUES:
            self._score_pending()
        self.seconds += time.perf_counter() - t0

    def _score_pending(self) -> None:
        """Score the pending steps at once: which rows are active, group_js, the top-k, and the ranks of the tokens
        fed back since. Step s (s >= 1) is fed the token drawn at step s - 1; a row is active at step s until an EOS
        was fed (sticky: generate keeps feeding finished rows pad tokens, which are excluded from P̄ and score 0)."""
        zs, self.pending = self.pending, []
        if not zs:
            return
        n, b = len(zs), self.b
        first = self.steps - n  # the first pending step
        z = torch.stack(zs)  # (n, B, V)
        fed = self.fed[max(first - 1, 0) : self.steps - 1]  # tokens fed at steps max(first, 1) .. steps - 1
        ended = torch.isin(torch.stack(fed), self.eos) if fed else self.finished.new_zeros((0, b))  # (m, B)
        if first == 0:  # the prefill step: every row active
            ended = torch.cat([self.finished.new_zeros((1, b)), ended])
        finished = (ended.cumsum(0) > 0) | self.finished  # (n, B): as of each pending step
        self.finished = finished[-1]
        active = ~finished
        self.active.append(active.T)
        if self.group_js:
            steps = torch.arange(n, device=z.device).unsqueeze(1)  # each step's groups are its own
            groups = (self.groups.unsqueeze(0) + steps * self.n_groups).reshape(-1)
            u = token_math.group_js_step(z.reshape(n * b, -1), active.reshape(-1), groups, n * self.n_groups,
                                         self.temperature, chunk=self.chunk)
            self.scores.append(u.view(n, b).T)
        if self.top_k is not None:
            ids_k, probs_k = token_math.topk_probs(z.reshape(n * b, -1), self.top_k, self.temperature)
            self.top_ids.append(ids_k.view(n, b, -1).transpose(0, 1))
            self.top_probs.append(probs_k.view(n, b, -1).transpose(0, 1))
            self._rank_pairs()

    def _rank_pairs(self) -> None:
        pairs, self.rank_pairs = self.rank_pairs, []
        if pairs:
            z = torch.stack([p[0] for p in pairs])  # (m, B, V)
            tok = torch.stack([p[1] for p in pairs])  # (m, B)
            m, b = tok.shape
            self.token_ranks.append(token_math.rank_of(z.reshape(m * b, -1), tok.reshape(-1)).view(m, b).T)

    @no_grad
    def take(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[DecodeScores | None, str | None]:
        """Evidence for TRL's `completion_ids` / `completion_mask` (B, T), or (None, reason) where it cannot vouch
        for it (rows, steps, the fed tokens against `completion_ids`)."""
        if self.reason is None and self.steps:
            self._score_pending()
        steps, fed, reason = self.steps, self.fed, self.reason
        active = torch.cat(self.active, 1) if self.active else None  # (B, S)
        scores, top_ids, top_probs, token_ranks = self.scores, self.top_ids, self.top_probs, self.token_ranks
        last_z = self.last_z
        self.reset()
        if reason is not None:
            return None, reason
        if not steps:
            return None, "no_logits"  # generation did not run through the hooked model (custom rollout_func, ...)
        b, t = ids.shape
        s = steps
        if active.size(0) != b:
            return None, "rows"
        # the tokens generate fed back must be TRL's completion tokens, row for row (no chunking or reordering)
        n = min(s - 1, t)
        if n > 0:
            fed_ids = torch.stack(fed, 1)[:, :n]
            if bool(((fed_ids != ids[:, :n]) & mask[:, :n].bool()).any()):
                return None, "tokens"
        # TRL pads completions to a multiple (columns past S must be masked); generate may run steps past the last
        # EOS TRL keeps (deferred stop checks, an eos set wider than generate's): no row may be active there
        if t > s and bool(mask[:, s:].any()):
            return None, "steps"
        if s > t and bool(active[:, t:].any()):
            return None, "steps"
        out = DecodeScores()
        keep = mask.bool()
        if self.group_js:
            out.group_js = _fit(torch.cat(scores, 1), t) * mask.to(torch.float32)  # (B, T)
        if self.top_k is not None:
            if s <= t:  # the last step's token was never fed back: it is TRL's completion token s-1
                token_ranks.append(token_math.rank_of(last_z, ids[:, s - 1]).unsqueeze(1))
            out.alt_ids = _fit(torch.cat(top_ids, 1), t)  # (B, T, k)
            out.alt_probs = _fit(torch.cat(top_probs, 1), t) * keep.unsqueeze(-1)
            out.sampled_rank = _fit(torch.cat(token_ranks, 1), t) * keep
        return out, None


def _fit(x: torch.Tensor, t: int) -> torch.Tensor:
    """(B, S, ...) per-step values -> (B, T, ...): cut, or padded with zeros past the last step."""
    s = x.size(1)
    if s >= t:
        return x[:, :t]
    return torch.cat([x, x.new_zeros((x.size(0), t - s, *x.shape[2:]))], 1)


# ------------------------------------------------------------------------------------------------ agreed over ranks
# the paths a generation batch can take, ordered: the ranks agree on the minimum over them
UNRECORDED, FALLBACK, EVIDENCE = 0, 1, 2


def agreed_path(has_evidence: bool, recorded: bool, world: int, device: torch.device | str = "cpu") -> int:
    """The path every rank takes for a generation batch: EVIDENCE (generation's own scores) only when every rank has
    them, UNRECORDED when any rank could not even take the batch's facts, else FALLBACK (whose gathers of the sharded
    head are collectives every rank must enter). One all_reduce(MIN) when world > 1: call it on every rank."""
    state = EVIDENCE if has_evidence else FALLBACK if recorded else UNRECORDED
    if world > 1:
        t = torch.tensor([state], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        state = int(t.item())
    return state


class Evidence:
    """The per-position evidence of each generation batch: generation's own (`scorer`), else the fallbacks."""

    def __init__(self, trainer, config, *, rank: int, world: int, faults: Ledger, project: HeadProjector | None,
                 backbone: Any, group_js: bool, forks: bool) -> None:
        self.trainer, self.config = trainer, config
        self.rank, self.world, self.faults = rank, world, faults
        self.project, self.backbone = project, backbone  # the gathered head and the model's backbone
        self.group_js_on, self.forks_on = group_js, forks
        self.split_groups = 0  # groups whose rollouts were not all on this rank (group_js over local siblings)
        self.group_js_fallbacks: Counter[str] = Counter()  # by reason generation's scores were unusable
        self.fork_fallbacks: Counter[str] = Counter()
        self.scorer: GenScorer | None = None
        if group_js or forks:
            self.scorer = GenScorer(temperature=trainer.temperature, num_generations=trainer.num_generations,
                                    process_index=rank, chunk=config.group_js_chunk, eos=eos_ids(trainer),
                                    group_js=group_js, top_k=config.fork_top_k if forks else None)
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
        agreed = agreed_path(evidence is not None, recorded, self.world, out["completion_ids"].device)
        if agreed == UNRECORDED:
            for key in [k for k in out if k.startswith(PREFIX)]:
                del out[key]
            if recorded:  # the fault itself is counted on the rank that had it
                self.faults.drop("completions", out["completion_ids"].size(0), "other_rank",
                                 "forkwatch: another rank could not record a generation batch; no rank records it")
            return False
        if agreed == FALLBACK and evidence is not None:
            evidence, reason = None, "other_rank"
        with self.faults.guard("generation_evidence"):
            self._use(out, evidence, reason)
        return True

    def _use(self, out: dict[str, Any], evidence: DecodeScores | None, reason: str | None) -> None:
        """Generation's own scores into the batch dict, else the fallbacks (the same path on every rank)."""
        if evidence is not None:
            if self.group_js_on:
                out[GROUP_JS] = evidence.group_js
            if self.forks_on:
                out[ALT_IDS], out[ALT_PROBS] = evidence.alt_ids, evidence.alt_probs
                out[ALT_RANK] = evidence.sampled_rank
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
            out[GROUP_JS_PENDING] = torch.ones(mask.size(0), dtype=torch.bool, device=mask.device)
            return
        groups = torch.unique(out[GROUP_ID], return_inverse=True)[1]
        hidden = extra_pass(self.trainer, self.project.model, self.backbone, out)
        with self.project.materialised() as project:
            out[GROUP_JS] = token_math.group_js(hidden, mask, groups, project, chunk=self.config.group_js_chunk)

    def _at_loss_pass(self) -> bool:
        """Whether the loss pass can score group_js from its own hidden states: when its one micro-batch is this
        rank's whole generation batch (every sibling present) under the weights that generated it."""
        tr = self.trainer
        return (self.backbone is not None and tr.args.steps_per_generation == 1 and tr.num_iterations == 1
                and tr.args.gradient_accumulation_steps == 1)

    def score_at_loss_pass(self, inputs: dict[str, Any], hidden: torch.Tensor | None) -> None:
        """group_js of a generation batch the fallback left to the loss pass (GROUP_JS_PENDING), from `hidden`
        (B, P + T, H), the states the backbone computed for the loss, through the gathered head (a collective: every
        rank calls this for every such micro-batch)."""
        if GROUP_JS_PENDING not in inputs or inputs.get(GROUP_JS) is not None or hidden is None:
            return
        mask = response_mask(inputs)
        states = predicting_states(hidden, inputs["prompt_ids"].size(1), mask.size(1))  # (B, T, H)
        groups = torch.unique(inputs[GROUP_ID], return_inverse=True)[1]
        with self.project.materialised() as project:
            inputs[GROUP_JS] = token_math.group_js(states, mask, groups, project, chunk=self.config.group_js_chunk)


# ------------------------------------------------------------------------------------------------ the fallbacks' tools
@no_grad
def extra_pass(trainer, model: torch.nn.Module, backbone: torch.nn.Module, out: dict[str, Any]) -> torch.Tensor:
    """The fallback's extra no-grad pass over the generation batch -> (B, T, H) the hidden states that predict each
    completion token (then `token_math.group_js` through the gathered head; the reference JS uses it too).

    Under FSDP2 the pass starts at the causal LM (only the root's forward gathers the root's own parameters;
    `logits_to_keep=1` keeps the head to one position) and a forward hook on the backbone takes the states. Elsewhere
    it calls the backbone alone: ZeRO-3 gathers per submodule, and an extra call of its partitioned head outside the
    engine's forward breaks the next backward.
    """
    from torch.distributed.fsdp import FSDPModule

    pids, cids = out["prompt_ids"], out["completion_ids"]
    p, t = pids.size(1), cids.size(1)
    input_ids = torch.cat([pids, cids], 1)
    attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    bs = trainer.args.per_device_train_batch_size
    devices = [input_ids.device] if input_ids.device.type == "cuda" else []
    hidden: list[torch.Tensor] = []

    def take(module, args, output):
        hs = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        hidden.append(predicting_states(hs, p, t))  # (bs, T, H)

    handle = backbone.register_forward_hook(take)
    # fork_rng: a dropout layer in this extra pass must not move the global RNG TRL's shuffle draws from
    try:
        with torch.random.fork_rng(devices=devices), trainer.accelerator.autocast():
            for s in range(0, input_ids.size(0), bs):
                batch = dict(input_ids=input_ids[s : s + bs], attention_mask=attn[s : s + bs], use_cache=False)
                if isinstance(model, FSDPModule):
                    model(**batch, logits_to_keep=1)
                else:
                    backbone(**batch)
    finally:
        handle.remove()
    return torch.cat(hidden)


class HeadProjector:
    """The LM head as a projector (N, H) hidden -> (N, V) temperature-scaled logits, for the fallbacks that need
    full distributions the model did not compute during generation.

    Under DeepSpeed ZeRO-3 a parameter outside its module's forward is an empty (0,)-shaped placeholder, and under
    FSDP2 it may be a sharded DTensor: projecting through it fails or, worse, would use a shard. So the projector
    works only inside `materialised()`, which gathers the head with the stack's own primitives (TRL's ZeRO-3 gather,
    the one its fused head uses; `DTensor.full_tensor()`) and releases it on exit. Both are collectives: every rank
    must enter `materialised()` the same number of times, which `Evidence` guarantees by deciding on the fallback for
    all ranks at once.
    """

    def __init__(self, model: torch.nn.Module, temperature: float) -> None:
        cfg = model.config.get_text_config()
        # the same logit scale and softcap as TRL's fused head
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.scale = head_logit_scale(cfg)
        self.model = model
        self.temperature = temperature
        self._weights: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @contextmanager
    def materialised(self):
        """The full head weight for the duration of the block (a collective under ZeRO-3 and FSDP2)."""
        from torch.distributed.tensor import DTensor

        head = self.model.get_output_embeddings()  # looked up per use: PEFT/FSDP may replace it
        w, b = head.weight, head.bias
        if isinstance(w, DTensor):
            w = w.full_tensor()
            b = b.full_tensor() if isinstance(b, DTensor) else b
        with gathered_head(w, b):
            self._weights = (w, b)
            try:
                yield self
            finally:
                self._weights = None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self._weights is None:
            raise RuntimeError("HeadProjector used outside `materialised()`: the head may be sharded there")
        w, b = self._weights
        z = F.linear(h.to(w.dtype), w, b).float()
        # each of these is a pass over (N, V): skipped when it would change nothing
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z / self.temperature if self.temperature != 1.0 else z
