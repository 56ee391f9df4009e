"""One rank of a 2-process run (torchrun, gloo on the CPU) for the sharded-training tests: trains each configuration
in turn under the backend named on the command line and writes, per configuration, the losses, grad norms, faults
and fallbacks to OUT/<backend>-<config>-rank<r>.json (records go to OUT/runs). Not collected by pytest."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

import conftest  # noqa: E402

import forkwatch  # noqa: E402

ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # the head really partitioned
         "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "train_batch_size": "auto", "gradient_clipping": "auto"}

FSDP2 = {"fsdp2": "TRANSFORMER_BASED_WRAP", "fsdp2_root": "NO_WRAP"}

CONFIGS = {
    "monitor": (dict(), dict(group_js=True)),
    "ict": (dict(), dict(select="ict", warmup_steps=0, fraction=0.25)),
    # ICT against the reference policy (a frozen whole copy taken at attach, before the backend shards the policy):
    # one dense step moves the policy away from it, the second selects
    "ict_reference": (dict(), dict(select="ict", warmup_steps=1, fraction=0.25, select_options={"against": "reference"})),
    "kl_cov": (dict(steps_per_generation=2), dict(select="kl_cov", fraction=0.2)),
    # completions generate never made: forks through the gathered head; group_js from the loss pass's states
    "ict_fallback": (dict(), dict(select="ict", warmup_steps=0, fraction=0.25)),
    # the same with two micro-batches per generation batch: group_js from the extra pass
    "ict_extra_pass": (dict(steps_per_generation=2), dict(select="ict", warmup_steps=0, fraction=0.25)),
    # the collapse lenses due every step: effective rank from the loss pass's states, probes through the sharded model
    "lenses": (dict(), dict(effective_rank_every=1, probes=[("2+3=", "5"), ("1+1=", "2.")], probe_every=1,
                            lens_budget=None)),
    # "monitor" with fork value measured at every step end: every forward a collective under ZeRO-3 / FSDP2, each
    # rank with its own positions (lockstep); training must equal "monitor" bit for bit
    "fork_value": (dict(), dict(group_js=True, fork_value_every=1, fork_value_positions=8, fork_value_branches=2,
                                fork_value_rollouts=2)),
}


def rollout(prompts, trainer):
    """Completions made without the policy's generate (as vLLM or a custom rollout): evidence from the fallbacks."""
    tok = trainer.processing_class
    ids = [tok(p)["input_ids"] for p in prompts]
    return {"prompt_ids": ids, "completion_ids": [tok(p + str(i % 4) * (1 + i % 3))["input_ids"][len(ids[i]):]
                                                  for i, p in enumerate(prompts)], "logprobs": None}


def force_fsdp2(trainer, wrap: str) -> None:
    """accelerate 1.15 runs FSDP on a CPU as plain MULTI_CPU (DDP); torch's FSDP2 shards fine on a CPU/gloo mesh, so
    the state is set to FSDP2 by hand. `wrap`: "TRANSFORMER_BASED_WRAP" (accelerate 1.15: a unit per decoder layer,
    then the root) or "NO_WRAP" (older accelerate: `fully_shard(root, reshard_after_forward=True)` only)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=True, auto_wrap_policy=wrap, cpu_ram_efficient_loading=False,
        state_dict_type="SHARDED_STATE_DICT")
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def head_is_sharded(trainer) -> bool:
    """After training, outside any forward: the head is an empty ZeRO-3 placeholder or an FSDP2 DTensor shard."""
    from torch.distributed.tensor import DTensor

    w = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings().weight
    return w.numel() == 0 or isinstance(w, DTensor)


def main(out: Path, backend: str, names: list[str]) -> None:
    make = conftest.make_trainer.__wrapped__(out / backend)
    for name in names:
        trl_options, options = CONFIGS[name]
        extra = {"deepspeed": ZERO3} if backend == "zero3" else {}
        trainer = make(max_steps=2, per_device_train_batch_size=4, num_generations=4, model_seed=0,
                       output_dir=str(out / backend / name), **trl_options, **extra)
        if backend in FSDP2:
            force_fsdp2(trainer, FSDP2[backend])
        if name in ("ict_fallback", "ict_extra_pass"):
            trainer.rollout_func = rollout
        cb = forkwatch.attach(trainer, log_dir=str(out / "runs"), run_name=f"{backend}-{name}",
                              record_completions_per_step=None, stat_mantissa_bits=None, **options)
        trainer.train()
        rank = trainer.accelerator.process_index
        result = dict(curve=[(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h],
                      faults=dict(cb.capture.faults.faults),
                      group_js_fallbacks=dict(cb.capture.evidence.group_js_fallbacks),
                      fork_fallbacks=dict(cb.capture.evidence.fork_fallbacks), head_sharded=head_is_sharded(trainer),
                      fork_value=None if cb.fork_value is None else cb.fork_value.measured)
        (out / f"{backend}-{name}-rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(","))
