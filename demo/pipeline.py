"""The whole demo, as values: warm up a tiny model, train the run matrix with forkwatch attached, check each run's
health, and measure forkwatch's forks against the task's ground-truth decision points.

`forkwatch demo` (forkwatch/cli.py) calls `run_demo` and prints what it returns; this module only logs.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

# Nothing here needs the Hub: say so before transformers and huggingface_hub read their settings, so that no
# telemetry thread or download is ever attempted.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from forkwatch.demo import truth  # noqa: E402
from forkwatch.demo.runs import GRPOSettings, RunSpec, demo_runs, train_all  # noqa: E402
from forkwatch.demo.warmup import WarmupSettings, cached_warmup  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    warmup: WarmupSettings
    grpo: GRPOSettings


DEFAULT = DemoSettings(WarmupSettings(), GRPOSettings())
# --quick (the end-to-end test): the first QUICK_STEPS steps of the healthy runs (same warm-up, seed and learning
# rate schedule), long enough for a verdict; the alarmed runs keep their caps and stop at their alarms as in the
# default demo, since a collapse driven by the reward takes ~60-70 steps.
QUICK_STEPS = 20
QUICK = DemoSettings(DEFAULT.warmup, replace(DEFAULT.grpo, steps=QUICK_STEPS))


def settings_for(*, quick: bool = False, steps: int | None = None, seed: int | None = None) -> DemoSettings:
    """The demo's settings for the CLI's options; refuses a non-positive step count or a negative seed."""
    base = QUICK if quick else DEFAULT
    grpo = base.grpo
    if steps is not None:
        if steps < 1:
            raise ValueError(f"--steps {steps}: pass a positive number of GRPO steps per run")
        grpo = replace(grpo, steps=steps)
    if seed is not None:
        if seed < 0:
            raise ValueError(f"--seed {seed}: pass a seed >= 0")
        grpo = replace(grpo, seed=seed)
    return DemoSettings(base.warmup, grpo)


@dataclass
class DemoResult:
    out: Path
    log_dir: Path
    model_dir: Path
    specs: list[RunSpec]
    seconds: float  # wall time of warm-up (when not cached) and training
    cpu_seconds: float  # CPU time of this process over the same span (all threads)
    verdicts: dict[str, str] = field(default_factory=dict)  # run name -> verdict
    verdict_lines: list[str] = field(default_factory=list)
    forks: truth.ForkReport | None = None  # the first step of plain GRPO against the ground truth
    # the detector metrics (AUROC, AP, precision vs ceiling) at plain GRPO's first step, and over the collapse run
    detector_lines: list[str] = field(default_factory=list)


def run_demo(
    settings: DemoSettings,
    out: str | Path,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    threads: int | None = None,
) -> DemoResult:
    """Warm up (cached under `cache_dir`, default `out`), train every run, annotate the ground truth, and check
    health. `threads`: torch's CPU threads for this process (None leaves torch's setting). Raises KeyboardInterrupt
    through: the runs written so far stay readable."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads {threads}: pass 1 or more")
        import torch

        torch.set_num_threads(threads)
    out = Path(out)
    log_dir, work_dir = out / "logs", out / "trainer"
    specs = demo_runs(settings.grpo)
    t0, c0 = time.perf_counter(), time.process_time()
    model_dir = cached_warmup(cache_dir or out, settings.warmup, progress=progress)
    train_all(specs, model_dir=model_dir, log_dir=log_dir, settings=settings.grpo, work_dir=work_dir,
              progress=progress)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    for s in specs:
        truth.annotate(log_dir, s.name)
    result = DemoResult(out, log_dir, model_dir, specs, seconds, cpu)
    result.verdicts, result.verdict_lines = verdicts(log_dir, [s.name for s in specs])
    result.forks = truth.fork_report(log_dir, "grpo")
    result.detector_lines = truth.detector_lines(log_dir, "grpo") + truth.detector_trend_lines(log_dir,
                                                                                               "grpo_alphabetical")
    return result


def verdicts(log_dir: Path, names: list[str]) -> tuple[dict[str, str], list[str]]:
    """Each run's health verdict and one line for it with the rule that fired (same code as `forkwatch check`)."""
    from forkwatch.store.check import check_runs

    found, lines = {}, []
    by_name = {r["name"]: r for r in check_runs(log_dir)}
    for name in names:
        r = by_name.get(name)
        if r is None:
            lines.append(f"  {name:<20} (no record)")
            continue
        rep = r["report"]
        found[name] = rep.verdict
        alarms = [f for f in rep.flags if f.is_alarm and f.kind == rep.verdict]
        where = f"  {alarms[-1].rule} at step {alarms[-1].fired_at}" if alarms else ""
        early = rep.early_entropy if rep.early_entropy is not None else float("nan")
        lines.append(f"  {name:<20} {rep.verdict.upper():<12} early entropy {early:.3f}{where}")
    return found, lines


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    return settings_for(quick=args.quick, steps=args.steps, seed=args.seed)
