"""The LM head as a projector (N, H) hidden -> (N, V) temperature-scaled logits, for the fallbacks that need full
distributions the model did not compute during generation (vLLM, continuous batching, custom rollouts, multi-turn).

Under DeepSpeed ZeRO-3 a parameter outside its module's forward is an empty (0,)-shaped placeholder, and under FSDP2
it may be a sharded DTensor: projecting through it fails or, worse, would use a shard. So the projector works only
inside `materialised()`, which gathers the head with the stack's own primitives (TRL's ZeRO-3 gather, the one its
fused head uses; `DTensor.full_tensor()`) and releases it on exit. Both are collectives: every rank must enter
`materialised()` the same number of times, which the monitor guarantees by deciding on the fallback for all ranks
at once.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F


class HeadProjector:
    def __init__(self, model: torch.nn.Module, temperature: float) -> None:
        cfg = model.config.get_text_config()
        # the same logit scale and softcap as TRL's fused head (trl.trainer.utils.add_fused_lm_head)
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        scale = getattr(cfg, "logit_scale", None)
        for name in ("output_multiplier", "lm_head_multiplier"):
            scale = getattr(cfg, name, None) if scale is None else scale
        if scale is None and getattr(cfg, "logits_scaling", None) is not None:
            scale = cfg.logits_scaling if cfg.model_type == "hyperclovax" else 1 / cfg.logits_scaling
        self.scale = 1.0 if scale is None else float(scale)
        self.model = model
        self.temperature = temperature
        self._weights: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @contextmanager
    def materialised(self):
        """The full head weight for the duration of the block (a collective under ZeRO-3 and FSDP2)."""
        from torch.distributed.tensor import DTensor
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        head = self.model.get_output_embeddings()  # looked up per use: PEFT/FSDP may replace it
        w, b = head.weight, head.bias
        if isinstance(w, DTensor):
            w = w.full_tensor()
            b = b.full_tensor() if isinstance(b, DTensor) else b
        with maybe_gather_lm_head_ctx(w, b):
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

