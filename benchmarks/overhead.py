"""GRPO step time with and without forkwatch: interleaved rounds in one process, median of per-step times.

    .venv/bin/python benchmarks/overhead.py --config tiny --rounds 6
    .venv/bin/python benchmarks/overhead.py --config bigvocab --rounds 5 --selectors --memory
    .venv/bin/python benchmarks/overhead.py --device cuda --config qwen0.5b --rounds 5 --memory   # needs a GPU

Method (why each piece is there):
- ONE trainer alive at a time. Every (round, variant) builds a fresh `GRPOTrainer` on a deep copy of the same
  initial weights, trains `--warmup + --steps` steps, and is deleted (gc) before the next one. Three 136M-parameter
  trainers alive at once made plain TRL look 30x slower than TRL + forkwatch on the big-vocab config (memory
  pressure and allocator state carried between trainers), so nothing is shared between variants but the weights.
- The first `--warmup` steps of every trainer are dropped (lazy init, first allocation of the vocab-sized buffers).
- Rounds interleave the variants and rotate their order (A B C, B C A, ...), so a drift in machine load (this box is
  shared) falls on every variant alike; the statistic is the median over all timed steps of all rounds.
- torch threads are fixed (`--threads`, default 1) so the other tenant of the CPU cannot change our parallelism.
- Step time is measured from on_step_begin to on_step_end (CUDA synchronised), so forkwatch's step-end work (the
  callback runs before the timer's on_step_end) is inside it. Trainer construction and `attach` are outside.
- Peak memory (`--memory`): one subprocess per variant (same warm-up + steps, one round); CPU: the process's
  `ru_maxrss` (resident set high-water mark, includes Python, torch and the model); CUDA: max_memory_allocated.

Variants: plain TRL; `monitor` (forkwatch default, group_js off); `monitor+group_js`; with `--selectors`, every
registry selector (`select=<name>`, ict with warmup_steps=0 so its scores are used from step 1), reported against
`monitor` (the loss-hook targets) as well as against plain.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

CONFIGS = {
    # name: (model kwargs, GRPO overrides)
    "tiny": (dict(), dict(per_device_train_batch_size=8, num_generations=4, max_completion_length=16)),
    "bigvocab": (
        dict(vocab_size=151_936, hidden=896, layers=2, heads=14, kv_heads=2, intermediate=1024, tie_embeddings=True),
        dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=16),
    ),
    "qwen0.5b": ("qwen_0_5b", dict(per_device_train_batch_size=16, num_generations=8, max_completion_length=256)),
}
WORKER_INTERVAL_S = 1.0  # ForkwatchConfig.worker_interval_s, the default every variant runs with
BASE_VARIANTS: dict[str, dict | None] = {
    "plain": None, "monitor": dict(group_js=False), "monitor+group_js": dict(group_js=True),
}


def selector_variants() -> dict[str, dict]:
    from forkwatch.plugin import registry

    return {f"select={n}": dict(select=n, **({"warmup_steps": 0} if n == "ict" else {}))
            for n in registry.selector_names()}


class StepTimer:
    """Wall time and the training thread's CPU time of each step (the latter is what load from other processes on
    a shared CPU does not inflate; it excludes forkwatch's worker and writer threads, which the wall time of a
    saturated CPU includes)."""

    def __init__(self, device: str) -> None:
        self.device, self.times, self.cpu, self._t0, self._c0 = device, [], [], 0.0, 0.0

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, *a, **k):
        self._sync()
        self._t0, self._c0 = time.perf_counter(), time.thread_time()

    def on_step_end(self, *a, **k):
        self._sync()
        self.times.append(time.perf_counter() - self._t0)
        self.cpu.append(time.thread_time() - self._c0)


def base_model(config: str, device: str):
    from forkwatch.demo.tiny import char_tokenizer, qwen_0_5b_shape, tiny_model

    model_kw, _ = CONFIGS[config]
    if model_kw == "qwen_0_5b":
        model = qwen_0_5b_shape()
    else:
        kw = dict(model_kw)
        model = tiny_model(kw.pop("vocab_size", len(char_tokenizer())), **kw)
    return model.to(torch.bfloat16) if device == "cuda" else model


def run_variant(config: str, device: str, model, fw: dict | None, steps: int, tmp: Path) -> StepTimer:
    """Train a fresh trainer on a copy of `model` for `steps` steps; its timer (forkwatch attached if fw)."""
    import conftest
    from datasets import Dataset
    from forkwatch.demo.tiny import char_tokenizer
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    import forkwatch

    _, grpo = CONFIGS[config]
    args = conftest.tiny_grpo_config(
        str(tmp / "out"), max_steps=steps, use_cpu=device == "cpu", bf16=device == "cuda", logging_steps=1, **grpo,
    )
    trainer = GRPOTrainer(model=copy.deepcopy(model), args=args, reward_funcs=[conftest.digit_reward],
                          train_dataset=Dataset.from_dict({"prompt": conftest.PROMPTS * 64}),
                          processing_class=char_tokenizer())
    if fw is not None:
        forkwatch.attach(trainer, log_dir=str(tmp / "runs"), **fw)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # logging_steps=1 (forkwatch's scalars are logged) without the noise
    timer = StepTimer(device)
    trainer.add_callback(type("Timer", (TrainerCallback,), {
        "on_step_begin": timer.on_step_begin, "on_step_end": timer.on_step_end})())
    trainer.train()
    del trainer
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return timer


def peak_memory(opts, name: str) -> float:
    """GiB: ru_maxrss of a subprocess that runs only `name` (CPU), or its CUDA max_memory_allocated."""
    cmd = [sys.executable, __file__, "--config", opts.config, "--device", opts.device, "--threads", str(opts.threads),
           "--warmup", str(opts.warmup), "--steps", str(opts.steps), "--only", name]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_gib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=list(CONFIGS), default="tiny")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of every trainer")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--selectors", action="store_true", help="add one variant per registry selector")
    ap.add_argument("--memory", action="store_true", help="peak memory per base variant (one subprocess each)")
    ap.add_argument("--only", help=argparse.SUPPRESS)  # internal: the --memory subprocess
    opts = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(opts.threads)
    variants = dict(BASE_VARIANTS)
    if opts.selectors or (opts.only or "").startswith("select="):
        variants.update(selector_variants())
    tmp = Path(tempfile.mkdtemp(prefix="fw-bench-"))
    model = base_model(opts.config, opts.device)
    if opts.only:
        if opts.device == "cuda":
            model = model.cuda()
            torch.cuda.reset_peak_memory_stats()
        run_variant(opts.config, opts.device, model, variants[opts.only], opts.warmup + opts.steps, tmp)
        peak = (torch.cuda.max_memory_allocated() if opts.device == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        print(json.dumps({"peak_gib": peak / 2**30}))
        return

    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    t_start = time.perf_counter()
    for r in range(opts.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotated: no variant always first
            timer = run_variant(opts.config, opts.device, model, variants[name], opts.warmup + opts.steps,
                                tmp / f"r{r}-{name}")
            times[name].extend(timer.times[opts.warmup:])
            cpu[name].extend(timer.cpu[opts.warmup:])
    wall = time.perf_counter() - t_start
    peak = {name: peak_memory(opts, name) for name in BASE_VARIANTS} if opts.memory else {}
    print(f"config={opts.config} device={opts.device} threads={opts.threads} rounds={opts.rounds} "
          f"warmup={opts.warmup} timed steps/round={opts.steps} wall={wall:.0f}s")
    span = opts.steps * statistics.median(times["monitor"])
    if span < 10 * WORKER_INTERVAL_S:  # the steps after a trainer's last hand-off are handed over at train end, untimed
        print(f"WARNING: the timed steps of one trainer span {span:.2f} s, under 10 of forkwatch's {WORKER_INTERVAL_S} s "
              "hand-offs to its worker: the mean may under-count the worker's cost. Use more --steps.")
    print(table(times, cpu, peak))


def table(times: dict[str, list[float]], cpu: dict[str, list[float]], peak: dict[str, float]) -> str:
    """Median (a typical step) and mean (throughput: it includes the steps that hand work to forkwatch's worker and
    any contention the worker causes) of each variant, against plain TRL and, for selectors, against `monitor`."""
    med = {n: statistics.median(ts) for n, ts in times.items()}
    mean = {n: statistics.fmean(ts) for n, ts in times.items()}
    cmean = {n: statistics.fmean(ts) for n, ts in cpu.items()}
    lines = [f"{'variant':<20}{'median ms':>10}{'mean ms':>9}{'x plain':>9}{'(mean)':>8}{'x monitor':>11}{'(mean)':>8}"
             f"{'cpu x plain':>13}{'peak GiB':>10}"]
    for name in times:
        sel = name.startswith("select=")
        rel = f"{med[name] / med['monitor']:.3f}" if sel else "-"
        mrel = f"{mean[name] / mean['monitor']:.3f}" if sel else "-"
        mem = f"{peak[name]:.2f}" if name in peak else "-"
        lines.append(f"{name:<20}{1000 * med[name]:>10.1f}{1000 * mean[name]:>9.1f}{med[name] / med['plain']:>9.3f}"
                     f"{mean[name] / mean['plain']:>8.3f}{rel:>11}{mrel:>8}{cmean[name] / cmean['plain']:>13.3f}"
                     f"{mem:>10}")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
