"""forkwatch on a GPU: whole GRPO step time, peak GPU memory, forkwatch's own time per hook and the store's bytes per
step, plain TRL against `attach` (monitor only), `select="ict"` and `select="high_entropy"`, on a randomly initialised
model with Qwen2.5-0.5B's shape (24 layers, hidden 896, intermediate 4864, 14 heads, 2 KV heads, vocabulary 151,936,
tied embeddings; built in code from a Qwen2Config), bf16, generation through the policy (`use_vllm=False`).

    .venv/bin/python benchmarks/gpu.py --out benchmarks/out/gpu                   # one H200: <= 6 minutes in all
    .venv/bin/python benchmarks/gpu.py --out /tmp/gpu --config tiny --device cpu --rounds 1 --steps 1   # the dry run

A GPU machine without TRL, DuckDB or datasets gets them as wheels (`make gpu-wheels`; BENCHMARKS.md, "GPU", has the
device command).

Method (as benchmarks/realistic.py): one trainer alive at a time, a fresh `GRPOTrainer` on a deep copy of the same
initial weights per (round, variant), the first `--warmup` steps of each dropped, variants interleaved with their
order rotated per round. A step is timed from `on_step_begin` to the end of its `on_log` (logging_steps=1, so TRL's
and forkwatch's per-step logging are inside it), with `torch.cuda.synchronize()` at both ends. Peak GPU memory is
`torch.cuda.max_memory_allocated()` over each trainer's whole run (reset before it is built; the weights it starts
from stay on the CPU). forkwatch's own time per hook is the host wall time inside each of its entry points, no
synchronisation added: GPU work a hook only enqueues shows in the step time, not in its hook's figure, and a hook
that copies to the host (`.item()`, `.cpu()`) also counts the wait for GPU work queued before it (`--hook-sync`
synchronises around every hook instead: each hook's own GPU time, step times no longer comparable). Store bytes
per step: the Parquet parts of the run's per-step tables (tokens, forks, completions, steps) on disk after
`train()` closed the writer, over the steps trained; the vocabulary, written once per run, is given apart.

`--budget-s` bounds the whole run from `main`'s start (the model build included; Python's start and torch's import,
a few seconds, are not): no (round, variant) is started that the runs so far say would not end in time, a running
one stops after the step that passes the deadline, and what was measured is written.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import functools
import gc
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DEFAULT_THREADS = torch.get_num_threads()  # before tests/conftest.py, which pins torch to one thread for the tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import conftest  # noqa: E402  (the tests' GRPO config and reward: the benchmark trains what the tests train)

log = logging.getLogger("gpu_bench")

CONFIGS = {
    # name: model shape (forkwatch.demo.tiny.tiny_model arguments), the default batch
    "qwen0.5b": dict(
        shape=dict(vocab_size=151_936, hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864,
                   tie_embeddings=True),
        completions=32, generations=8, completion_length=256),
    "tiny": dict(
        shape=dict(vocab_size=512, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, tie_embeddings=True),
        completions=4, generations=2, completion_length=8),
}
VARIANTS: dict[str, dict | None] = {  # name: forkwatch options, or None for plain TRL
    "plain": None,
    "attach": dict(),
    "ict": dict(select="ict", warmup_steps=0),
    "high_entropy": dict(select="high_entropy"),
}
# forkwatch's entry points on the training thread (plugin/trl_seams.py calls them; none calls another), timed per
# step: (module, class, method)
HOOKS = [
    ("forkwatch.plugin.gen_evidence", "GenScorer", "on_forward"),  # each decode step's forward
    ("forkwatch.plugin.capture", "Capture", "on_generation"),  # (GenScorer.take runs inside it)
    ("forkwatch.plugin.capture", "Capture", "share_evidence"),
    ("forkwatch.plugin.capture", "Capture", "begin_micro_batch"),
    ("forkwatch.plugin.capture", "Capture", "on_loss_values"),
    ("forkwatch.plugin.capture", "Capture", "on_backbone_forward"),
    ("forkwatch.plugin.capture", "Capture", "select"),  # the selectors, in place of TRL's entropy mask
    ("forkwatch.plugin.capture", "Capture", "selection_loss"),
    ("forkwatch.plugin.capture", "Capture", "end_micro_batch"),
    ("forkwatch.plugin.callback", "ForkwatchCallback", "on_step_end"),
]
STEP_TABLES = ("tokens", "forks", "completions", "steps")  # written every step; vocab is written once per run


def wide_tokenizer(vocab_size: int):
    """The char-level test tokenizer padded with filler tokens `<N>` to exactly `vocab_size` ids, so that every id a
    151,936-way head samples decodes to text (as a real tokenizer's would) and `len(tokenizer)` is the model's vocab."""
    from forkwatch.demo.tiny import char_tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = char_tokenizer()
    vocab = dict(base.get_vocab())
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size={vocab_size} is below the char tokenizer's {len(vocab)} ids; pass a larger one")
    vocab.update({f"<{i}>": i for i in range(len(vocab), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=base.unk_token))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")  # prompts: one token per character
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=base.pad_token, bos_token=base.bos_token,
                                  eos_token=base.eos_token, unk_token=base.unk_token)
    tok.padding_side = "left"
    return tok


def prompts(n: int) -> list[str]:
    """Distinct prompts of about 40 characters (40 tokens: one per character)."""
    return [f"Question {i}: what is {i % 97}+{i % 13}? Answer:" for i in range(n)]


@dataclass
class Run:
    """What one (round, variant) trainer measured."""

    variant: str
    round: int
    wall: list[float] = field(default_factory=list)  # per step, warm-up included
    hook_seconds: list[dict[str, float]] = field(default_factory=list)  # per step: hook -> seconds
    start_bytes: int | None = None  # GPU memory still allocated when the trainer is built: > 0 is a leak
    peak_bytes: int | None = None
    step_bytes: int = 0  # the per-step tables' parts on disk
    vocab_bytes: int = 0
    steps_trained: int = 0
    seconds: float = 0.0  # the whole run: trainer build, train(), teardown


class HookClock:
    """Wall time inside each forkwatch entry point, totalled per hook (the class methods are wrapped while the clock
    is installed and restored after). With `sync`, the GPU is synchronised on entry and exit, so a hook's figure is
    its own GPU work too and none of the work queued before it, at the cost of stalling the step at every hook."""

    def __init__(self, sync: bool = False) -> None:
        self.total: dict[str, float] = {}
        self.sync = torch.cuda.synchronize if sync else (lambda: None)

    @contextlib.contextmanager
    def installed(self) -> Iterator[HookClock]:
        import importlib

        originals = []
        for module, cls_name, name in HOOKS:
            cls = getattr(importlib.import_module(module), cls_name)
            fn = cls.__dict__.get(name)
            if fn is None:
                raise AttributeError(f"{cls_name}.{name} is gone from {module}: update HOOKS in benchmarks/gpu.py")
            originals.append((cls, name, fn))
            self.total.setdefault(f"{cls_name}.{name}", 0.0)  # every hook is reported, those never called as 0
            setattr(cls, name, self._timed(fn, f"{cls_name}.{name}"))
        try:
            yield self
        finally:
            for cls, name, fn in originals:
                setattr(cls, name, fn)

    def _timed(self, fn, key: str):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            self.sync()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.sync()
                self.total[key] = self.total.get(key, 0.0) + time.perf_counter() - t0

        return wrapper


def make_step_timer(run: Run, clock: HookClock, device: str, deadline: float):
    """A TrainerCallback timing each step from on_step_begin to the end of its on_log, and stopping training once
    the deadline has passed (the step under way is finished and kept)."""
    from transformers import TrainerCallback

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.t0: float | None = None  # set while a step is under way
            self.hooks0: dict[str, float] = {}

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.hooks0 = dict(clock.total)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() > deadline:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.t0 is None:  # the train-end summary
                return
            sync()
            run.wall.append(time.perf_counter() - self.t0)
            run.hook_seconds.append({k: v - self.hooks0.get(k, 0.0) for k, v in clock.total.items()})
            self.t0 = None

    return StepTimer()


def build_model(config: str, device: str, completion_length: int):
    from forkwatch.demo.tiny import tiny_model

    shape = dict(CONFIGS[config]["shape"])
    model = tiny_model(shape.pop("vocab_size"), max_positions=max(512, completion_length + 128), **shape)
    return model.to(torch.bfloat16) if device == "cuda" else model


def grpo_args(opts, output_dir: Path):
    """The tests' GRPO config at this run's sizes; TRL's defaults otherwise (gradient checkpointing on)."""
    return conftest.tiny_grpo_config(
        str(output_dir), max_steps=opts.warmup + opts.steps, use_cpu=opts.device == "cpu", bf16=opts.device == "cuda",
        per_device_train_batch_size=opts.completions, num_generations=opts.generations,
        max_completion_length=opts.completion_length, use_vllm=False, learning_rate=1e-6, logging_steps=1)


def run_variant(opts, model, tokenizer, variant: str, rnd: int, tmp: Path, clock: HookClock, deadline: float) -> Run:
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOTrainer

    import forkwatch

    run = Run(variant, rnd)
    started = time.perf_counter()
    if opts.device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        run.start_bytes = torch.cuda.memory_allocated()
    trainer = GRPOTrainer(model=copy.deepcopy(model), args=grpo_args(opts, tmp / "out"), reward_funcs=[conftest.digit_reward],
                          train_dataset=Dataset.from_dict({"prompt": prompts(256)}), processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    fw = VARIANTS[variant]
    if fw is not None:
        forkwatch.attach(trainer, log_dir=str(tmp / "runs"), **fw)
    trainer.add_callback(make_step_timer(run, clock, opts.device, deadline))
    trainer.train()
    run.steps_trained = trainer.state.global_step
    if opts.device == "cuda":
        torch.cuda.synchronize()
        run.peak_bytes = torch.cuda.max_memory_allocated()
    del trainer
    gc.collect()
    for part in (tmp / "runs").glob("*/*/*.parquet"):
        if part.parent.name in STEP_TABLES:
            run.step_bytes += part.stat().st_size
        elif part.parent.name == "vocab":
            run.vocab_bytes += part.stat().st_size
    run.seconds = time.perf_counter() - started
    return run


def summarise(runs: list[Run], names: list[str], warmup: int) -> dict[str, dict[str, Any]]:
    """Per variant: medians over its timed steps and ratios to plain."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        mine = [r for r in runs if r.variant == name]
        timed = [w for r in mine for w in r.wall[warmup:]]
        watched = VARIANTS[name] is not None
        hook_steps = [h for r in mine for h in r.hook_seconds[warmup:]] if watched else []
        peaks = [r.peak_bytes for r in mine if r.peak_bytes is not None]
        trained = sum(r.steps_trained for r in mine)
        hooks = sorted({k for h in hook_steps for k in h})
        out[name] = {
            "timed_steps": len(timed),
            "rounds": sorted({r.round for r in mine if r.wall[warmup:]}),
            "step_s_median": statistics.median(timed) if timed else None,
            "step_s_round_medians": [statistics.median(r.wall[warmup:]) for r in mine if r.wall[warmup:]],
            "step_s_all": timed,
            "peak_gpu_bytes": max(peaks) if peaks else None,
            "gpu_bytes_at_start": max((r.start_bytes for r in mine if r.start_bytes is not None), default=None),
            "forkwatch_ms_per_step": (
                statistics.median(sum(h.values()) for h in hook_steps) * 1e3 if hook_steps else None),
            "hook_ms_per_step": {k: statistics.median(h.get(k, 0.0) for h in hook_steps) * 1e3 for k in hooks},
            "store_bytes_per_step": sum(r.step_bytes for r in mine) / trained if trained and watched else None,
            "vocab_bytes_per_run": statistics.median(r.vocab_bytes for r in mine) if mine and watched else None,
        }
    base = out.get("plain", {})
    for row in out.values():
        for key, ratio in (("step_s_median", "step_x_plain"), ("peak_gpu_bytes", "peak_gpu_x_plain")):
            row[ratio] = row[key] / base[key] if row[key] and base.get(key) else None
    return out


def markdown(result: dict[str, Any]) -> str:
    meta, rows = result["meta"], result["variants"]

    def num(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [
        f"{meta['config']} on {meta['device_name']}, {meta['dtype']}, {meta['completions']} completions of "
        f"{meta['completion_length']} tokens per step ({meta['generations']} per prompt), {meta['rounds_done']} of "
        f"{meta['rounds']} rounds x {meta['steps']} timed steps after {meta['warmup']} warm-up; torch "
        f"{meta['versions']['torch']}, transformers {meta['versions']['transformers']}, trl {meta['versions']['trl']}; "
        f"{meta['date']}; {meta['elapsed_s']:.0f} s in all" + ("; STOPPED EARLY by --budget-s" if meta["stopped_early"]
                                                            else ""),
        "",
        "| variant | timed steps | step (s), median | per-round medians (s) | x plain | peak GPU memory (GiB) | x plain "
        "| forkwatch ms/step | store KiB/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        spread = ", ".join(f"{v:.3f}" for v in r["step_s_round_medians"]) or "-"
        peak = None if r["peak_gpu_bytes"] is None else r["peak_gpu_bytes"] / 2**30
        kib = None if r["store_bytes_per_step"] is None else r["store_bytes_per_step"] / 1024
        lines.append(f"| {name} | {r['timed_steps']} | {num(r['step_s_median'], '.3f')} | {spread} | "
                     f"{num(r['step_x_plain'], '.3f')} | {num(peak, '.2f')} | {num(r['peak_gpu_x_plain'], '.4f')} | "
                     f"{num(r['forkwatch_ms_per_step'], '.1f')} | {num(kib, '.1f')} |")
    watched = [name for name in rows if VARIANTS[name] is not None]
    hooks = sorted({k for r in rows.values() for k in r["hook_ms_per_step"]})
    if hooks:
        how = ("GPU synchronised around each hook (step times inflated)" if meta["hook_sync"]
               else "host wall time, no synchronisation added")
        lines += ["", f"forkwatch's time per hook, ms per step (median over the timed steps; {how}):", "",
                  "| hook | " + " | ".join(watched) + " |", "|---|" + "---|" * len(watched)]
        for k in hooks:
            lines.append(f"| {k} | " + " | ".join(num(rows[n]["hook_ms_per_step"].get(k), ".2f") for n in watched) + " |")
    return "\n".join(lines) + "\n"


def versions() -> dict[str, str]:
    import accelerate
    import datasets
    import pyarrow
    import transformers
    import trl

    import forkwatch

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "accelerate": accelerate.__version__, "datasets": datasets.__version__,
            "pyarrow": pyarrow.__version__, "forkwatch": forkwatch.__version__}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu.json and gpu.md (made if missing)")
    ap.add_argument("--config", choices=list(CONFIGS), default="qwen0.5b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first, per trainer")
    ap.add_argument("--completions", type=int, help="completions per step (the config's default if unset)")
    ap.add_argument("--generations", type=int, help="completions per prompt (the config's default if unset)")
    ap.add_argument("--completion-length", type=int, help="max tokens per completion (the config's default if unset)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="wall seconds for the whole run, from the start")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default")
    ap.add_argument("--hook-sync", action="store_true",
                    help="synchronise the GPU around each forkwatch hook: per-hook GPU time, but step times inflated")
    opts = ap.parse_args(argv)
    for key in ("completions", "generations", "completion_length"):
        if getattr(opts, key) is None:
            setattr(opts, key, CONFIGS[opts.config][key])
    names = opts.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if opts.completions % opts.generations:
        ap.error(f"--completions {opts.completions} is not a multiple of --generations {opts.generations}")
    if opts.hook_sync and opts.device != "cuda":
        ap.error("--hook-sync synchronises a GPU: it needs --device cuda")
    if opts.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no GPU: run with --device cpu")
    return opts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(opts.threads or DEFAULT_THREADS)
    started = time.perf_counter()
    deadline = started + opts.budget_s
    names = opts.variants.split(",")
    model = build_model(opts.config, opts.device, opts.completion_length)
    tokenizer = wide_tokenizer(model.config.vocab_size)
    log.info("model %s: %.1fM parameters, built in %.0f s", opts.config,
             sum(p.numel() for p in model.parameters()) / 1e6, time.perf_counter() - started)
    runs: list[Run] = []
    stopped_early = False
    clock = HookClock(sync=opts.hook_sync)
    with clock.installed():
        for rnd in range(opts.rounds):
            order = names[rnd % len(names):] + names[: rnd % len(names)]
            for name in order:
                expected = statistics.median(r.seconds for r in runs) if runs else 0.0
                if time.perf_counter() + expected > deadline:
                    stopped_early = True
                    break
                with tempfile.TemporaryDirectory(prefix="fw-gpu-") as tmp:
                    run = run_variant(opts, model, tokenizer, name, rnd, Path(tmp), clock, deadline)
                runs.append(run)
                timed = run.wall[opts.warmup:]
                log.info("round %d %s: %d timed steps, median %s s, run %.0f s", rnd, name, len(timed),
                         f"{statistics.median(timed):.3f}" if timed else "-", run.seconds)
                if len(run.wall) < opts.warmup + opts.steps:
                    stopped_early = True
            if stopped_early:
                break
    complete = [rnd for rnd in range(opts.rounds)
                if all(any(r.round == rnd and len(r.wall) == opts.warmup + opts.steps and r.variant == n for r in runs)
                       for n in names)]
    with tempfile.TemporaryDirectory() as tmp:
        args = grpo_args(opts, Path(tmp))
    result = {
        "meta": {
            "config": opts.config, "shape": CONFIGS[opts.config]["shape"], "device": opts.device,
            "device_name": torch.cuda.get_device_name() if opts.device == "cuda" else platform.processor() or "cpu",
            "dtype": "bf16" if opts.device == "cuda" else "fp32", "completions": opts.completions,
            "generations": opts.generations, "completion_length": opts.completion_length, "rounds": opts.rounds,
            "rounds_done": len(complete), "steps": opts.steps, "warmup": opts.warmup, "budget_s": opts.budget_s, "hook_sync": opts.hook_sync,
            "stopped_early": stopped_early, "elapsed_s": time.perf_counter() - started,
            "grpo": {k: getattr(args, k) for k in ("gradient_checkpointing", "loss_type", "steps_per_generation",
                                                   "num_iterations", "beta", "temperature", "use_vllm")},
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "versions": versions(),
        },
        "variants": summarise(runs, names, opts.warmup),
        "runs": [vars(r) for r in runs],
    }
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "gpu.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (opts.out / "gpu.md").write_text(table)
    log.info("wrote %s and %s\n%s", opts.out / "gpu.json", opts.out / "gpu.md", table)
    return result


if __name__ == "__main__":
    main()
