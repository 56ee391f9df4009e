"""The `forkwatch` command. Argument parsing only: each subcommand hands its arguments to the part that owns it,
imported lazily so that `forkwatch sql` never loads torch."""

from __future__ import annotations

import argparse
import importlib
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="forkwatch",
        description="Inspect the per-token entropy, divergence and fork records of GRPO runs.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("runs", help="list the runs in a log directory", description="List the runs in LOG_DIR.")
    s.add_argument("log_dir", metavar="LOG_DIR")
    s.set_defaults(target="forkwatch.store.commands:runs")

    s = sub.add_parser(
        "sql",
        help="run one read-only SQL statement over a log directory",
        description="Run one read-only SQL statement over the views runs, steps, completions, tokens, forks, vocab "
        "and token_text, in a sandbox that can read only LOG_DIR.",
    )
    s.add_argument("log_dir", metavar="LOG_DIR")
    s.add_argument("query", metavar="SQL")
    s.add_argument("--format", choices=("table", "csv", "json"), default="table")
    s.add_argument("--timeout", type=float, default=10.0, help="seconds before the query is interrupted")
    s.add_argument("--max-rows", type=int, default=1000, help="rows printed at most (table format)")
    s.set_defaults(target="forkwatch.store.commands:sql")

    s = sub.add_parser(
        "check",
        help="health verdict per run; exit 1 when a run collapsed or exploded",
        description="Apply the health rules (collapse, explosion, saturation, entropy-reward law) to each run and "
        "print the verdict with its evidence. Exits 1 when any checked run collapsed or exploded.",
    )
    s.add_argument("log_dir", metavar="LOG_DIR")
    s.add_argument("--run", help="check only this run (id or name)")
    s.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    s.set_defaults(target="forkwatch.store.check:main")

    s = sub.add_parser("dashboard", help="open the Streamlit dashboard", description="Serve the dashboard for LOG_DIR.")
    s.add_argument("log_dir", metavar="LOG_DIR")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8501)
    s.set_defaults(target="forkwatch.dashboard.launch:main")

    s = sub.add_parser(
        "demo",
        help="train a tiny model offline with GRPO + forkwatch, then open the dashboard",
        description="Build a tiny model and tokenizer in code, teach it a small task with known decision points, "
        "train it with GRPO + forkwatch in several runs (one designed to collapse, one to explode, healthy ones, "
        "ICT, high-entropy, random), check them, then serve the dashboard. Runs on the CPU, no network.",
    )
    s.add_argument("--out", default="demo_runs", help="output folder (log dir and cached warm-up model)")
    s.add_argument("--steps", type=int, default=None, help="GRPO steps per run (the collapse run keeps its own cap)")
    s.add_argument("--quick", action="store_true",
                   help="cut the healthy runs to 20 steps (the alarmed ones still stop at their alarm)")
    s.add_argument("--seed", type=int, default=None, help="seed of the GRPO runs (default 0; the warm-up is shared)")
    s.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the tiny model gains nothing from more, and on a busy machine "
                   "extra threads slow it down)")
    s.add_argument("--no-dashboard", action="store_true", help="do not start the dashboard at the end")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8501)
    s.set_defaults(target="forkwatch.cli:demo")
    return p


def demo(args: argparse.Namespace) -> int:
    """`forkwatch demo`: the demo's pipeline returns values (demo/pipeline.py); the terminal output is here."""
    from forkwatch.demo import pipeline

    try:
        settings = pipeline.settings_from_args(args)
    except ValueError as e:
        print(f"forkwatch demo: {e}")
        return 2
    specs = pipeline.demo_runs(settings.grpo)
    steps = ", ".join(f"{s.name} {s.steps or settings.grpo.steps}" for s in specs)
    print(f"forkwatch demo: writing to {args.out}: {len(specs)} GRPO runs, seed {settings.grpo.seed}, CPU "
          f"(steps: {steps})")
    try:
        result = pipeline.run_demo(settings, args.out, threads=args.threads)
    except KeyboardInterrupt:
        print(f"\nforkwatch demo: interrupted; the runs written so far stay readable in {args.out}/logs")
        return 130
    print(f"warm-up model: {result.model_dir}")
    print(f"trained in {result.seconds:.0f} s ({result.cpu_seconds:.0f} s CPU). "
          f"Health (forkwatch check {result.log_dir}):")
    print("\n".join(result.verdict_lines))
    print("What each run shows (designed verdict):")
    for s in result.specs:
        print(f"  {s.name:<20} {s.expect.upper():<10} {s.note} (lr {s.learning_rate:g})")
    if result.forks is not None:
        print("\n".join(result.forks.lines()))
    if args.no_dashboard:
        print(f"dashboard: forkwatch dashboard {result.log_dir}")
        return 0
    from forkwatch.dashboard import launch

    # launch prints the URL and returns 0 when Ctrl-C stops the server.
    try:
        return launch.main(argparse.Namespace(log_dir=str(result.log_dir), host=args.host, port=args.port))
    except KeyboardInterrupt:  # a second Ctrl-C while streamlit shuts down
        return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    module_name, func_name = args.target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
