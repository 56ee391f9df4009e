"""`forkwatch check LOG_DIR [--run R] [--json]`: each run's health verdict with its evidence, as a pipeline gate.

Exit codes: 0 when no checked run collapsed or exploded, 1 when one did, 2 (one line on stderr) when the log
directory is missing or holds no run, or `--run` names no run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

from .health import HealthReport, HealthRules, evaluate, vocab_size_from_meta

EXIT_OK, EXIT_ALARM, EXIT_USAGE = 0, 1, 2


def check_runs(log_dir: str | Path, run: str | None = None, rules: HealthRules | None = None) -> list[dict[str, Any]]:
    """The verdict of each run in `log_dir` (or of the run whose id or name is `run`).

    Raises FileNotFoundError for a missing directory, LookupError when there is no run (or no such run)."""
    from . import connect, queries

    path = Path(log_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"log directory {str(path)!r} does not exist")
    con = connect(path)
    try:
        runs = queries.run_overview(con)
        if runs.empty:
            raise LookupError(f"no forkwatch run in {str(path)!r}")
        if run is not None:
            runs = runs[(runs["run_id"] == run) | (runs["name"] == run)]
            if runs.empty:
                raise LookupError(f"no run {run!r} in {str(path)!r}")
        out = []
        for row in runs.itertuples(index=False):
            series = queries.step_series(con, row.run_id)
            report = evaluate(series, rules, vocab_size=vocab_size_from_meta(row.meta))
            out.append({"run_id": row.run_id, "name": row.name, "status": row.status, "report": report})
        return out
    finally:
        con.close()


def _fmt_steps(steps: list[int]) -> str:
    return f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}–{steps[-1]} ({len(steps)} steps shown)"


def format_report(run_id: str, status: str | None, report: HealthReport) -> str:
    lines = [f"{run_id}: {report.verdict.upper()}  ({report.n_steps} steps, status {status or 'unknown'})"]
    for f in report.flags:
        lines.append(f"  [{f.rule}] fired at step {f.fired_at}: {f.message}")
        values = ", ".join(f"{v:.4g}" for v in f.values[:8]) + (" …" if len(f.values) > 8 else "")
        lines.append(f"      evidence: steps {_fmt_steps(f.steps)}; values {values}; threshold {f.threshold:.4g}")
        if f.supporting:
            lines.append("      supporting: " + ", ".join(f"{k}={v:.4g}" for k, v in f.supporting.items()))
    law = report.law
    if law.ok:
        lines.append(
            f"  law R = -a·exp(H) + b: a={law.a:.4g}, b={law.b:.4g}, ceiling={law.ceiling:.4g}, "
            f"R²={law.r2:.3f}, {law.n_points} points"
        )
    else:
        lines.append(f"  law: no ceiling ({law.reason})")
    lines += [f"  note: {n}" for n in report.notes]
    return "\n".join(lines)


def main(args, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    try:
        results = check_runs(args.log_dir, getattr(args, "run", None))
    except (FileNotFoundError, LookupError) as e:
        err.write(f"forkwatch check: {e}\n")
        return EXIT_USAGE
    if getattr(args, "json", False):
        payload = [{k: v for k, v in r.items() if k != "report"} | r["report"].to_dict() for r in results]
        out.write(json.dumps(payload, indent=2, default=str) + "\n")
    else:
        out.write("\n".join(format_report(r["run_id"], r["status"], r["report"]) for r in results) + "\n")
    return EXIT_ALARM if any(r["report"].alarm for r in results) else EXIT_OK
