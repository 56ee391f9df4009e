"""What attaching forkwatch costs a user: whole `trainer.train()` time with and without it, pair by pair.

    .venv/bin/python benchmarks/overhead.py --config tiny --steps 200 --rounds 5                 # torch's default threads
    .venv/bin/python benchmarks/overhead.py --config tiny --steps 200 --rounds 5 --threads 1
    .venv/bin/python benchmarks/overhead.py --config bigvocab --steps 40 --rounds 4
    .venv/bin/python benchmarks/overhead.py --config tiny --variants plain,forkwatch,trl_log_completions
    .venv/bin/python benchmarks/overhead.py --config tiny --steps 300 --rounds 6 --variants forkwatch,trl_log_completions
    .venv/bin/python benchmarks/overhead.py --config tiny --steps 100 --hook-times                # forkwatch per hook
    .venv/bin/python benchmarks/overhead.py --steps 100 --hook-times --variants forkwatch+no_probes  # the same, probes off

The lead's figure (whole train() at torch's default threads, on a quiet machine): the `--steps 300 --rounds 6
--variants forkwatch,trl_log_completions` line; every round runs plain, forkwatch and log_completions interleaved.

Method (why each piece is there):
- The figure is the wall time of `trainer.train()` — what a user waits for — including forkwatch's `on_train_begin`
  (run.json, vocabulary), every hand-off, and the flush and close at train end. Trainer construction and `attach`
  are outside it (both happen once, before training, in any run).
- ONE trainer alive at a time: every (round, variant) builds a fresh `GRPOTrainer` on a deep copy of the same
  initial weights, trains, and is deleted before the next one, so no allocator or cache state is shared.
- Variants run in pairs against `plain`, in turn A B, then B A the next round (a drift in machine load falls on
  both), and the ratio is taken pair by pair; the table gives the median ratio and its min-max over rounds.
- `--threads 0` (the default) leaves torch at its own default thread count, as a user's run is; `--threads N` pins
  it. Background threads compete with torch's intra-op threads for the cores only at the default.
- Every round runs `plain` once and each variant against it, in an order that rotates per round, so with
  `--variants forkwatch,trl_log_completions` the three are interleaved in every round and compared to the same plain.
- Besides wall time: the process's CPU time (all threads, user + system) over `train()`, which load from other
  processes does not inflate, so a noisy machine still shows what forkwatch adds.

Variants: plain TRL; `forkwatch` (the defaults); `forkwatch+group_js`; `forkwatch+no_records`
(record_completions_per_step=0); `trl_log_completions` (TRL's own `log_completions=True`: a Parquet file of each
logged step's completions, written on the training thread).
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
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_THREADS = torch.get_num_threads()  # before tests/conftest.py, which pins torch to one thread for the tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import conftest  # noqa: E402  (the tests' GRPO config and reward: the benchmark trains what the tests train)

CONFIGS = {
    # name: (model kwargs, GRPO overrides). tiny: a Llama-style 2-layer model, 8 completions of <= 6 tokens.
    "tiny": (dict(arch="llama"), dict(per_device_train_batch_size=8, num_generations=8, max_completion_length=6)),
    "bigvocab": (
        dict(vocab_size=151_936, hidden=896, layers=2, heads=14, kv_heads=2, intermediate=1024, tie_embeddings=True),
        dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=16),
    ),
}
VARIANTS: dict[str, tuple[dict | None, dict]] = {  # name: (forkwatch options or None, GRPO overrides)
    "plain": (None, {}),
    "forkwatch": ({}, {}),
    "forkwatch+group_js": (dict(group_js=True), {}),
    "forkwatch+no_records": (dict(record_completions_per_step=0), {}),
    "forkwatch+no_probes": (dict(probe_every=0), {}),
    "trl_log_completions": (None, dict(log_completions=True)),
}


def base_model(config: str):
    from forkwatch.demo.tiny import char_tokenizer, tiny_model

    kw = dict(CONFIGS[config][0])
    return tiny_model(kw.pop("vocab_size", len(char_tokenizer())), **kw)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_variant(config: str, model, name: str, steps: int, tmp: Path) -> tuple[float, float]:
    """Train a fresh trainer on a copy of `model`; (wall seconds, process CPU seconds) of `train()`."""
    from datasets import Dataset
    from forkwatch.demo.tiny import char_tokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOTrainer

    import forkwatch

    fw, extra = VARIANTS[name]
    args = conftest.tiny_grpo_config(str(tmp / "out"), max_steps=steps, logging_steps=1, **CONFIGS[config][1],
                                     **extra)
    trainer = GRPOTrainer(model=copy.deepcopy(model), args=args, reward_funcs=[conftest.digit_reward],
                          train_dataset=Dataset.from_dict({"prompt": conftest.PROMPTS * 64}),
                          processing_class=char_tokenizer())
    trainer.remove_callback(PrinterCallback)  # logging_steps=1 (every step's scalars are logged) without the noise
    if fw is not None:
        forkwatch.attach(trainer, log_dir=str(tmp / "runs"), **fw)
    gc.collect()
    # TRL's log_completions also prints each step's sample as a table: to /dev/null here, so the terminal's speed
    # is not part of the figure (its cost of formatting the table is)
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        t0, c0 = time.perf_counter(), cpu_seconds()
        trainer.train()
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    del trainer
    gc.collect()
    return wall, cpu


def _module_hooks() -> list[tuple[type, str]]:
    """The methods forkwatch's forward hooks call (inside TRL's forwards)."""
    from forkwatch.plugin.capture import Capture
    from forkwatch.plugin.gen_evidence import GenScorer

    return [(GenScorer, "on_forward"), (Capture, "on_loss_values"), (Capture, "on_backbone_forward")]


def hook_times(opts) -> None:
    """forkwatch's CPU time on the training thread per optimizer step, by hook: `time.thread_time_ns` around each
    entry point, which load from other processes does not inflate. A seam wrapper's own time is its total minus the
    TRL method it wraps (timed separately by patching the class before `attach`); the module hooks that run inside
    TRL's methods (forward hooks, the generation-time scorer) are timed on their own and reported apart."""
    from trl import GRPOTrainer

    spent: dict[str, int] = {}
    now = time.thread_time_ns

    def timer(fn, key: str):
        def timed(*a, **k):
            t0 = now()
            try:
                return fn(*a, **k)
            finally:
                spent[key] = spent.get(key, 0) + now() - t0

        return timed

    seams = ("_generate_and_score_completions", "_calculate_rewards", "_compute_loss", "get_high_entropy_mask",
             "_generate_single_turn")
    originals = {n: getattr(GRPOTrainer, n) for n in seams if hasattr(GRPOTrainer, n)}
    for n, fn in originals.items():  # TRL's own time inside each wrapped seam
        setattr(GRPOTrainer, n, timer(fn, "trl:" + n))
    # forkwatch's module hooks run inside TRL's methods: timed apart, and subtracted from TRL's time
    for owner, name in _module_hooks():
        setattr(owner, name, timer(getattr(owner, name), f"hook:{owner.__name__}.{name}"))
    from forkwatch.plugin.callback import ForkwatchCallback

    for name in ("on_step_end", "on_log", "on_save"):
        setattr(ForkwatchCallback, name, timer(getattr(ForkwatchCallback, name), "callback:" + name))
    import forkwatch

    attach = forkwatch.attach

    def attach_timed(trainer, **kw):
        cb = attach(trainer, **kw)
        for n in seams:  # forkwatch's wrappers, installed on the instance
            if n in trainer.__dict__:
                setattr(trainer, n, timer(trainer.__dict__[n], "seam:" + n))
        return cb

    forkwatch.attach = attach_timed
    variant = next((v for v in opts.variants.split(",") if v.startswith("forkwatch")), "forkwatch")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_variant(opts.config, base_model(opts.config), variant, 5, Path(tmp) / "warm")
            spent.clear()
            run_variant(opts.config, base_model(opts.config), variant, opts.steps, Path(tmp) / "timed")
    finally:
        forkwatch.attach = attach
        for n, fn in originals.items():
            setattr(GRPOTrainer, n, fn)
    ms = {k: v / opts.steps / 1e6 for k, v in spent.items()}
    hooked = sum(v for k, v in ms.items() if k.startswith("hook:"))
    rows = {}
    for n in seams:
        if "seam:" + n in ms:
            rows[n] = ms["seam:" + n] - ms.get("trl:" + n, 0.0)
    rows.update({k.split(":", 1)[1]: v for k, v in ms.items() if k.startswith(("callback:", "hook:"))})
    # the forward hooks ran inside TRL's time, which the seam rows already subtracted: they are counted once, here
    total = sum(rows.values())
    print(f"config={opts.config} variant={variant} steps={opts.steps} torch_threads={torch.get_num_threads()} "
          f"load={os.getloadavg()[0]:.1f}: forkwatch's training-thread CPU time, ms per step (module hooks inside "
          f"TRL's calls: {hooked:.3f})")
    for k, v in sorted(rows.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<40}{v:>8.3f}")
    print(f"  {'total':<40}{total:>8.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=list(CONFIGS), default="tiny")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per train()")
    ap.add_argument("--rounds", type=int, default=6, help="rounds; each runs plain and every variant once")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    ap.add_argument("--variants", default="forkwatch,trl_log_completions",
                    help=f"comma-separated, each against plain: {list(VARIANTS)}")
    ap.add_argument("--hook-times", action="store_true",
                    help="instead: forkwatch's training-thread CPU time per hook per step, one forkwatch run")
    opts = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(opts.threads or DEFAULT_THREADS)
    if opts.hook_times:
        return hook_times(opts)
    names = [v for v in opts.variants.split(",") if v != "plain"]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; valid: {list(VARIANTS)}")
    tmp = Path(tempfile.mkdtemp(prefix="fw-bench-"))
    model = base_model(opts.config)
    run_variant(opts.config, model, "plain", 3, tmp / "warmup")  # lazy imports and first allocations, untimed
    wall: dict[str, list[float]] = {n: [] for n in ["plain", *names]}
    cpu: dict[str, list[float]] = {n: [] for n in ["plain", *names]}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    cpu_ratios: dict[str, list[float]] = {n: [] for n in names}
    started = time.perf_counter()
    every = ["plain", *names]
    for r in range(opts.rounds):
        order = every[r % len(every):] + every[: r % len(every)]  # rotated: drift in load falls on every variant
        got = {v: run_variant(opts.config, model, v, opts.steps, tmp / f"r{r}-{v}") for v in order}
        for v, (w, c) in got.items():
            wall[v].append(w)
            cpu[v].append(c)
        for name in names:
            ratios[name].append(got[name][0] / got["plain"][0])
            cpu_ratios[name].append(got[name][1] / got["plain"][1])
    print(f"config={opts.config} steps={opts.steps} rounds={opts.rounds} torch_threads={torch.get_num_threads()} "
          f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f} python={platform.python_version()} "
          f"torch={torch.__version__} wall={time.perf_counter() - started:.0f}s")
    print(f"{'variant':<24}{'train() s':>10}{'x plain':>9}{'min':>7}{'max':>7}{'cpu x plain':>13}{'min':>7}{'max':>7}")
    print(f"{'plain':<24}{statistics.median(wall['plain']):>10.2f}{'':>9}{'':>7}{'':>7}{'':>13}")
    for n in names:
        rs, cs = ratios[n], cpu_ratios[n]
        print(f"{n:<24}{statistics.median(wall[n]):>10.2f}{statistics.median(rs):>9.3f}{min(rs):>7.3f}{max(rs):>7.3f}"
              f"{statistics.median(cs):>13.3f}{min(cs):>7.3f}{max(cs):>7.3f}")


if __name__ == "__main__":
    main()
