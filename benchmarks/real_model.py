"""What forkwatch costs on a real pretrained model: SmolLM2-135M-Instruct (134.5 M parameters, vocabulary 49,152) on
the real-model demo's chat-formatted yes/no task, on the CPU.

    .venv/bin/python benchmarks/real_model.py                         # 5 rounds x 5 variants x 10 steps
    .venv/bin/python benchmarks/real_model.py --steps 50 --rounds 3 --variants plain,attach,trl_log_completions
                                                                      # the real-model targets (BENCHMARKS.md)
    .venv/bin/python benchmarks/real_model.py --rounds 1 --steps 2    # a check that it runs

Shape: one prompt x 4 completions of <= 16 tokens per step (prompt ~45 tokens with the chat template), learning rate
1e-5, float32, torch's default thread count (`--threads N` pins it). The model is fetched and converted by
forkwatch/demo/smollm2.py on first use (cached afterwards; not timed).

Method, as benchmarks/overhead.py:
- The figure is the wall time of `trainer.train()` — what a user waits for — including forkwatch's train begin
  (run.json, vocabulary of 49,152 texts), every hand-off, and the flush and close at train end. Trainer construction
  and `attach` are outside it.
- ONE trainer alive at a time, each a fresh `GRPOTrainer` on a deep copy of the same weights; an untimed run first
  (lazy imports, first allocations).
- Each round runs every variant once, in an order rotated per round, so a drift in machine load falls on all; each
  variant's ratio to plain is taken within the round (a pair), and the table gives its median and min-max over
  rounds. The process's CPU time (all threads) over `train()` is reported beside the wall time: load from other
  processes does not inflate it.
- Then, for forkwatch with each selection (none, "ict", "high_entropy") among the variants: forkwatch's own CPU time
  per step on the training thread, by hook (`time.thread_time` around each of its entry points), over one more run;
  within it the lenses' own (probe scorings, effective rank) and the per-token recording's (the generation and loss
  pass hooks less the effective rank), and run.json's `lenses` (the steps each lens ran and was skipped at under the
  lens budget).

Variants: `plain` TRL; `attach` (forkwatch's defaults); `trl_log_completions` (TRL's own `log_completions=True`,
a table of each logged step's completions, written on the training thread); `attach_ict` (select="ict");
`attach_high_entropy` (select="high_entropy"); `attach_fork_value_10` and `attach_fork_value_1` (forkwatch's
defaults with fork value during training every 10 steps / every step at its default budget: what it costs is their
ratio to `attach`, `fork_value_every`'s default stays 0 unless that is <= 1.01 at every 10 steps).

    .venv/bin/python benchmarks/real_model.py --variants attach,attach_fork_value_10,attach_fork_value_1
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import logging
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS: dict[str, tuple[dict | None, dict]] = {  # name: (forkwatch options or None, GRPO overrides)
    "plain": (None, {}),
    "attach": ({}, {}),
    "trl_log_completions": (None, dict(log_completions=True)),
    "attach_ict": (dict(select="ict", warmup_steps=0), {}),  # selecting from step 1, as the timed steps are few
    "attach_high_entropy": (dict(select="high_entropy"), {}),  # no warm-up option: it selects from step 1
    # fork value during training at its default budget (16 positions x 4 branches x 4 rollouts a measurement): every
    # 10 steps (one measurement in a default 10-step run) and every step (the worst case)
    "attach_fork_value_10": (dict(fork_value_every=10), {}),
    "attach_fork_value_1": (dict(fork_value_every=1), {}),
}


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_trainer(model, tok, name: str, steps: int, length: int, tmp: Path):
    from forkwatch.demo import real_model
    from transformers.trainer_callback import PrinterCallback

    import forkwatch

    fw, extra = VARIANTS[name]
    settings = real_model.RealSettings(steps=steps, prompts_per_step=1, num_generations=4,
                                       max_completion_length=length)
    trainer = real_model.make_trainer(copy.deepcopy(model), tok, settings=settings, output_dir=tmp / "out", **extra)
    trainer.remove_callback(PrinterCallback)
    if fw is not None:
        forkwatch.attach(trainer, log_dir=str(tmp / "runs"), **fw)
    return trainer


def timed_train(trainer) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of `trainer.train()`; TRL's printed tables go to /dev/null."""
    gc.collect()
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        t0, c0 = time.perf_counter(), cpu_seconds()
        trainer.train()
        return time.perf_counter() - t0, cpu_seconds() - c0


# the entry points of the per-token recording (generation, the decode-step scorer, the loss pass): their time less
# the effective rank's is what a recorded token costs
RECORDING_HOOKS = ("on_generation", "on_forward", "begin_micro_batch", "on_loss_values", "on_backbone_forward",
                   "end_micro_batch")


