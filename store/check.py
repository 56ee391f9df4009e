"""Each run's health verdict with its evidence (what `forkwatch check` reports; the CLI prints and sets the exit
code), and the run's recording faults next to it: a verdict over a series with gaps should say so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .health import HealthReport, HealthRules, evaluate, vocab_size_from_meta
from .location import resolve


def check_runs(log_dir: str | Path, run: str | None = None, rules: HealthRules | None = None) -> list[dict[str, Any]]:
    """The verdict of each run in `log_dir` (or of the run whose id or name is `run`).

    Raises FileNotFoundError for a missing directory, LookupError when there is no run (or no such run)."""
    from . import connect, queries

    path = resolve(log_dir)
    if not path.exists():
        raise FileNotFoundError(f"log directory {path.url!r} does not exist")
    con = connect(path)
    try:
        runs = queries.run_overview(con)
        if runs.empty:
            raise LookupError(f"no forkwatch run in {path.url!r}")
        if run is not None:
            runs = runs[(runs["run_id"] == run) | (runs["name"] == run)]
            if runs.empty:
                raise LookupError(f"no run {run!r} in {path.url!r}")
        out = []
        for row in runs.itertuples(index=False):
            series = queries.step_series(con, row.run_id)
            report = evaluate(series, rules, vocab_size=vocab_size_from_meta(row.meta))
            out.append({"run_id": row.run_id, "name": row.name, "status": row.status, "faults": int(row.faults),
                        "faults_detail": row.faults_detail, "dropped": int(row.dropped), "report": report})
        return out
    finally:
        con.close()


def _fmt_steps(steps: list[int]) -> str:
    return f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}–{steps[-1]} ({len(steps)} steps shown)"


def format_report(run_id: str, status: str | None, report: HealthReport, *, faults: int = 0,
                  faults_detail: str = "", dropped: int = 0) -> str:
    """The verdict as a person reads it in a terminal: rule, step, evidence, the law fit, notes."""
    lines = [f"{run_id}: {report.verdict.upper()}  ({report.n_steps} steps, status {status or 'unknown'})"]
    if faults:
        lines.append(f"  RECORDING FAULTS: {faults} ({faults_detail}); training was not affected, but the records of "
                     "those places may have gaps")
    if dropped:
        lines.append(f"  DROPPED RECORDS: {dropped} (queue full or disk errors; counts per table in run.json)")
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
