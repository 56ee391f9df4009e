"""Every TRL internal forkwatch touches, in one module: the tested releases, the private names `check` verifies at
attach, TRL's batch layout and forkwatch's keys in TRL's batch dict, the row ids, the few trainer attributes read
elsewhere, and the wrappers `install` puts on a trainer. Supporting a new TRL release means reading this file.

Tested: TRL 1.14.2, 1.15.0 and 1.16.0, with transformers 4.57 and 5.x (`make test-trl`). The releases differ in one
place forkwatch relies on, the loss pass's per-token values (`check` decides at attach which way they are read):

- "fused" (TRL 1.15, 1.16): `GRPOTrainer.__init__` patches `model.forward` with TRL's fused LM head
  (`trl.trainer.utils.add_fused_lm_head`), which returns log-probs and entropies without building (B, T, V) logits.
  forkwatch re-adds it with one more output, `log_sum_sq_probs` (Rényi-2 for free; log-probs and entropies are the
  same kernel's), and a forward hook reads the three. TRL 1.15's head has no kernel without Triton on a CUDA/XPU
  device (`trl.kernels` needs Triton): GRPOTrainer's own loss pass then fails with "'NoneType' object has no attribute
  'apply'", with or without forkwatch, so `check` refuses such a trainer at attach, naming the reason.
- "logits" (TRL 1.14): TRL's loss pass builds full logits itself (`_get_per_token_logps_and_entropies`). forkwatch
  takes TRL's own log-probs and entropies from that method's return value and Rényi-2 from the logits the model
  returned, a chunk of positions at a time (`token_math.renyi2_from_logits`: no second (B, T, V) tensor).

Every seam is an instance attribute or a module hook: the class is never patched, so other trainers in the process
are untouched, and the function `install` returns removes them all again. Every wrapper calls TRL first (or
always); a recording fault is counted and training goes on, while the selection (mask and loss term) runs outside
the fault guards, so it is either computed or training stops with an error naming the cause.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from packaging.version import Version

TESTED = (Version("1.14.2"), Version("1.17.0"))  # [low, high): the releases `make test-trl` trains on
TESTED_RANGE = f"trl>={TESTED[0]},<{TESTED[1]}"

# GRPOTrainer's private methods and attributes forkwatch wraps or reads (all present in every tested release)
TRAINER_SEAMS = {
    "_generate_and_score_completions": "wrapped: per-completion facts, row ids, per-position evidence into the batch",
    "_calculate_rewards": "wrapped: the rewards of each reward function",
    "_generate_single_turn": "wrapped: arms the decode-step scorer while TRL generates for training",
    "_compute_loss": "wrapped: brackets each loss micro-batch",
    "_get_per_token_logps_and_entropies": "wrapped on TRL 1.14: the loss pass's log-probs and entropies",
    "get_high_entropy_mask": "replaced when a selector is set: the selection seam",
    "top_entropy_quantile": "set below 1 with a selector, so that TRL calls the selection seam",
    "temperature": "the sampling temperature every distribution is scaled by",
    "num_generations": "the prompt groups",
    "reward_func_names": "the `rewards` map of each completion",
    "reward_weights": "the weighted total reward",
    "loss_type": "how TRL normalises the per-token loss (selectors, loss terms)",
    "epsilon_low": "TRL's clip range (Clip-Cov, KL-Cov, GPPO)",
    "epsilon_high": "TRL's clip range",
    "use_vllm": "a backend whose forwards the decode-step scorer never sees",
    "use_transformers_continuous_batching": "another such backend",
    "num_iterations": "whether the loss pass sees the weights that generated a batch (group_js fallback)",
    "eos_token_ids": "the ids that end a completion (None: the tokenizer's EOS)",
    "ref_model": "TRL's reference model when beta > 0: ICT's reference policy",
    "vllm_importance_sampling_correction": "TRL's per-token importance ratio in the loss",
    "max_completion_length": "dr_grpo's normaliser",
    "_step": "the micro-step within an optimizer step (row ids)",
    "_metrics": "where the `forkwatch/*` scalars are logged for their step",
    "accelerator": "ranks, devices, gathers",
}
UTILS_SEAMS = ("maybe_gather_lm_head_ctx",)  # trl.trainer.utils: gathers a ZeRO-3 head (the fallbacks' projector)
FUSED_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs")  # what forkwatch asks of TRL's fused head

# forkwatch's per-row tensors in TRL's batch dict: they survive TRL's shuffle and split into loss micro-batches
PREFIX = "forkwatch_"
ROW_ID = "forkwatch_row_id"  # (B,) int64: the completion
GROUP_ID = "forkwatch_group_id"  # (B,) int64: its prompt group
GROUP_JS = "forkwatch_group_js"  # (B, T) ICT's score, from generation's logits or a fallback
GROUP_JS_PENDING = "forkwatch_group_js_pending"  # (B,) bool: to be scored from the loss pass's own states
ALT_IDS, ALT_PROBS, ALT_RANK = "forkwatch_alt_ids", "forkwatch_alt_probs", "forkwatch_alt_rank"  # (B, T, k), (B, T)
REFERENCE_JS = "forkwatch_reference_js"  # (B, T) JS against the initial policy (ict, against="reference")

LossPath = Literal["fused", "logits"]


# ------------------------------------------------------------------------------------------------ at attach
def check(trainer) -> LossPath:
    """Refuse a trainer whose TRL lacks what forkwatch uses (ValueError naming the missing internals and the tested
    range) or cannot compute its own loss here; warn outside the tested range when everything is present.
    -> how the loss pass's per-token values are read on this TRL ("fused" or "logits")."""
    import trl
    from trl.trainer import utils

    version = Version(trl.__version__)
    missing = [n for n in TRAINER_SEAMS if not hasattr(trainer, n)]
    missing += [f"trl.trainer.utils.{n}" for n in UTILS_SEAMS if not hasattr(utils, n)]
    if missing:
        raise ValueError(f"forkwatch cannot attach to trl {version}: it lacks {missing}, which forkwatch wraps or "
                         f"reads (plugin/trl_seams.py). forkwatch is tested with {TESTED_RANGE}: install a release "
                         "in that range.")
    if getattr(trainer.args, "use_liger_kernel", False) and getattr(trainer.args, "use_liger_loss", False):
        raise ValueError("forkwatch needs TRL's per-token loss pass, which a fused Liger loss replaces; "
                         "set use_liger_loss=False")
    if not TESTED[0] <= version < TESTED[1]:
        warnings.warn(f"forkwatch is tested with {TESTED_RANGE}; trl {version} has every internal forkwatch uses, "
                      "but may have changed what they do. Pin trl to the tested range if records look wrong.",
                      stacklevel=3)
    if not hasattr(utils, "add_fused_lm_head"):
        if getattr(trainer.args, "use_liger_kernel", False):
            raise ValueError(f"forkwatch reads Rényi-2 from the logits trl {version}'s loss pass computes; "
                             "use_liger_kernel=True computes the log-probs without them: set use_liger_kernel=False")
        return "logits"
    problem = fused_head_problem(trainer.accelerator.device.type)
    if problem:
        raise ValueError(problem)
    return "fused"