def own_time(model, tok, name: str, steps: int, length: int, tmp: Path) -> dict:
    """forkwatch's training-thread CPU seconds per step for one attached run of variant `name`: in all (`total`), by
    entry point (`by_hook`), the lenses' own (`lenses`: probe scorings, effective rank), the per-token recording
    (`recording`: its entry points less the effective rank), the step's own (`step`, median), and run.json's
    `lenses` (the steps each lens ran and was skipped at, their wall time against training time)."""
    import json

    from hook_timer import ENTRY_POINTS, LENS_POINTS, hook_times
    from transformers import TrainerCallback

    step_cpu: list[float] = []

    class StepCpu(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.c0 = time.thread_time()

        def on_step_end(self, *a, **k):
            step_cpu.append(time.thread_time() - self.c0)

    with hook_times(ENTRY_POINTS + LENS_POINTS) as spent:
        trainer = make_trainer(model, tok, name, steps, length, tmp)
        trainer.add_callback(StepCpu())
        timed_train(trainer)
        del trainer
    lens_names = {m for _, _, methods in LENS_POINTS for m in methods}
    per_step = {k: v / steps for k, v in spent.items()}
    by_hook = {k: v for k, v in sorted(per_step.items(), key=lambda kv: -kv[1]) if k not in lens_names}
    run_json = next((tmp / "runs").glob("*/run.json"))
    return {"total": sum(by_hook.values()), "by_hook": by_hook, "step": statistics.median(step_cpu),
            "lenses": {k: per_step.get(k, 0.0) for k in sorted(lens_names)},
            "recording": sum(by_hook.get(k, 0.0) for k in RECORDING_HOOKS) - per_step.get("measure", 0.0),
            "run_json_lenses": json.loads(run_json.read_text()).get("lenses")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="rounds; each runs every variant once")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per train()")
    ap.add_argument("--length", type=int, default=16, help="max completion tokens")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, with plain: {list(VARIANTS)}")
    opts = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    names = ["plain", *[v for v in opts.variants.split(",") if v != "plain"]]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; valid: {list(VARIANTS)}")
    from forkwatch.demo import smollm2

    model, tok = smollm2.load(smollm2.model_dir())
    tmp = Path(tempfile.mkdtemp(prefix="fw-real-bench-"))
    timed_train(make_trainer(model, tok, "attach", 1, opts.length, tmp / "warmup"))  # untimed
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    ratio = {n: [] for n in names[1:]}
    cpu_ratio = {n: [] for n in names[1:]}
    started = time.perf_counter()
    for r in range(opts.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        got = {}
        for name in order:
            trainer = make_trainer(model, tok, name, opts.steps, opts.length, tmp / f"r{r}-{name}")
            got[name] = timed_train(trainer)
            del trainer
            print(f"round {r} {name}: {got[name][0]:.1f} s wall, {got[name][1]:.1f} s cpu", flush=True)
        for n, (w, c) in got.items():
            wall[n].append(w)
            cpu[n].append(c)
        for n in names[1:]:
            ratio[n].append(got[n][0] / got["plain"][0])
            cpu_ratio[n].append(got[n][1] / got["plain"][1])
    own = {n: own_time(model, tok, n, opts.steps, opts.length, tmp / f"own-{n}")
           for n in ("attach", "attach_ict", "attach_high_entropy") if n in names}
    print(f"\nmodel=SmolLM2-135M-Instruct steps={opts.steps} completions=4x<={opts.length} tokens rounds={opts.rounds} "
          f"torch_threads={torch.get_num_threads()} cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f} "
          f"python={platform.python_version()} torch={torch.__version__} "
          f"wall={time.perf_counter() - started:.0f}s")
    print("| variant | train() s (median) | × plain (median, min-max) | cpu × plain (median, min-max) |")
    print("|---|---|---|---|")
    print(f"| plain | {statistics.median(wall['plain']):.1f} | | |")
    for n in names[1:]:
        rs, cs = ratio[n], cpu_ratio[n]
        print(f"| {n} | {statistics.median(wall[n]):.1f} | {statistics.median(rs):.3f} ({min(rs):.3f}-{max(rs):.3f}) "
              f"| {statistics.median(cs):.3f} ({min(cs):.3f}-{max(cs):.3f}) |")
    if "attach" in ratio:  # the targets: attach <= 1.02x plain and not above TRL's log_completions
        got = statistics.median(ratio["attach"])
        verdict = [f"attach {got:.3f}x plain (target <= 1.02x: {'met' if got <= 1.02 else 'NOT met'})"]
        if "trl_log_completions" in ratio:
            trl_x = statistics.median(ratio["trl_log_completions"])
            verdict.append(f"log_completions {trl_x:.3f}x (attach {'not above' if got <= trl_x else 'ABOVE'} it)")
        print("targets: " + "; ".join(verdict))
    for n, own_n in own.items():
        total, step_cpu = own_n["total"], own_n["step"]
        parts = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in own_n["by_hook"].items())
        print(f"{n}: forkwatch {total * 1e3:.1f} ms cpu per step of a {step_cpu:.2f} s step (training thread, "
              f"{total / step_cpu:.2%}); ms/step by hook: {parts}")
        rec = own_n["recording"]
        print(f"{n}: per-token recording {rec * 1e3:.1f} ms cpu per step = {rec / step_cpu:.2%} of a step "
              f"(target <= 0.5 %: {'met' if rec / step_cpu <= 0.005 else 'NOT met'}); lenses' own ms/step: "
              + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in own_n["lenses"].items()))
        lenses = own_n["run_json_lenses"] or {}
        for lens in ("probes", "effective_rank"):
            if isinstance(lenses.get(lens), dict):
                got = lenses[lens]
                print(f"{n}: run.json lenses.{lens}: ran at {got['ran']}, skipped at {got['skipped']}, forced at "
                      f"{got['forced']}, cost {got['cost_s']} s")
        if lenses:
            print(f"{n}: run.json lenses: {lenses.get('seconds')} s of {lenses.get('train_seconds')} s of training "
                  f"(share {lenses.get('share')}, budget {lenses.get('budget')})")


if __name__ == "__main__":
    main()
