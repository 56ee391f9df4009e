"""What attaching forkwatch costs a user: whole `trainer.train()` time with and without it, pair by pair.

    .venv/bin/python benchmarks/overhead.py --config tiny --steps 200 --rounds 5                 # torch's default threads
    .venv/bin/python benchmarks/overhead.py --config tiny --steps 200 --rounds 5 --threads 1
    .venv/bin/python benchmarks/overhead.py --config bigvocab --steps 40 --rounds 4
    .venv/bin/python benchmarks/overhead.py --config tiny --variants plain,forkwatch,trl_log_completions

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=list(CONFIGS), default="tiny")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per train()")
    ap.add_argument("--rounds", type=int, default=5, help="pairs per variant")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    ap.add_argument("--variants", default="forkwatch", help=f"comma-separated, each against plain: {list(VARIANTS)}")
    opts = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(opts.threads or DEFAULT_THREADS)
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
    for r in range(opts.rounds):
        for name in names:
            order = ["plain", name] if r % 2 == 0 else [name, "plain"]
            got = {v: run_variant(opts.config, model, v, opts.steps, tmp / f"r{r}-{name}-{v}") for v in order}
            for v, (w, c) in got.items():
                wall[v].append(w)
                cpu[v].append(c)
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