def fused_head_problem(device: str) -> str | None:
    """Why the installed TRL's fused LM head cannot run on `device` ("cpu", "cuda", ...), or None (also None when
    this TRL has no fused head). TRL 1.15 imports its kernel from trl.kernels, which needs Triton (the kernel is
    None without it) and has no torch fallback; TRL 1.16's has one."""
    import trl
    from trl.trainer import utils

    if not hasattr(utils, "add_fused_lm_head"):
        return None
    kernel = getattr(utils, "_ChunkedLogProbFunction", "absent")
    cause = None
    if kernel is None:
        cause = "its kernel module trl.kernels needs Triton, which is not importable here"
    elif kernel != "absent" and not hasattr(sys.modules.get("trl.kernels.chunked_logprob"), "_use_triton") \
            and device not in ("cuda", "xpu"):
        cause = f"its Triton kernel has no torch fallback and the trainer's device is {device}"
    if cause is None:
        return None
    return (f"trl {trl.__version__}'s fused LM head (trl.trainer.utils.add_fused_lm_head, which GRPOTrainer installs "
            f"and calls in every loss pass) cannot run here: {cause}. GRPOTrainer itself would fail at its first loss "
            "pass (AttributeError: 'NoneType' object has no attribute 'apply'), with or without forkwatch. Train on a "
            "CUDA/XPU device with Triton installed, or install trl==1.14.2 or trl>=1.16,<1.17, whose loss pass runs "
            "on any device.")


