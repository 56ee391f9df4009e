"""The whole demo, as values: warm up a tiny model, train the run matrix with forkwatch attached, check each run's
health, and measure forkwatch's forks against the task's ground-truth decision points.

`forkwatch demo` (forkwatch/cli.py) calls `run_demo` and prints what it returns; this module only logs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

# Nothing here needs the Hub: say so before transformers and huggingface_hub read their settings, so that no
# telemetry thread or download is ever attempted.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The demo trains on the CPU: said to DeepSpeed (imported by transformers where installed, as `make setup` does), it
# does not probe for a GPU and warn that it found none.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

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
# default demo, since a collapse driven by the reward takes ~100-120 steps (docs/experiments.md).
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
    status_file: str | Path | None = None,
) -> DemoResult:
    """Warm up (cached under `cache_dir`, default `out`), train every run, annotate the ground truth, and check
    health. `threads`: torch's CPU threads for this process (None leaves torch's setting). `status_file`: kept up
    to date with the warm-up's and the runs' progress for the dashboard (dashboard/launch.py, `write_status`).
    Raises KeyboardInterrupt through: the runs written so far stay readable."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads {threads}: pass 1 or more")
        import torch

        torch.set_num_threads(threads)
    out = Path(out)
    log_dir, work_dir = out / "logs", out / "trainer"
    specs = demo_runs(settings.grpo)
    status = _Status(status_file, settings, specs)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with _quiet():
            model_dir = cached_warmup(cache_dir or out, settings.warmup, progress=progress, on_step=status.warmup)
            train_all(specs, model_dir=model_dir, log_dir=log_dir, settings=settings.grpo, work_dir=work_dir,
                      progress=progress, on_step=status.grpo)
        status.write("forkwatch demo: every run trained; checking them", None)
    except BaseException:
        status.write("forkwatch demo: stopped; the runs written so far are shown", None, active=False)
        raise
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    for s in specs:
        truth.annotate(log_dir, s.name)
    result = DemoResult(out, log_dir, model_dir, specs, seconds, cpu)
    result.verdicts, result.verdict_lines = verdicts(log_dir, [s.name for s in specs])
    result.forks = truth.fork_report(log_dir, "grpo")
    result.detector_lines = truth.detector_lines(log_dir, "grpo") + truth.detector_trend_lines(log_dir,
                                                                                               "grpo_alphabetical")
    status.write("forkwatch demo: finished", None, active=False)
    return result


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The demo's terminal shows forkwatch's lines and the demo's own bars. Inside, two kinds of library noise the
    demo cannot fix at its cause are held back, in this process only and restored after: TRL asks the model whether
    activation checkpointing is on under transformers' deprecated name (`is_gradient_checkpointing`, a FutureWarning
    around every generation; the demo's runs turn checkpointing off in their own arguments, demo/runs.py), and
    transformers draws a bar for every load and save of the 0.3 M-parameter model (one per run)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing\w*` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


class _Status:
    """What the demo is doing, for the dashboard's status line (at most a few writes a second; none without a file)."""

    def __init__(self, path: str | Path | None, settings: DemoSettings, specs: list[RunSpec]) -> None:
        self.path, self.settings, self.specs = path, settings, specs
        self._last = 0.0

    def write(self, text: str, progress: float | None, *, active: bool = True, every_s: float = 0.0) -> None:
        if self.path is None or time.monotonic() - self._last < every_s:
            return
        from forkwatch.dashboard.launch import write_status

        write_status(self.path, text, progress=progress, active=active)
        self._last = time.monotonic()

    def warmup(self, step: int, loss: float) -> None:
        total = self.settings.warmup.steps
        self.write(f"forkwatch demo: supervised warm-up of the tiny model (once; cached for the next demo), step "
                   f"{step} of {total}, loss {loss:.3f}. The GRPO runs appear here as soon as they start.",
                   step / total, every_s=0.5)

    def grpo(self, i: int, spec: RunSpec, step: int, total: int) -> None:
        self.write(f"forkwatch demo: GRPO run {i + 1} of {len(self.specs)}, {spec.name} (designed: "
                   f"{spec.expect}), step {step} of at most {total}; written every "
                   f"{self.settings.grpo.flush_interval_s:g} s", step / total, every_s=0.0 if step == 0 else 0.5)


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
