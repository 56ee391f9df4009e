"""ICT's score against the reference policy (`select="ict", select_options={"against": "reference"}`):
u_{i,t} = JS(π_θ(·|s_{i,t}) ‖ π_ref(·|s_{i,t})), both distributions in the token's own context s_{i,t} (prompt and
completion up to t), p = softmax(z / T) with TRL's sampling temperature. π_ref is the initial policy:

- TRL's `ref_model` when the trainer has one (beta > 0; TRL prepares it for DeepSpeed / FSDP itself);
- else, for a PEFT model, the same model with its adapters disabled (TRL's own `use_adapter`, as its KL term does);
- else a frozen copy of the policy taken at `attach`, whole on every rank (the trainer shards the policy only when
  training starts); refused when the parameters are already shards (a model loaded under ZeRO-3's `zero.Init`), where
  a copy is not a working model: set beta > 0 so that TRL builds a prepared `ref_model`, or use a PEFT model.

Computed once per generation batch, on the training thread, without gradient. The policy side: one no-grad backbone
pass (`gen_evidence.extra_pass`, the path the group_js fallback takes under DDP, ZeRO-3 and FSDP2) and the head
gathered for the projection (`HeadProjector.materialised`): under ZeRO-3 a call of the partitioned head module outside the
engine's forward breaks the next backward, so the policy's head is never called as a module. The reference side: the
reference's own whole forward (`logits_to_keep` cuts it to the completion's positions; TRL's ref_model is never
backpropagated, and a forward gathers its own shards), `rows` rows at a time; for PEFT the policy's path with the
adapters disabled. Logits exist for one chunk of `rows` rows at a time and the JS is taken from float32 softmaxes of
`chunk` positions at a time (`token_math.js_from_logits`): no (B, T, V) float64 is ever built. The result rides with
the generation batch as `trl_seams.REFERENCE_JS` (B, T), 0 off the mask.
"""

from __future__ import annotations

import copy
import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from forkwatch.plugin.gen_evidence import extra_pass
from forkwatch.plugin.token_math import js_from_logits
from forkwatch.plugin.trl_seams import adapters_disabled, reference_model

logger = logging.getLogger(__name__)

def _completion_logits(model: torch.nn.Module, ids: torch.Tensor, attn: torch.Tensor, t: int) -> torch.Tensor:
    """(rows, T, V) logits predicting each of the T completion tokens (the last T + 1 positions but the last)."""
    out = model(input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=t + 1)
    return out.logits[:, :-1]


def _partitioned(model: torch.nn.Module) -> bool:
    """Whether the parameters are shards (a ZeRO-3 placeholder, an FSDP2 DTensor) rather than whole tensors."""
    from torch.distributed.tensor import DTensor

    return any(hasattr(p, "ds_id") or isinstance(p, DTensor) for p in model.parameters())


class ReferencePolicy:
    """The initial policy of a trainer and the reference JS of its generation batches."""

    def __init__(self, trainer: Any, *, project: Any, backbone: torch.nn.Module | None, rows: int | None = None,
                 chunk: int = 256) -> None:
        from accelerate.utils import is_peft_model

        self.trainer = trainer
        self.project = project  # the capture's HeadProjector: the policy's (gathered) head, temperature-scaled
        self.backbone = backbone
        self.rows = rows or trainer.args.per_device_train_batch_size
        self.chunk = chunk
        self.copy: torch.nn.Module | None = None
        model = trainer.accelerator.unwrap_model(trainer.model)
        if reference_model(trainer) is not None:
            self.kind = "ref_model"
        elif is_peft_model(model):
            self.kind = "peft_adapters_disabled"
        else:
            if _partitioned(model):
                raise ValueError(
                    "forkwatch: select='ict' with against='reference' needs the initial policy, and this model's "
                    "parameters are already partitioned (ZeRO-3 / FSDP), so a copy of it is not a working model: set "
                    "GRPOConfig(beta=...) above 0 so TRL builds its prepared ref_model, or train a PEFT model (its "
                    "adapters disabled are the reference)")
            self.kind = "frozen_copy"
            self.copy = copy.deepcopy(model).eval().requires_grad_(False)
            # TRL replaces the instance's `forward` with a fused-head wrapper that closes over the ORIGINAL model's
            # forward: a deep copy would carry it and run the live policy. The class's own forward returns logits.
            self.copy.__dict__.pop("forward", None)
        logger.info("forkwatch: ICT against the reference policy (%s)", self.kind)

    def _reference(self) -> tuple[torch.nn.Module, AbstractContextManager]:
        tr = self.trainer
        if self.kind == "ref_model":
            return reference_model(tr), nullcontext()
        if self.kind == "peft_adapters_disabled":
            return tr.model, adapters_disabled(tr)
        return self.copy, nullcontext()

    def _hidden(self, out: dict[str, Any], disabled: AbstractContextManager) -> torch.Tensor:
        """(B, T, H) the policy backbone's states predicting each completion token (`extra_pass`, the path the
        group_js fallback takes under every backend)."""
        with disabled:
            return extra_pass(self.trainer, self.project.model, self.backbone, out)

    @torch.no_grad()
    def score(self, out: dict[str, Any], mask: torch.Tensor) -> torch.Tensor:
        """(B, T) float32 reference JS of TRL's generation batch `out` (prompt/completion ids and masks)."""
        tr = self.trainer
        if self.backbone is None:
            raise ValueError("forkwatch: against='reference' needs the policy's backbone (model.base_model)")
        pids, cids = out["prompt_ids"], out["completion_ids"]
        b, t = cids.shape
        ref, disabled = self._reference()
        h_p = self._hidden(out, nullcontext())
        h_q = self._hidden(out, disabled) if self.kind == "peft_adapters_disabled" else None
        ids = torch.cat([pids, cids], 1)
        attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        if self.copy is not None and next(self.copy.parameters()).device != ids.device:
            self.copy.to(ids.device)
        scores = torch.zeros(b, t, dtype=torch.float32, device=cids.device)
        devices = [ids.device] if ids.device.type == "cuda" else []
        # fork_rng: a dropout layer here must not move the global RNG TRL's shuffle draws from. The head is gathered
        # once for the batch (a collective: every rank runs the same number of row chunks).
        with torch.random.fork_rng(devices=devices), tr.accelerator.autocast(), \
                self.project.materialised() as project:
            for s in range(0, b, self.rows):
                sl = slice(s, s + self.rows)
                n = h_p[sl].size(0)
                z_p = project(h_p[sl].reshape(n * t, -1))  # (n·T, V), already divided by T
                if h_q is not None:
                    z_q = project(h_q[sl].reshape(n * t, -1))
                else:  # the reference's own whole forward (TRL's ref_model is never backpropagated)
                    z_q = _completion_logits(ref, ids[sl], attn[sl], t).reshape(n * t, -1).float() / tr.temperature
                v = min(z_p.size(-1), z_q.size(-1))  # a padded vocabulary row is never sampled
                scores[sl] = js_from_logits(z_p[:, :v], z_q[:, :v], 1.0, self.chunk).view(n, t)
        return scores * mask.to(torch.float32)
