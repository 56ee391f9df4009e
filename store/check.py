"""The health report: each run's verdict with its evidence, as `forkwatch check` and `forkwatch runs` report it and
the dashboard's badges show it (the CLI prints and sets the exit code), and the run's recording faults and unsent
alerts next to it: a verdict over a series with gaps should say so. Each flag is worded by `Flag.describe_lines()`
(store/health.py), the one wording of a flag.

A stored run is judged with the rules it was trained under (run.json), by `judge_run`, so the verdict read
afterwards names the same rule and step as the live alarm that stopped it. A run forkwatch did not record (a TRL
trainer_state.json, a CSV/JSONL of metrics, TensorBoard events: store/importer.py) is judged by `check_source`,
without writing anything, with the same rules and the same report.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .health import HealthReport, HealthRules, judge
from .location import resolve
from .run_meta import RunRules, alert_counts, given_rules, rules_of_run, vocab_size_from_meta


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
                        "alerts": alert_counts(row.meta), "report": report})
        return out
    finally:
        con.close()


def check_source(path: str | Path, *, columns: Mapping[str, str] | None = None, preset: str | None = None,
                 rules: HealthRules | None = None) -> dict[str, Any]:
    """The verdict of a run forkwatch did not record, read from `path` (store/importer.py) and judged without writing
    it anywhere: the same entry as one of `check_runs`, with `source` (what was read) added. Raises
    importer.SourceError naming the file and the fix when it cannot be read."""
    from . import importer

    run = importer.read_source(path, columns=columns, preset=preset)
    chosen = given_rules(rules) if rules is not None else RunRules(
        HealthRules(), "default", "judged with the default rules (an imported run records none; --rules to change)")
    report = judge(run.series(), chosen.rules)
    mapped = ", ".join(f"{c}<-{n}" for c, n in run.mapping.items())
    report.notes[:0] = [chosen.note, f"read {run.format} {run.source} (preset {run.preset}; {mapped})", *run.notes]
    return {"run_id": importer.default_run_id(run), "name": importer.default_run_id(run), "status": "not recorded "
            "by forkwatch", "faults": 0, "faults_detail": "", "dropped": 0, "rules_source": chosen.source, "alerts": {},
            "source": run.source, "report": report}


def verdict_label(report: HealthReport) -> str:
    """The verdict in one short phrase, the same in the terminal and on the dashboard: "COLLAPSE (alarm:
    collapse.mean at step 40)", "HEALTHY (warning: explosion.mean at step 12)", "HEALTHY", "INSUFFICIENT_DATA"."""
    d = report.deciding
    head = report.verdict.upper()
    return f"{head} ({d.severity}: {d.rule} at step {d.fired_at})" if d else head


def format_report(run_id: str, status: str | None, report: HealthReport, *, faults: int = 0,
                  faults_detail: str = "", dropped: int = 0, alerts: Mapping[str, int] | None = None) -> str:
    """The verdict as a person reads it in a terminal: each flag as `Flag.describe_lines()` words it, the rules that
    could not be evaluated, the law fit, the notes; recording faults, dropped records and unsent alerts first."""
    lines = [f"{run_id}: {verdict_label(report)}  ({report.n_steps} steps, status {status or 'unknown'})"]
    if faults:
        lines.append(f"  RECORDING FAULTS: {faults} ({faults_detail}); training was not affected, but the records of "
                     "those places may have gaps")
    if dropped:
        lines.append(f"  DROPPED RECORDS: {dropped} (queue full, or write errors: disk, object store; counts per table in run.json)")
    if alerts and alerts.get("failed"):
        lines.append(f"  ALERTS NOT SENT: {alerts['failed']} of {alerts['failed'] + alerts.get('sent', 0)} (the "
                     "webhook was down, slow or refused them; the trainer's log has the first error)")
    for f in report.flags:
        first, *rest = f.describe_lines()
        lines.append(f"  {first}")
        lines += [f"      {line}" for line in rest]
    if report.not_evaluated:
        lines.append("  not evaluated: " + "; ".join(f"{k} ({v})" for k, v in report.not_evaluated.items()))
    lines.append(f"  law: {report.law.describe()}")
    lines += [f"  note: {n}" for n in report.notes]
    return "\n".join(lines)
