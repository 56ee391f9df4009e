"""Step time of plain TRL vs forkwatch at a 152k vocabulary: the 2-layer "bigvocab" model and a realistic-depth one
with Qwen2.5-0.5B's shape (24 layers, hidden 896, vocabulary 151,936, random init), on the CPU.

    .venv/bin/python benchmarks/realistic.py --config bigvocab --rounds 3 --steps 3
    .venv/bin/python benchmarks/realistic.py --config qwen0.5b --rounds 2 --steps 2
    .venv/bin/python benchmarks/realistic.py --config bigvocab --hook-cost --rounds 4
    .venv/bin/python benchmarks/realistic.py --config bigvocab --own-time --warmup 1 --steps 3 --variants generate/monitor
    .venv/bin/python benchmarks/realistic.py --config qwen0.5b --device cuda --rounds 5 --steps 5   # needs a GPU (bf16)

Two generation paths, each with its own plain baseline:
- `generate`: TRL generates with the policy; fork alternatives and group_js are taken from generation's logits.
- `rollout`: completions come from a custom `rollout_func` (what vLLM or an agent loop gives the trainer; here fixed
  random tokens, so no generation time is in the step, which makes every ratio an upper bound): fork alternatives
  are projected through the gathered head at the loss pass, and ICT's group_js is scored from the loss pass's own
  hidden states (one micro-batch per generation batch).

Method, as benchmarks/overhead.py: one trainer alive at a time, a fresh `GRPOTrainer` on a deep copy of the same
initial weights per (round, variant), the first `--warmup` steps of each dropped, variants interleaved with their
order rotated per round, torch threads fixed. Reported per variant: the median wall step time over all timed steps,
the spread (min-max of the per-round medians), the training thread's CPU time (`time.thread_time`, which load from
other processes does not inflate), and the ratios to `plain` and to `monitor` of the same path.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

CONFIGS = {
    "bigvocab": dict(layers=2, intermediate=1024, batch=4, generations=4, length=16),
    "qwen0.5b": dict(layers=24, intermediate=4864, batch=4, generations=4, length=16),
}
VARIANTS = {  # name: (path, forkwatch options or None for plain TRL)
    "generate/plain": ("generate", None),
    "generate/monitor": ("generate", dict()),
    "generate/ict": ("generate", dict(select="ict", warmup_steps=0)),
    "rollout/plain": ("rollout", None),
    "rollout/monitor": ("rollout", dict()),
    "rollout/ict": ("rollout", dict(select="ict", warmup_steps=0)),
}


def make_model(config: str, device: str):
    from forkwatch.demo.tiny import qwen_0_5b_shape

    c = CONFIGS[config]
    model = qwen_0_5b_shape(layers=c["layers"], intermediate=c["intermediate"])
    return model.to(torch.bfloat16) if device == "cuda" else model


def fixed_rollout(length: int, vocab: int):
    """Completions of `length` seeded random tokens, made without the policy (no logits reach forkwatch)."""
    def rollout(prompts, trainer):
        tok = trainer.processing_class
        gen = torch.Generator().manual_seed(len(trainer.state.log_history))
        ids = torch.randint(10, vocab, (len(prompts), length), generator=gen).tolist()
        return {"prompt_ids": [tok(p)["input_ids"] for p in prompts], "completion_ids": ids, "logprobs": None}

    return rollout


class StepTimer:
    def __init__(self, device: str) -> None:
        self.device, self.wall, self.cpu, self.fw = device, [], [], []

    def on_log(self, args, state, control, logs=None, **k):
        # forkwatch's own time on the training thread this step (its hooks and step-end work)
        if logs and "forkwatch/forkwatch_seconds" in logs:
            self.fw.append(logs["forkwatch/forkwatch_seconds"])

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, *a, **k):
        self._sync()
        self._t0, self._c0 = time.perf_counter(), time.thread_time()

    def on_step_end(self, *a, **k):
        self._sync()
        self.wall.append(time.perf_counter() - self._t0)
        self.cpu.append(time.thread_time() - self._c0)


def run(config: str, device: str, model, variant: str, steps: int, tmp: Path) -> StepTimer:
    import conftest
    from datasets import Dataset
    from forkwatch.demo.tiny import char_tokenizer
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOTrainer

    import forkwatch

    c = CONFIGS[config]
    path, fw = VARIANTS[variant]
    args = conftest.tiny_grpo_config(
        str(tmp / "out"), max_steps=steps, use_cpu=device == "cpu", bf16=device == "cuda",
        per_device_train_batch_size=c["batch"], num_generations=c["generations"], max_completion_length=c["length"])
    trainer = GRPOTrainer(model=copy.deepcopy(model), args=args, reward_funcs=[conftest.digit_reward],
                          train_dataset=Dataset.from_dict({"prompt": conftest.PROMPTS * 64}),
                          processing_class=char_tokenizer())
    if path == "rollout":
        trainer.rollout_func = fixed_rollout(c["length"], model.config.vocab_size)
    if fw is not None:
        forkwatch.attach(trainer, log_dir=str(tmp / "runs"), **fw)
    trainer.remove_callback(PrinterCallback)
    timer = StepTimer(device)
    trainer.add_callback(type("Timer", (TrainerCallback,), {
        "on_step_begin": timer.on_step_begin, "on_step_end": timer.on_step_end, "on_log": timer.on_log})())
    trainer.train()
    del trainer
    gc.collect()
    return timer


def hook_cost(opts) -> None:
    """Per decode step: the generation-time fork evidence (top-k probabilities, the sampled token's rank) on (B, V) logits,
    against one decode forward of the model (the work it rides on), medians of interleaved repeats."""
    from forkwatch.plugin import token_math as metrics

    c = CONFIGS[opts.config]
    model = make_model(opts.config, opts.device).eval()
    b = c["batch"]
    z = torch.randn(b, model.config.vocab_size) * 3
    tok = torch.randint(0, model.config.vocab_size, (b,))
    prompt = torch.randint(0, model.config.vocab_size, (b, 24))
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).past_key_values
        hook, fwd = [], []
        for _ in range(opts.rounds * 5):
            t0 = time.thread_time()
            metrics.topk_probs(z, 5, 0.7)  # what the generation hook does per decode step (gen_evidence.py)
            metrics.rank_of(z, tok)
            hook.append(time.thread_time() - t0)
            t0 = time.thread_time()
            model(input_ids=tok[:, None], past_key_values=copy.deepcopy(cache), use_cache=True)
            fwd.append(time.thread_time() - t0)
    h, f = statistics.median(hook), statistics.median(fwd)
    print(f"config={opts.config} B={b} V={model.config.vocab_size}: fork evidence {h * 1e3:.2f} ms per decode step, "
          f"decode forward {f * 1e3:.1f} ms (cpu time, median of {len(hook)}): {h / f:.2%}")


def own_time(opts) -> None:
    """forkwatch's CPU time per step on the training thread, by hook (`time.thread_time` around each of forkwatch's
    entry points), for one monitored trainer: what load from other processes does not inflate."""
    from hook_timer import hook_times

    model = make_model(opts.config, opts.device)
    steps = opts.warmup + opts.steps
    with tempfile.TemporaryDirectory() as tmp, hook_times() as spent:
        timer = run(opts.config, opts.device, model, opts.variants.split(",")[0], steps, Path(tmp))
    step_cpu = statistics.median(timer.cpu[opts.warmup:])
    total = sum(spent.values()) / steps
    parts = ", ".join(f"{k} {v / steps * 1e3:.1f}" for k, v in sorted(spent.items(), key=lambda kv: -kv[1]))
    print(f"config={opts.config} variant={opts.variants.split(',')[0]}: forkwatch {total * 1e3:.1f} ms of a "
          f"{step_cpu:.2f} s step ({total / step_cpu:.2%}; cpu time per step, all {steps} steps); ms/step: {parts}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=list(CONFIGS), default="bigvocab")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--hook-cost", action="store_true", help="only time the generation-time fork evidence")
    ap.add_argument("--own-time", action="store_true", help="forkwatch's CPU time per step by hook (first variant)")
    opts = ap.parse_args()
    torch.set_num_threads(opts.threads)
    if opts.hook_cost:
        return hook_cost(opts)
    if opts.own_time:
        return own_time(opts)
    torch.manual_seed(0)
    names = opts.variants.split(",")
    model = make_model(opts.config, opts.device)
    if opts.device == "cuda":
        model = model.cuda()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    rounds: dict[str, list[float]] = {n: [] for n in names}
    fw: dict[str, list[float]] = {n: [] for n in names}
    t0 = time.time()
    for r in range(opts.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            with tempfile.TemporaryDirectory() as tmp:
                timer = run(opts.config, opts.device, model, name, opts.warmup + opts.steps, Path(tmp))
            w, c = timer.wall[opts.warmup:], timer.cpu[opts.warmup:]
            wall[name] += w
            cpu[name] += c
            rounds[name].append(statistics.median(w))
            fw[name] += timer.fw[opts.warmup:]
            print(f"round {r} {name}: wall {statistics.median(w):.3f} s, cpu {statistics.median(c):.3f} s",
                  flush=True)
    print(f"\nconfig={opts.config} device={opts.device} threads={opts.threads} rounds={opts.rounds} "
          f"warmup={opts.warmup} steps={opts.steps} elapsed={time.time() - t0:.0f}s")
    print("| variant | wall median (s) | per-round spread (s) | cpu median (s) | forkwatch s/step | × plain (wall / cpu) "
          "| × monitor (wall / cpu) |")
    print("|---|---|---|---|---|---|---|")
    med = {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in names}
    for n in names:
        path = n.split("/")[0]
        ratio = []
        for base in ("plain", "monitor"):
            b = med.get(f"{path}/{base}")
            ratio.append(f"{med[n][0] / b[0]:.3f} / {med[n][1] / b[1]:.3f}" if b else "-")
        own = f"{statistics.median(fw[n]):.3f}" if fw[n] else "-"
        print(f"| {n} | {med[n][0]:.3f} | {min(rounds[n]):.3f}-{max(rounds[n]):.3f} | {med[n][1]:.3f} | {own} | "
              f"{ratio[0]} | {ratio[1]} |")


if __name__ == "__main__":
    main()