# ------------------------------------------------------------------------------------------------ TRL's batch layout
def response_mask(batch: dict[str, Any]) -> torch.Tensor:
    """(B, T) the tokens TRL's loss sees: completion_mask, times tool_mask in tool-calling runs (tool output tokens
    are part of the completion but not of the policy's actions)."""
    mask = batch["completion_mask"]
    return mask if batch.get("tool_mask") is None else mask * batch["tool_mask"]


def eos_ids(trainer) -> list[int]:
    """The ids that end a completion for TRL (`eos_token_ids` when set, else the tokenizer's EOS), sorted."""
    ids = getattr(trainer, "eos_token_ids", None) or [trainer.processing_class.eos_token_id]
    return sorted(int(i) for i in ids)


def group_of(global_row: torch.Tensor | int, num_generations: int) -> torch.Tensor | int:
    """Prompt group of each row, by its row in the generation batch gathered over ranks (rank * B + row): TRL's
    RepeatSampler puts the G rollouts of a prompt on consecutive global rows."""
    return global_row // num_generations


def predicting_states(hidden: torch.Tensor, prompt_len: int, t: int) -> torch.Tensor:
    """(B, T, H) the states that predicted each completion token, from a forward over prompt + completion (B, P + T,
    H): position P - 1 + i predicts completion token i."""
    return hidden[:, prompt_len - 1 : prompt_len - 1 + t]


def rewards_of(trainer, rewards: torch.Tensor | None, rank: int, b: int, device: torch.device
               ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """This rank's (b, F) per-function rewards from `_calculate_rewards`' result (gathered over ranks, in generation
    order) and their weighted total (b,) (NaN when unknown)."""
    if rewards is None or rewards.size(0) < (rank + 1) * b:
        return None, torch.full((b,), float("nan"), device=device)
    mine = rewards[rank * b : (rank + 1) * b].float().to(device)
    return mine, (mine * trainer.reward_weights.float().to(device)).nansum(1)


# ------------------------------------------------------------------------------------------------ row ids
ROWS_PER_GENERATION = 2**20  # how many rows of one generation batch (all ranks together) the ids can tell apart


def generation_key(trainer) -> int:
    """The key of the generation call TRL is making now, unique within a run and across a resume: one per optimizer
    micro-step (global_step * GA + micro-step)."""
    ga = trainer.args.gradient_accumulation_steps
    return trainer.state.global_step * ga + trainer._step % ga


def completion_and_group_ids(gen_key: int, rank: int, b: int, num_generations: int, device: torch.device
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(b,) completion ids and (b,) group ids of this rank's b rows of generation `gen_key`. Rows are numbered over
    ranks in the order TRL gathers rewards (global row = rank * b + row); a completion's id is
    gen_key * ROWS_PER_GENERATION + global row, its group's the same with the group in place of the row, so a
    micro-batch row finds its generation row again from its id alone."""
    global_row = rank * b + torch.arange(b, device=device)
    base = gen_key * ROWS_PER_GENERATION
    return base + global_row, base + group_of(global_row, num_generations)


def rows_in_generation(row_ids: torch.Tensor, gen_key: int, offset: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each micro-batch row id: its row in this rank's generation batch `gen_key` (whose first row is global row
    `offset`, b rows), clamped into [0, b), and whether it is one of them (False: a row of another generation)."""
    local = row_ids - (gen_key * ROWS_PER_GENERATION + offset)
    ok = (local >= 0) & (local < b)
    return local.clamp(0, b - 1), ok


# ------------------------------------------------------------------------------------------------ the model
def target_model(trainer) -> torch.nn.Module:
    """The causal LM whose forward TRL patched (the base model under a PEFT adapter)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model


def head_logit_scale(text_config) -> float:
    """The multiplier TRL's fused head applies to the logits before softcapping (trl.trainer.utils.add_fused_lm_head
    reads the same config fields), so a projection through the gathered head matches its distributions."""
    scale = getattr(text_config, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        scale = getattr(text_config, name, None) if scale is None else scale
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return 1.0 if scale is None else float(scale)


def gathered_head(weight: torch.Tensor, bias: torch.Tensor | None):
    """TRL's own context that gathers a ZeRO-3-partitioned head for its duration (a collective; no-op elsewhere)."""
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    return maybe_gather_lm_head_ctx(weight, bias)


def reference_model(trainer) -> torch.nn.Module | None:
    """TRL's own reference model (built and prepared for DeepSpeed / FSDP by TRL when beta > 0), or None."""
    return trainer.ref_model


def adapters_disabled(trainer):
    """A PEFT policy with its adapters off (TRL's own `use_adapter`, as its KL term uses it): the initial policy."""
    from trl.trainer.utils import use_adapter

    model = trainer.accelerator.unwrap_model(trainer.model)
    return use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None)


