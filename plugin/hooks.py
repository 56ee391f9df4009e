"""The TRL 1.16 seams (DESIGN.md, "Where the data comes from"): instance-level wrappers and module hooks only.

- the fused LM head is re-added with `log_sum_sq_probs` (Rényi-2 for free; log-probs and entropies unchanged);
- `_calculate_rewards` / `_generate_and_score_completions`: per-completion facts, row ids, group_js;
- `_generate_single_turn` (only with group_js): arms a forward hook on the causal LM that scores group_js from each
  decoding step's logits (gen_scores.py) while TRL generates for training;
- `_compute_loss`: brackets each loss micro-batch; forward hooks on the model and its backbone, registered for that
  call only, see the fused outputs (with gradient) and the hidden states (for top-k at forks);
- `get_high_entropy_mask` (only with a selector): the selection seam.
Every wrapper calls TRL first or always; a fault in forkwatch is counted and training goes on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from forkwatch.plugin.metrics import Projector
from forkwatch.plugin.monitor import Monitor


def target_model(trainer) -> torch.nn.Module:
    """The causal LM whose forward TRL patched (the base model under a PEFT adapter)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model


def make_projector(model: torch.nn.Module, temperature: float) -> Projector:
    """(N, H) hidden -> (N, V) logits / T, as TRL's fused head computes them (logit scale, softcap)."""
    cfg = model.config.get_text_config()
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        scale = getattr(cfg, name, None) if scale is None else scale
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        scale = cfg.logits_scaling if cfg.model_type == "hyperclovax" else 1 / cfg.logits_scaling
    scale = 1.0 if scale is None else float(scale)

    def project(h: torch.Tensor) -> torch.Tensor:
        head = model.get_output_embeddings()  # looked up per call: PEFT/FSDP may replace it
        w, b = head.weight, head.bias
        z = F.linear(h.to(w.dtype), w, b).float()
        # each of these is a pass over (N, V): skipped when it would change nothing
        if scale != 1.0:
            z = z * scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        return z / temperature if temperature != 1.0 else z

    return project


def install(trainer, monitor: Monitor) -> Callable[[], None]:
    """Install every seam on `trainer`; returns a function that removes them all."""
    from trl.trainer.utils import add_fused_lm_head

    undo: list[Callable[[], None]] = []
    guard = monitor.faults.guard
    target = target_model(trainer)

    previous_forward = target.__dict__.get("forward")
    add_fused_lm_head(
        target,
        temperature=trainer.temperature,
        cast_lm_head_to_fp32=trainer.args.cast_lm_head_to_fp32,
        outputs=("log_probs", "entropy", "log_sum_sq_probs"),
    )
    undo.append(lambda: setattr(target, "forward", previous_forward) if previous_forward else None)

    def wrap(name: str, make: Callable[[Callable], Callable]) -> None:
        original = getattr(trainer, name)
        setattr(trainer, name, functools.wraps(original)(make(original)))
        undo.append(lambda: trainer.__dict__.pop(name, None))

    def rewards(original):
        def _calculate_rewards(*args, **kwargs):
            out = original(*args, **kwargs)
            monitor.last_rewards = out.detach() if trainer.model.training else None
            return out

        return _calculate_rewards

    scorer = monitor.gen_scorer

    def generation(original):
        def _generate_and_score_completions(inputs):
            if scorer is not None:
                scorer.reset()
            out = original(inputs)
            if trainer.model.training:
                with guard("generation"):
                    monitor.on_generation(out)
            return out

        return _generate_and_score_completions

    policy = trainer.accelerator.unwrap_model(trainer.model)
    watch_backbone = monitor.backbone is not None and monitor.config.record_tokens and monitor.config.record_forks

    def model_hook(module, args, kwargs, output):
        if monitor._mb is None:
            return
        with guard("model_forward"):
            monitor.on_model_forward(kwargs, output)

    def backbone_hook(module, args, output):
        if monitor._mb is None:
            return
        with guard("backbone_forward"):
            monitor.on_backbone_forward(output)

    def compute_loss(original):
        def _compute_loss(model, inputs):
            handles = []
            with guard("loss_begin"):
                monitor.begin_micro_batch(inputs)
                if monitor._mb is not None:  # hooked for this pass only: generation's forwards stay on the fast path
                    handles.append(policy.register_forward_hook(model_hook, with_kwargs=True))
                    if watch_backbone or (monitor.backbone is not None and monitor.rank_due(monitor.step_now())):
                        handles.append(monitor.backbone.register_forward_hook(backbone_hook))
            try:
                loss = original(model, inputs)
            finally:
                for h in handles:
                    h.remove()
            extra = None
            with guard("loss_end"):
                extra = monitor.end_micro_batch()
            return loss if extra is None else loss + extra

        return _compute_loss

    def single_turn(original):
        def _generate_single_turn(*args, **kwargs):
            if not trainer.model.training:
                return original(*args, **kwargs)
            # backends whose forward this hook never sees: the monitor falls back to its extra pass
            if getattr(trainer, "use_vllm", False):
                scorer.invalidate("vllm")
            elif getattr(trainer, "use_transformers_continuous_batching", False):
                scorer.invalidate("continuous_batching")
            scorer.arm()
            try:
                return original(*args, **kwargs)
            finally:
                scorer.disarm()

        return _generate_single_turn

    wrap("_calculate_rewards", rewards)
    wrap("_generate_and_score_completions", generation)
    if scorer is not None and hasattr(trainer, "_generate_single_turn"):
        wrap("_generate_single_turn", single_turn)
    wrap("_compute_loss", compute_loss)

    if monitor.selector is not None:

        def selection(original):
            def get_high_entropy_mask(entropies, mask, threshold):
                weights = None
                with guard("select"):
                    weights = monitor.select(entropies, mask)
                # a failed selector trains this micro-batch densely (weight 1) rather than stopping the run
                return weights if weights is not None else mask.float()

            return get_high_entropy_mask

        wrap("get_high_entropy_mask", selection)
        previous_quantile = trainer.top_entropy_quantile
        trainer.top_entropy_quantile = 0.5  # any value < 1 makes TRL call the seam; the threshold is ignored
        undo.append(lambda: setattr(trainer, "top_entropy_quantile", previous_quantile))

    def generation_hook(module, args, kwargs, output):
        if not scorer.armed:  # every forward outside TRL's generation for training
            return
        ok = False
        with guard("group_js_generation"):
            scorer.on_forward(kwargs, output)
            ok = True
        if not ok:
            scorer.invalidate("error")

    if scorer is not None:  # on the causal LM itself: under PEFT, generate calls it, not the PeftModel
        undo.append(target.register_forward_hook(generation_hook, with_kwargs=True).remove)

    def uninstall() -> None:
        for fn in reversed(undo):
            fn()

    return uninstall
