"""The TRL 1.16 seams: instance-level wrappers and module hooks only.

- the fused LM head is re-added with `log_sum_sq_probs` (Rényi-2 for free; log-probs and entropies unchanged);
- `_calculate_rewards` / `_generate_and_score_completions`: per-completion facts, row ids, group_js;
- `_generate_single_turn`: arms a forward hook on the causal LM that takes group_js and the fork alternatives from
  each decoding step's logits (gen_scores.py) while TRL generates for training;
- `_compute_loss`: brackets each loss micro-batch; forward hooks on the model and its backbone, registered for that
  call only, see the fused outputs (with gradient) and the hidden states (for the fallbacks: forks and group_js of
  batches generation did not serve, projected through the gathered head, head.py);
- `get_high_entropy_mask` (only with a selector): the selection seam.
Every wrapper calls TRL first or always. A recording fault is counted and training goes on; the selection (mask and
loss term) runs outside the fault guards, so it is either computed or training stops with an error naming the cause.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from forkwatch.plugin.monitor import Monitor


def target_model(trainer) -> torch.nn.Module:
    """The causal LM whose forward TRL patched (the base model under a PEFT adapter)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model


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
                recorded = False
                with guard("generation"):
                    monitor.on_generation(out)
                    recorded = True
                monitor.share_evidence(out, recorded)  # every rank, outside the guard: a collective
            return out

        return _generate_and_score_completions

    policy = trainer.accelerator.unwrap_model(trainer.model)

    def model_hook(module, args, kwargs, output):
        if not monitor.capturing:
            return
        if monitor.selector is not None:  # the selection reads these log-probs: a capture fault must not hide
            monitor.on_model_forward(kwargs, output)
            return
        with guard("model_forward"):
            monitor.on_model_forward(kwargs, output)

    def backbone_hook(module, args, output):
        if not monitor.capturing:
            return
        with guard("backbone_forward"):
            monitor.on_backbone_forward(output)

    def compute_loss(original):
        def _compute_loss(model, inputs):
            handles = []
            with guard("loss_begin"):
                monitor.begin_micro_batch(inputs)
                if monitor.capturing:  # hooked for this pass only: generation's forwards stay on the fast path
                    handles.append(policy.register_forward_hook(model_hook, with_kwargs=True))
                    # the hidden states serve the fallbacks (forks, group_js at the loss) and the effective rank
                    if monitor.wants_hidden():
                        handles.append(monitor.backbone.register_forward_hook(backbone_hook))
            try:
                loss = original(model, inputs)
            finally:
                for h in handles:
                    h.remove()
            # the selector's loss term is part of the objective: computed apart from recording, never guarded
            extra = monitor.selection_loss()
            with guard("loss_end"):
                monitor.end_micro_batch()
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
                # not guarded: a selection that cannot be computed stops training (monitor.select names the cause);
                # training densely instead would silently give the user plain GRPO
                return monitor.select(entropies, mask)

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