def loss_constants(trainer, inputs: dict[str, Any]) -> dict[str, Any]:
    """How TRL's `_compute_loss` reduces this micro-batch's per-token policy loss, as keyword arguments of
    `selection.policy_loss.aggregate_loss` plus the per-token importance ratio TRL applies first (None when it
    applies none). GA = current_gradient_accumulation_steps in train mode, 1 in eval (TRL's `model.training`
    test); the dapo family divides by num_items_in_batch / processes · GA / steps_per_generation in train mode."""
    loss_type = trainer.loss_type
    train = trainer.model.training
    ratio = None
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction and loss_type != "vespo":
        ratio = inputs["importance_sampling_ratio"]
    batch_normaliser = None
    if loss_type in ("dapo", "cispo", "vespo"):
        batch_normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
        if train:
            batch_normaliser = (batch_normaliser * trainer.current_gradient_accumulation_steps
                                / trainer.args.steps_per_generation)
    return dict(loss_type=loss_type, accumulation=trainer.current_gradient_accumulation_steps if train else 1.0,
                max_completion_length=trainer.max_completion_length, batch_normaliser=batch_normaliser,
                importance_ratio=ratio)


# ------------------------------------------------------------------------------------------------ fork value
def policy_for_generation(trainer):
    """The policy as TRL unwraps it to generate (`trl.models.unwrap_model_for_generation`, a context: DDP unwrapped,
    ZeRO-3's weights gathered when `ds3_gather_for_generation`, gradient checkpointing off meanwhile and back on
    with the run's own kwargs where the release takes them, 1.16)."""
    import inspect

    from trl.models import unwrap_model_for_generation

    kwargs = {"gather_deepspeed3_params": trainer.args.ds3_gather_for_generation}
    if "gradient_checkpointing_kwargs" in inspect.signature(unwrap_model_for_generation).parameters:
        kwargs["gradient_checkpointing_kwargs"] = trainer.args.gradient_checkpointing_kwargs
    return unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator, **kwargs)


def weights_sharded(trainer) -> bool:
    """Whether the policy's weights are sharded across ranks (DeepSpeed ZeRO-3, FSDP): every forward a collective."""
    from trl.distributed import DistributedBackend

    acc = trainer.accelerator
    return acc.num_processes > 1 and (DistributedBackend(acc).is_zero3 or bool(getattr(trainer, "is_fsdp_enabled",
                                                                                          False)))


def custom_rollouts(trainer) -> str | None:
    """What makes completions that `generate` cannot make again: "a rollout_func", "tools", or None."""
    if getattr(trainer, "rollout_func", None) is not None:
        return "a rollout_func"
    return "tools" if getattr(trainer, "tools", None) else None


def log_scalars(trainer, scalars: dict[str, float], prefix: str) -> None:
    """Add `scalars` to TRL's metric buffer for this step: TRL averages it over the logging window and logs it with
    its own `entropy`, so every `report_to` integration shows them."""
    metrics = trainer._metrics["train"]
    for k, v in scalars.items():
        metrics[prefix + k].append(v)


