"""Each stored run's health verdict with its evidence (what `forkwatch check` and `forkwatch runs` report and the
dashboard's badges show; the CLI prints and sets the exit code), and the run's recording faults next to it: a
verdict over a series with gaps should say so.

A stored run is judged with the rules it was trained under (run.json), by `judge_run`, so the verdict read
afterwards names the same rule and step as the live alarm that stopped it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .health import HealthReport, HealthRules, judge
from .location import resolve
from .run_meta import RunRules, given_rules, rules_of_run, vocab_size_from_meta


def judge_run(series: Any, meta: Any, rules: HealthRules | None = None) -> tuple[HealthReport, RunRules]:
    """One stored run's report: its steps (`queries.step_series`) judged with its own rules from run.json `meta`
    (the defaults when it has none), or with `rules` when given; the report's notes say which."""
    chosen = given_rules(rules) if rules is not None else rules_of_run(meta)
    report = judge(series, chosen.rules, vocab_size=vocab_size_from_meta(meta))
    report.notes.insert(0, chosen.note)
    return report, chosen


def check_runs(log_dir: str | Path, run: str | None = None, rules: HealthRules | None = None) -> list[dict[str, Any]]:
    """The verdict of each run in `log_dir` (or of the run whose id or name is `run`); `rules` re-judges every run
    with other rules than its own.

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
            report, chosen = judge_run(queries.step_series(con, row.run_id), row.meta, rules)
            out.append({"run_id": row.run_id, "name": row.name, "status": row.status, "faults": int(row.faults),
                        "faults_detail": row.faults_detail, "dropped": int(row.dropped), "rules_source": chosen.source,
                        "report": report})
        return out
    finally:
        con.close()


def verdict_label(report: HealthReport) -> str:
    """The verdict in one short phrase, the same in the terminal and on the dashboard: "COLLAPSE (alarm:
    collapse.mean at step 40)", "HEALTHY (warning: explosion.mean at step 12)", "HEALTHY", "INSUFFICIENT_DATA"."""
    d = report.deciding
    head = report.verdict.upper()
    return f"{head} ({d.severity}: {d.rule} at step {d.fired_at})" if d else head


def _fmt_steps(steps: list[int]) -> str:
    return f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}–{steps[-1]} ({len(steps)} steps shown)"


def format_report(run_id: str, status: str | None, report: HealthReport, *, faults: int = 0,
                  faults_detail: str = "", dropped: int = 0) -> str:
    """The verdict as a person reads it in a terminal: rule, severity, step, evidence, the law fit, notes."""
    lines = [f"{run_id}: {verdict_label(report)}  ({report.n_steps} steps, status {status or 'unknown'})"]
    if faults:
        lines.append(f"  RECORDING FAULTS: {faults} ({faults_detail}); training was not affected, but the records of "
                     "those places may have gaps")
    if dropped:
        lines.append(f"  DROPPED RECORDS: {dropped} (queue full, or write errors: disk, object store; counts per table in run.json)")
    for f in report.flags:
        lines.append(f"  {f.severity.upper()} [{f.rule}] fired at step {f.fired_at}: {f.message}")
        values = ", ".join(f"{v:.4g}" for v in f.values[:8]) + (" …" if len(f.values) > 8 else "")
        lines.append(f"      signal: steps {_fmt_steps(f.steps)}; values {values}; threshold {f.threshold:.4g}")
        lines += [f"      evidence: {e}" for e in f.evidence]
        if f.supporting:
            lines.append("      at the flag: " + ", ".join(f"{k}={v:.4g}" for k, v in f.supporting.items()))
    lines.append(f"  law: {report.law.describe()}")
    lines += [f"  note: {n}" for n in report.notes]
    return "\n".join(lines)
