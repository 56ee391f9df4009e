"""GRPO step time with and without forkwatch, interleaved in one process; median ratio per variant.

    .venv/bin/python benchmarks/overhead.py --config tiny --rounds 8
    .venv/bin/python benchmarks/overhead.py --config bigvocab --rounds 5
    .venv/bin/python benchmarks/overhead.py --device cuda --config qwen0.5b --rounds 5

Variants: plain TRL, forkwatch default monitoring (group_js off), monitoring + group_js. Each round trains every
variant for `--steps` steps (the first step of each round is warm-up and dropped), in turn, so drifts in machine load
hit all variants alike. Peak memory is CUDA's max_memory_allocated per variant (not measured on the CPU).
"""

from __future__ import annotations

import argparse
import logging
import statistics
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
        dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=32),
    ),
    "qwen0.5b": ("qwen_0_5b", dict(per_device_train_batch_size=16, num_generations=8, max_completion_length=256)),
}
VARIANTS = {"plain": None, "monitor": dict(group_js=False), "monitor+group_js": dict(group_js=True)}


class StepTimer:
    def __init__(self, device: str) -> None:
        self.device, self.times, self._t0 = device, [], 0.0

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, *a, **k):
        self._sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, *a, **k):
        self._sync()
        self.times.append(time.perf_counter() - self._t0)


def build(config: str, device: str, tmp: Path, fw: dict | None):
    import conftest
    from datasets import Dataset
    from forkwatch.demo.tiny import char_tokenizer, qwen_0_5b_shape, tiny_model
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    import forkwatch

    model_kw, grpo = CONFIGS[config]
    tok = char_tokenizer()
    if model_kw == "qwen_0_5b":
        model = qwen_0_5b_shape()
    else:
        model = tiny_model(model_kw.pop("vocab_size", len(tok)) if model_kw else len(tok), **dict(model_kw))
    if device == "cuda":
        model = model.to(torch.bfloat16)
    args = conftest.tiny_grpo_config(
        str(tmp / "out"), max_steps=10_000, use_cpu=device == "cpu", bf16=device == "cuda", logging_steps=10_000,
        **grpo,
    )
    trainer = GRPOTrainer(model=model, args=args, reward_funcs=[conftest.digit_reward],
                          train_dataset=Dataset.from_dict({"prompt": conftest.PROMPTS * 64}), processing_class=tok)
    if fw is not None:
        forkwatch.attach(trainer, log_dir=str(tmp / "runs"), **fw)
    timer = StepTimer(device)
    cb = type("Timer", (TrainerCallback,), {"on_step_begin": timer.on_step_begin, "on_step_end": timer.on_step_end})()
    trainer.add_callback(cb)
    return trainer, timer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=list(CONFIGS), default="tiny")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=4, help="steps per variant per round (the first is warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    opts = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(opts.threads)
    tmp = Path(tempfile.mkdtemp(prefix="fw-bench-"))
    trainers = {name: build(opts.config, opts.device, tmp / name, fw) for name, fw in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    peak: dict[str, float] = {}
    names = list(trainers)
    for r in range(opts.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order: no variant always first
            trainer, timer = trainers[name]
            trainer.args.max_steps = opts.steps
            timer.times.clear()
            if opts.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            trainer.train()
            times[name].extend(timer.times[1:])
            if opts.device == "cuda":
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
    base = statistics.median(times["plain"])
    print(f"config={opts.config} device={opts.device} rounds={opts.rounds} steps/round={opts.steps - 1} timed")
    print(f"{'variant':<18}{'median step (ms)':>18}{'ratio':>8}{'peak GiB':>10}")
    for name, ts in times.items():
        med = statistics.median(ts)
        mem = f"{peak[name]:.2f}" if name in peak else "-"
        print(f"{name:<18}{1000 * med:>18.1f}{med / base:>8.3f}{mem:>10}")


if __name__ == "__main__":
    main()