# ------------------------------------------------------------------------------------------------ the wrappers
def install(trainer, capture, path: LossPath) -> Callable[[], None]:
    """Install every seam on `trainer` for `capture` (plugin/capture.py); -> a function that removes them all."""
    undo: list[Callable[[], None]] = []
    guard = capture.faults.guard
    target = target_model(trainer)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    scorer = capture.evidence.scorer
    selects = capture.selection_seam.selector is not None

    def wrap(name: str, make: Callable[[Callable], Callable]) -> None:
        original = getattr(trainer, name)
        setattr(trainer, name, functools.wraps(original)(make(original)))
        undo.append(lambda: trainer.__dict__.pop(name, None))

    if path == "fused":
        from trl.trainer.utils import add_fused_lm_head

        previous_forward = target.__dict__.get("forward")
        add_fused_lm_head(target, temperature=trainer.temperature,
                          cast_lm_head_to_fp32=trainer.args.cast_lm_head_to_fp32, outputs=FUSED_OUTPUTS)
        undo.append(lambda: setattr(target, "forward", previous_forward) if previous_forward else None)

    def read_model_output(kwargs: dict[str, Any], output: Any) -> None:
        if not torch.is_grad_enabled():  # the old-logprob pass
            return
        if path == "fused" and kwargs.get("fused_lm_head"):
            capture.on_loss_values(logprob=output.log_probs, entropy=output.entropy, renyi2=-output.log_sum_sq_probs)
        elif path == "logits" and getattr(output, "logits", None) is not None:
            capture.on_loss_logits(output.logits)

    def model_hook(module, args, kwargs, output):
        if not capture.capturing:
            return
        if selects:  # the selection reads these log-probs: a capture fault must not hide
            read_model_output(kwargs, output)
            return
        with guard("model_forward"):
            read_model_output(kwargs, output)

    def backbone_hook(module, args, output):
        if not capture.capturing:
            return
        with guard("backbone_forward"):
            capture.on_backbone_forward(output)

    def rewards(original):
        def _calculate_rewards(*args, **kwargs):
            out = original(*args, **kwargs)
            capture.last_rewards = out.detach() if trainer.model.training else None
            return out

        return _calculate_rewards

    def generation(original):
        def _generate_and_score_completions(inputs):
            if scorer is not None:
                scorer.reset()
            out = original(inputs)
            if trainer.model.training:
                recorded = False
                with guard("generation"):
                    capture.on_generation(out, inputs)
                    recorded = True
                capture.share_evidence(out, recorded)  # every rank, outside the guard: a collective
            return out

        return _generate_and_score_completions

    def compute_loss(original):
        def _compute_loss(model, inputs):
            handles = []
            with guard("loss_begin"):
                capture.begin_micro_batch(inputs)
                if capture.capturing:  # hooked for this pass only: generation's forwards stay on the fast path
                    handles.append(policy.register_forward_hook(model_hook, with_kwargs=True))
                    # the hidden states serve the fallbacks (forks, group_js at the loss) and the effective rank
                    if capture.wants_hidden():
                        handles.append(capture.backbone.register_forward_hook(backbone_hook))
            try:
                loss = original(model, inputs)
            finally:
                for h in handles:
                    h.remove()
            # the selector's loss term is part of the objective: computed apart from recording, never guarded
            extra = capture.selection_loss()
            with guard("loss_end"):
                capture.end_micro_batch()
            return loss if extra is None else loss + extra

        return _compute_loss

    def logps_and_entropies(original):  # TRL 1.14: the loss pass's values, as TRL returns them
        def _get_per_token_logps_and_entropies(*args, **kwargs):
            out = original(*args, **kwargs)
            if capture.capturing and torch.is_grad_enabled() and out[1] is not None:
                if selects:
                    capture.on_loss_values(logprob=out[0], entropy=out[1])
                else:
                    with guard("model_forward"):
                        capture.on_loss_values(logprob=out[0], entropy=out[1])
            return out

        return _get_per_token_logps_and_entropies

    def single_turn(original):
        def _generate_single_turn(*args, **kwargs):
            if not trainer.model.training:
                return original(*args, **kwargs)
            # backends whose forward this hook never sees: the capture falls back to its extra pass
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
    if scorer is not None:
        wrap("_generate_single_turn", single_turn)
    wrap("_compute_loss", compute_loss)
    if path == "logits":
        wrap("_get_per_token_logps_and_entropies", logps_and_entropies)

    if selects:

        def selection(original):
            def get_high_entropy_mask(entropies, mask, threshold):
                # not guarded: a selection that cannot be computed stops training (capture.select names the cause);
                # training densely instead would silently give the user plain GRPO
                return capture.select(entropies, mask)

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
