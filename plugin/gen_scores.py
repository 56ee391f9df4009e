"""Per-position evidence taken during `model.generate`, from the next-token logits each decoding forward already
returns: ICT's group_js, and the top-k alternatives with the sampled token's rank that forks record.

A forward hook on the causal LM (armed only while TRL's `_generate_single_turn` runs for training) sees each decode
step's (B, V) logits z. The G rollouts of a prompt are decoded in lockstep, so every sibling's p_{j,t} = softmax(z/T)
exists at once and u_{i,t} is scored there, O(B x V) per step; the top-k of each row is kept too (B x k per step),
and the rank of the sampled token once it is fed back at the next step. The probabilities are normalised here, from
generation's own logits: the loss pass's log-probs can differ from the sampler's (dropout, numerics), and a top-k
that sums past 1 would be wrong. No backbone pass, no projection through the
LM head (which under ZeRO-3 or FSDP2 is sharded outside the forward), no (B, T, V) storage. Step 0 is the prefill
forward (its last position predicts completion token 0); step t >= 1 is fed the token sampled at t-1, which is how
the hook learns which rows have finished and which token each row drew.

The alternatives are those of the policy that sampled the token (the distribution it was drawn from): the loss pass
of the first optimizer step on a batch sees the same distribution up to float rounding.

`take` checks the result against TRL's generation batch (rows, steps, the fed tokens against `completion_ids`) and
returns None with a reason where it cannot vouch for it; the monitor then falls back (gathered head, extra pass).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from forkwatch.plugin import metrics
from forkwatch.plugin.metrics import no_grad
from forkwatch.plugin.trl_batch import group_of, predicting_states


@dataclass
class GenEvidence:
    """Per-position evidence for TRL's (B, T) completion tokens, taken from generation's own logits. Each field is
    None when it was not asked for."""

    group_js: torch.Tensor | None = None  # (B, T) float32, 0 off the mask
    alt_ids: torch.Tensor | None = None  # (B, T, k) int64: the k most likely next tokens
    alt_probs: torch.Tensor | None = None  # (B, T, k) float32: their probabilities under softmax(z / T)
    rank: torch.Tensor | None = None  # (B, T) int64: the sampled token's rank in the whole vocabulary (0 = top)


class GenScorer:
    def __init__(self, *, temperature: float, num_generations: int, rank: int, chunk: int, group_js: bool = True,
                 top_k: int | None = None) -> None:
        self.temperature = temperature
        self.num_generations = num_generations
        self.rank = rank
        self.chunk = chunk
        self.group_js = group_js
        self.top_k = top_k  # None: no alternatives
        self.eos: torch.Tensor | None = None  # TRL's eos ids, set by the monitor
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
        self.ranks: list[torch.Tensor] = []  # (B, n) for every step but the last: known once its token is fed back
        self.active: list[torch.Tensor] = []  # (B, n) bool
        self.last_z: torch.Tensor | None = None  # (B, V) the latest step's logits, until its token is known
        self.fed: list[torch.Tensor] = []  # per decode step (B,): the token sampled at the previous step
        self.groups: torch.Tensor | None = None
        self.n_groups = 0
        self.finished: torch.Tensor | None = None  # (B,) bool: rows that fed an EOS, as of the last scored step

    PENDING_VALUES = 2**24  # logits (B x V per step) held before the pending steps are scored: 64 MB of float32

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
            # the monitor's group rule, renumbered from 0 (no host sync)
            first, last = group_of(self.rank * b, self.num_generations), group_of(self.rank * b + b - 1,
                                                                                  self.num_generations)
            self.groups = group_of(self.rank * b + torch.arange(b, device=z.device), self.num_generations) - first
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
            u = metrics.group_js_step(z.reshape(n * b, -1), active.reshape(-1), groups, n * self.n_groups,
                                      self.temperature, chunk=self.chunk)
            self.scores.append(u.view(n, b).T)
        if self.top_k is not None:
            ids_k, probs_k = metrics.topk_probs(z.reshape(n * b, -1), self.top_k, self.temperature)
            self.top_ids.append(ids_k.view(n, b, -1).transpose(0, 1))
            self.top_probs.append(probs_k.view(n, b, -1).transpose(0, 1))
            self._rank_pairs()

    def _rank_pairs(self) -> None:
        pairs, self.rank_pairs = self.rank_pairs, []
        if pairs:
            z = torch.stack([p[0] for p in pairs])  # (m, B, V)
            tok = torch.stack([p[1] for p in pairs])  # (m, B)
            m, b = tok.shape
            self.ranks.append(metrics.rank_of(z.reshape(m * b, -1), tok.reshape(-1)).view(m, b).T)

    @no_grad
    def take(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[GenEvidence | None, str | None]:
        """Evidence for TRL's `completion_ids` / `completion_mask` (B, T), or (None, reason)."""
        if self.reason is None and self.steps:
            self._score_pending()
        steps, fed, reason = self.steps, self.fed, self.reason
        active = torch.cat(self.active, 1) if self.active else None  # (B, S)
        scores, top_ids, top_probs, ranks, last_z = self.scores, self.top_ids, self.top_probs, self.ranks, self.last_z
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
        out = GenEvidence()
        keep = mask.bool()
        if self.group_js:
            out.group_js = _fit(torch.cat(scores, 1), t) * mask.to(torch.float32)  # (B, T)
        if self.top_k is not None:
            if s <= t:  # the last step's token was never fed back: it is TRL's completion token s-1
                ranks.append(metrics.rank_of(last_z, ids[:, s - 1]).unsqueeze(1))
            out.alt_ids = _fit(torch.cat(top_ids, 1), t)  # (B, T, k)
            out.alt_probs = _fit(torch.cat(top_probs, 1), t) * keep.unsqueeze(-1)
            out.rank = _fit(torch.cat(ranks, 1), t) * keep
        return out, None


def _fit(x: torch.Tensor, t: int) -> torch.Tensor:
    """(B, S, ...) per-step values -> (B, T, ...): cut, or padded with zeros past the last step."""
    s = x.size(1)
    if s >= t:
        return x[:, :t]
    return torch.cat([x, x.new_zeros((x.size(0), t - s, *x.shape[2:]))], 1)


@no_grad
def extra_pass(trainer, model: torch.nn.Module, backbone: torch.nn.Module, out: dict[str, Any]) -> torch.Tensor:
    """The fallback's extra no-grad pass over the generation batch -> (B, T, H) the hidden states that predict each
    completion token (then `metrics.group_js` through the gathered head).

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
