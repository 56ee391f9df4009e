"""`forkwatch runs` and `forkwatch sql`: the CLI side of the store. Output goes to stdout, errors are one line on
stderr with a non-zero exit (1: the query or the data; 2: the directory), never a traceback."""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from . import layout, queries
from .sandbox import SandboxError, open_sandboxed
from .views import connect


def _error(message: str, code: int) -> int:
    print(f"forkwatch: error: {message}", file=sys.stderr)
    return code


def _check_dir(log_dir: str) -> int | None:
    path = Path(log_dir)
    if not path.exists():
        return _error(f"no such directory: {log_dir}", 2)
    if not path.is_dir():
        return _error(f"not a directory: {log_dir}", 2)
    if not layout.run_dirs(path):
        return _error(f"no runs in {log_dir} (a run is a folder with a run.json)", 2)
    return None


def _quiet_logging() -> None:
    # Warnings about skipped parts go to stderr once each, as one line, without a logger prefix.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="forkwatch: warning: %(message)s", stream=sys.stderr)


def runs(args: argparse.Namespace) -> int:
    """List the runs in LOG_DIR: name, steps, tokens, status (plus run id and last step)."""
    _quiet_logging()
    if (code := _check_dir(args.log_dir)) is not None:
        return code
    try:
        con = connect(args.log_dir)
        df = queries.list_runs(con)
        con.close()
    except (duckdb.Error, OSError) as e:
        return _error(str(e).strip().splitlines()[0], 1)
    df = df[["name", "run_id", "steps", "tokens", "last_step", "status", "dropped"]]
    print(_table(df))
    return 0


def sql(args: argparse.Namespace) -> int:
    """Run one read-only statement through the sandbox and print the rows as a table, CSV or JSON."""
    _quiet_logging()
    if (code := _check_dir(args.log_dir)) is not None:
        return code
    max_rows = args.max_rows if args.format == "table" else None
    try:
        with open_sandboxed(args.log_dir, timeout_s=args.timeout, max_rows=None) as sb:
            df = sb.query(args.query, max_rows=max_rows)
    except SandboxError as e:
        return _error(str(e), 1)
    except (duckdb.Error, OSError) as e:
        return _error(str(e).strip().splitlines()[0], 1)
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
    return 0


def _table(df: pd.DataFrame) -> str:
    if df.empty:
        return " ".join(map(str, df.columns)) + "\n(no rows)"
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 60):
        return df.to_string(index=False)


def _jsonify_nested(df: pd.DataFrame) -> pd.DataFrame:
    """Lists and maps (alt_token_ids, rewards) as JSON text in CSV cells rather than Python reprs."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object and out[col].map(lambda v: isinstance(v, dict | list | np.ndarray)).any():
            out[col] = out[col].map(
                lambda v: (
                    json.dumps(v.tolist() if isinstance(v, np.ndarray) else v, default=str)
                    if isinstance(v, dict | list | np.ndarray)
                    else v
                )
            )
    return out
