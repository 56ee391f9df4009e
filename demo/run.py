"""`forkwatch demo`: warm up a tiny model, train it in several GRPO runs with forkwatch attached, check their health,
then serve the dashboard. CPU only, no network: the model and tokenizer are built in code (demo/tiny.py).

This is the user-facing end of the demo, so it prints progress and the URL; the modules it calls log.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

# Nothing here needs the Hub: say so before transformers and huggingface_hub read their settings, so that no
# telemetry thread or download is ever attempted.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from forkwatch.demo.runs import GRPOSettings, demo_runs, train_all  # noqa: E402
from forkwatch.demo.warmup import WarmupSettings, cached_warmup  # noqa: E402


@dataclass(frozen=True)
class DemoSettings:
    warmup: WarmupSettings
    grpo: GRPOSettings


DEFAULT = DemoSettings(WarmupSettings(), GRPOSettings())
# --quick (the end-to-end test): the first 30 steps of the default runs (same warm-up, seed and constant learning
# rate), long enough for a health verdict and for the high learning rate's collapse (flagged at step 22).
QUICK = DemoSettings(DEFAULT.warmup, GRPOSettings(steps=30))


def settings_for(args: argparse.Namespace) -> DemoSettings:
    base = QUICK if args.quick else DEFAULT
    if args.steps is None:
        return base
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: pass a positive number of GRPO steps per run")
    return DemoSettings(base.warmup, GRPOSettings(**{**base.grpo.__dict__, "steps": args.steps}))


def _verdicts(log_dir: Path, names: list[str]) -> list[str]:
    """One line per run: its health verdict and, for an alarm, the rule that fired (same code as `forkwatch check`)."""
    from forkwatch.store.check import check_runs

    lines = []
    by_name = {r["name"]: r for r in check_runs(log_dir)}
    for name in names:
        r = by_name.get(name)
        if r is None:
            lines.append(f"  {name:<14} (no record)")
            continue
        rep = r["report"]
        alarms = [f for f in rep.flags if f.kind == rep.verdict]
        where = f"  {alarms[-1].rule} at step {alarms[-1].fired_at}" if alarms else ""
        lines.append(f"  {name:<14} {rep.verdict.upper():<12} early entropy {rep.early_entropy or float('nan'):.3f}{where}")
    return lines


def main(args: argparse.Namespace) -> int:
    try:
        settings = settings_for(args)
    except ValueError as e:
        print(f"forkwatch demo: {e}")
        return 2
    out = Path(args.out)
    log_dir, work_dir = out / "logs", out / "trainer"
    specs = demo_runs(settings.grpo)
    print(f"forkwatch demo: writing to {out.resolve()} ({len(specs)} GRPO runs x {settings.grpo.steps} steps, CPU)")
    t0 = time.perf_counter()
    try:
        model_dir = cached_warmup(out, settings.warmup)
        print(f"warm-up model: {model_dir}")
        train_all(specs, model_dir=model_dir, log_dir=log_dir, settings=settings.grpo, work_dir=work_dir)
    except KeyboardInterrupt:
        print("\nforkwatch demo: interrupted; the runs written so far stay readable in", log_dir)
        return 130
    print(f"trained in {time.perf_counter() - t0:.0f} s. Health (forkwatch check {log_dir}):")
    print("\n".join(_verdicts(log_dir, [s.name for s in specs])))
    for s in specs:
        print(f"  {s.name:<14} {s.note} (lr {s.learning_rate:g})")
    if args.no_dashboard:
        print(f"dashboard: forkwatch dashboard {log_dir}")
        return 0

    from forkwatch.dashboard import launch

    # launch prints the URL and returns 0 when Ctrl-C stops the server.
    try:
        return launch.main(argparse.Namespace(log_dir=str(log_dir), host=args.host, port=args.port))
    except KeyboardInterrupt:  # a second Ctrl-C while streamlit shuts down
        return 0
