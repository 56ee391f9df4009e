"""group_js scored during `model.generate`, from the next-token logits each decoding forward already returns.

The G rollouts of a prompt are decoded in lockstep, so at decode step t every sibling's p_{j,t} = softmax(z_{j,t}/T)
exists at once: a forward hook on the causal LM (armed only while TRL's `_generate_single_turn` runs for training)
scores u_{i,t} there, O(B x V) per step, and keeps only the (B,) scores of each step. No backbone pass, no
vocabulary projection, no (B, T, V) storage. Step 0 is the prefill forward (its last position predicts completion
token 0); step t >= 1 is fed the token sampled at t-1, which is how the hook learns which rows have finished.

`take` checks the result against TRL's generation batch (rows, steps, the fed tokens against `completion_ids`) and
returns None with a reason where it cannot vouch for it; the monitor then falls back to its extra pass.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from forkwatch.plugin import metrics


class GenScorer:
    def __init__(self, *, temperature: float, num_generations: int, rank: int, chunk: int) -> None:
        self.temperature = temperature
        self.num_generations = num_generations
        self.rank = rank
        self.chunk = chunk
        self.eos: torch.Tensor | None = None  # TRL's eos ids, set by the monitor
        self.seconds = 0.0  # hook time since the last `take` (host time: kernels are queued, not waited for)
        self.reset()

    def reset(self) -> None:
        """Forget everything: called before each generation batch."""
        self.armed = False
        self.calls = 0  # `_generate_single_turn` calls in this generation batch
        self.reason: str | None = None  # why this batch cannot be served (first reason wins)
        self.scores: list[torch.Tensor] = []  # per step (B,)
        self.fed: list[torch.Tensor] = []  # per decode step (B,): the token sampled at the previous step
        self.active: list[torch.Tensor] = []  # per step (B,) bool
        self.groups: torch.Tensor | None = None
        self.n_groups = 0
        self.finished: torch.Tensor | None = None

    def invalidate(self, reason: str) -> None:
        self.reason = self.reason or reason
        self.armed = False

    def arm(self) -> None:
        self.calls += 1
        if self.calls > 1:  # a tool-calling loop regenerates: positions no longer line up across siblings
            self.invalidate("multi_turn")
        elif self.reason is None:
            self.armed = True

    def disarm(self) -> None:
        self.armed = False

    @torch.no_grad()
    def on_forward(self, kwargs: dict[str, Any], output: Any) -> None:
        t0 = time.perf_counter()
        logits = getattr(output, "logits", None)
        if logits is None or logits.dim() != 3:
            self.invalidate("no_logits")
            return
        z = logits[:, -1].detach()  # (B, V): raw next-token logits (logit scale / softcap applied by the model)
        b = z.size(0)
        if not self.scores:  # prefill: predicts completion token 0; every row is active
            first, g = self.rank * b // self.num_generations, self.num_generations
            # group = global_row // G, as the monitor's group_id, renumbered from 0 (no host sync)
            self.groups = (self.rank * b + torch.arange(b, device=z.device)) // g - first
            self.n_groups = (self.rank * b + b - 1) // g - first + 1
            self.finished = torch.zeros(b, dtype=torch.bool, device=z.device)
            if self.eos.device != z.device:
                self.eos = self.eos.to(z.device)
        else:
            ids = kwargs.get("input_ids")
            if ids is None or ids.dim() != 2 or ids.size(1) != 1 or ids.size(0) != b or b != self.finished.numel():
                self.invalidate("decode_shape")  # not one new token per row (assisted decoding, embeds, no cache)
                return
            tok = ids[:, 0]
            self.fed.append(tok)
            # sticky: generate keeps feeding finished rows pad tokens, which are excluded from P̄ and score 0
            self.finished |= torch.isin(tok, self.eos)
        active = ~self.finished
        self.active.append(active)
        self.scores.append(
            metrics.group_js_step(z, active, self.groups, self.n_groups, self.temperature, chunk=self.chunk)
        )
        self.seconds += time.perf_counter() - t0

    @torch.no_grad()
    def take(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
        """(B, T) scores for TRL's `completion_ids` / `completion_mask` (0 off the mask), or (None, reason)."""
        scores, fed, active, reason = self.scores, self.fed, self.active, self.reason
        self.reset()
        if reason is not None:
            return None, reason
        if not scores:
            return None, "no_logits"  # generation did not run through the hooked model (custom rollout_func, ...)
        b, t = ids.shape
        u = torch.stack(scores, 1)  # (B, S)
        s = u.size(1)
        if u.size(0) != b:
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
        if s > t and bool(torch.stack(active[t:], 1).any()):
            return None, "steps"
        if s < t:
            u = torch.cat([u, u.new_zeros(b, t - s)], 1)
        return u[:, :t] * mask.to(u.dtype), None


@torch.no_grad()
def extra_pass(trainer, backbone, project, out: dict[str, Any], mask: torch.Tensor, groups: torch.Tensor, *,
               chunk: int) -> torch.Tensor:
    """The fallback: one extra no-grad backbone pass over the generation batch, then `metrics.group_js`.

    mask (B, T): the loss mask, taken as "active" (a rollout TRL masks, e.g. truncated under
    mask_truncated_completions, leaves P̄ here, while during generation it counts until it ends); groups (B,) long.
    """
    pids, cids = out["prompt_ids"], out["completion_ids"]
    p, t = pids.size(1), cids.size(1)
    input_ids = torch.cat([pids, cids], 1)
    attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    bs = trainer.args.per_device_train_batch_size
    devices = [input_ids.device] if input_ids.device.type == "cuda" else []
    hidden = []
    # fork_rng: a dropout layer in this extra pass must not move the global RNG TRL's shuffle draws from
    with torch.random.fork_rng(devices=devices), trainer.accelerator.autocast():
        for s in range(0, input_ids.size(0), bs):
            h = backbone(input_ids=input_ids[s : s + bs], attention_mask=attn[s : s + bs], use_cache=False)
            hidden.append(h.last_hidden_state[:, p - 1 : p - 1 + t])  # (bs, T, H): states predicting token t
    return metrics.group_js(torch.cat(hidden), mask, groups, project, chunk=chunk)
