"""The health rules over the labelled corpus: the results table of docs/experiments.md ("The health rules on a
labelled corpus"), and, once, the demo's designed runs saved into the corpus.

    .venv/bin/python scripts/health_corpus.py               # print the table (noise seed 0, default rules)
    .venv/bin/python scripts/health_corpus.py --write-docs  # replace the table in docs/experiments.md
    .venv/bin/python scripts/health_corpus.py --demo        # train the demo's collapse, explosion and one healthy
                                                            # run (seed 0) and save their steps to corpus/demo/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "corpus"))
import shapes  # noqa: E402
from forkwatch.store.health import HealthReport, HealthRules, judge  # noqa: E402

DOCS = ROOT / "docs" / "experiments.md"
BEGIN, END = "<!-- health-corpus table: begin -->", "<!-- health-corpus table: end -->"
# the rules as they were before severity levels: every entropy signal an alarm (the "signal alone" column)
SIGNAL_ONLY = HealthRules(alarm_needs_evidence=False)
DEMO_RUNS = ("grpo_alphabetical", "grpo_entropy_bonus", "grpo")  # designed collapse, explosion, healthy


def _row(name: str, label: str, n: int, source: str, report: HealthReport, signal_only: HealthReport) -> str:
    d = report.deciding
    fired = f"{d.rule} at {d.fired_at}" if d else "—"
    ok = "✓" if (report.verdict == label if label != "healthy" else not report.alarm) else "✗"
    return (f"| {name} | {n} | {label} | {report.verdict} | {report.severity} | {fired} | {ok} | "
            f"{signal_only.verdict} | {source} |")


def _both(data, vocab_size=None) -> tuple[HealthReport, HealthReport]:
    return judge(data, vocab_size=vocab_size), judge(data, SIGNAL_ONLY, vocab_size=vocab_size)


def table() -> str:
    """The results table (markdown): every series at noise seed 0 with the default rules."""
    lines = [BEGIN,
             "| series | steps | label | verdict | severity | first flag (rule at step) | right | signal alone "
             "| imitates |",
             "|---|---|---|---|---|---|---|---|---|"]
    for spec in shapes.SPECS:
        lines.append(_row(spec.name, spec.label, spec.n_steps, spec.source.split(" (")[0],
                          *_both(shapes.series(spec.name, 0))))
    for d in shapes.load_demo():
        lines.append(_row(f"demo_{d.name}", d.label, int(d.data["step"].size), d.source,
                          *_both(d.data, d.vocab_size)))
    return "\n".join([*lines, END])


def write_docs() -> None:
    text = DOCS.read_text()
    if BEGIN not in text:
        raise SystemExit(f"{DOCS} has no {BEGIN!r} marker: add the section first")
    head, rest = text.split(BEGIN, 1)
    DOCS.write_text(head + table() + rest.split(END, 1)[1])


def save_demo(out: Path) -> None:
    """Train the demo's designed runs once (seed 0) through the demo pipeline and save their steps as CSV."""
    from dataclasses import replace

    import torch
    from forkwatch.demo import pipeline, runs
    from forkwatch.demo.warmup import cached_warmup
    from forkwatch.store import connect, queries
    from forkwatch.store.run_meta import vocab_size_from_meta

    torch.set_num_threads(1)
    settings = pipeline.settings_for(seed=0)
    # on_alarm="log": the whole designed length of each run, not only the steps up to its alarm
    grpo = replace(settings.grpo, on_alarm="log")
    specs = [s for s in runs.demo_runs(grpo) if s.name in DEMO_RUNS]
    if len(specs) != len(DEMO_RUNS):
        raise SystemExit(f"the demo has no run named {set(DEMO_RUNS) - {s.name for s in specs}}")
    model_dir = cached_warmup(out, settings.warmup, progress=False)
    runs.train_all(specs, model_dir=model_dir, log_dir=out / "logs", settings=grpo, work_dir=out / "work",
                   progress=False)
    con = connect(out / "logs")
    overview = queries.run_overview(con).set_index("name")
    shapes.DEMO_DIR.mkdir(exist_ok=True)
    for spec in specs:
        row = overview.loc[spec.name]
        df = queries.step_series(con, row["run_id"])[list(shapes.COLUMNS)]
        head = [f"# label: {spec.expect}", "# source: forkwatch demo (seed 0)",
                f"# vocab_size: {vocab_size_from_meta(row['meta']) or ''}", f"# note: {spec.note}"]
        (shapes.DEMO_DIR / f"{spec.name}.csv").write_text("\n".join(head) + "\n" + df.to_csv(index=False,
                                                                                              float_format="%.6g"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--demo", metavar="WORK_DIR", type=Path, help="train the demo runs here and save their steps")
    args = p.parse_args()
    if args.demo:
        save_demo(args.demo)
    if args.write_docs:
        write_docs()
    print(table())


if __name__ == "__main__":
    main()
