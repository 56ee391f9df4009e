"""The labelled corpus (corpus/shapes.py, corpus/demo/) judges the health rules: in the first group every collapse
and explosion is alarmed with its kind and no healthy series is alarmed (warnings allowed), at several noise seeds;
the overlap group's results (misses and false alarms included) are the ones docs/experiments.md reports; the live
monitor, fed in hand-offs of any size, raises exactly the flags `judge` finds on the whole series; and every table
in docs/experiments.md is the one scripts/health_corpus.py prints (the sensitivity table: each change it reports
is checked at its value and at the value before it)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from forkwatch.store.health import RULE_KINDS, HealthRules, LiveMonitor, judge

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "corpus"))
sys.path.insert(0, str(ROOT / "scripts"))
import health_corpus  # noqa: E402
import shapes  # noqa: E402

SEEDS = range(5)


FIRST = [s for s in shapes.SPECS if s not in shapes.OVERLAP]  # the group every verdict of which must be right


def _cases():
    for spec in FIRST:
        yield pytest.param(spec.name, spec.label, id=spec.name)


def test_the_corpus_covers_every_label_with_enough_series_of_realistic_length():
    def counts(specs):
        labels = [s.label for s in specs]
        return {lab: labels.count(lab) for lab in shapes.LABELS}

    assert counts(FIRST) == {"healthy": 12, "collapse": 6, "explosion": 5}
    assert counts(shapes.OVERLAP) == {"healthy": 3, "collapse": 2, "explosion": 2}
    assert all(150 <= s.n_steps <= 1000 and s.source for s in shapes.SPECS)
    data = shapes.series(shapes.SPECS[0].name)
    assert set(data) == set(shapes.COLUMNS)
    # every failing series has an onset, at a step of the series; the healthy ones none
    assert all((s.onset_step is None) == (s.label == "healthy") for s in shapes.SPECS)
    assert all(1 <= s.onset_step <= s.n_steps for s in shapes.SPECS if s.onset_step is not None)


def test_the_overlap_groups_healthy_and_failing_series_overlap_in_their_entropy_ratios():
    def extreme(spec):  # the noiseless mean entropy's lowest and highest ratio to its start
        u = np.linspace(0, 1, spec.n_steps)
        ratio = spec.curves.entropy(u) / spec.curves.entropy(u[:1])[0]
        return ratio.min(), ratio.max()

    lowest_healthy = min(extreme(s)[0] for s in shapes.OVERLAP if s.label == "healthy")
    highest_collapse = max(extreme(s)[0] for s in shapes.OVERLAP if s.label == "collapse")
    highest_healthy = max(extreme(s)[1] for s in shapes.OVERLAP if s.label == "healthy")
    lowest_explosion = min(extreme(s)[1] for s in shapes.OVERLAP if s.label == "explosion")
    assert lowest_healthy < 0.2 < highest_collapse, "a healthy drain goes lower than a collapse stops"
    assert lowest_explosion < 2.0 < highest_healthy, "a healthy rise goes higher than an explosion peaks"


@pytest.mark.parametrize(("name", "label"), list(_cases()))
def test_every_series_gets_its_label_at_every_noise_seed(name, label):
    for seed in SEEDS:
        report = judge(shapes.series(name, seed))
        if label == "healthy":
            assert not report.alarm, (seed, [(f.rule, f.fired_at, f.evidence) for f in report.flags if f.is_alarm])
            assert report.verdict == "healthy"
        else:
            assert report.alarm and report.verdict == label, (seed, report.verdict, report.flags)
            assert report.deciding.kind == label and report.deciding.evidence


def test_the_demo_runs_get_their_designed_verdicts():
    demo = shapes.load_demo()
    if not demo:
        pytest.skip("corpus/demo/ holds no demo run (scripts/health_corpus.py --demo writes them)")
    for d in demo:
        report = judge(d.data, vocab_size=d.vocab_size)
        assert report.verdict == d.label, (d.name, report.verdict, report.flags)


def _live_flags(data: dict[str, np.ndarray], rules: HealthRules, sizes: np.random.Generator,
                vocab_size: int | None = None) -> list[tuple]:
    monitor = LiveMonitor(rules, vocab_size=vocab_size)
    rows = [{k: float(v[i]) for k, v in data.items()} for i in range(data["step"].size)]
    seen, i = [], 0
    while i < len(rows):
        chunk = rows[i : i + int(sizes.integers(1, 12))]
        for f in monitor.update_many(chunk):
            assert f.fired_at <= chunk[-1]["step"], "a flag comes back no later than the hand-off of its step"
            assert f.fired_at >= chunk[0]["step"], "and not later than that hand-off either: fired_at is causal"
            seen.append(f.key)
        i += len(chunk)
    return seen


@pytest.mark.parametrize("rules", [HealthRules(), HealthRules(alarm_needs_evidence=False, sustain_steps=1)],
                         ids=["default", "no_evidence_sustain_1"])
def test_live_monitor_raises_exactly_the_flags_of_the_batch_judgement_on_every_corpus_series(rules):
    sizes = np.random.default_rng(0)
    cases = [(s.name, shapes.series(s.name), None) for s in shapes.SPECS]
    cases += [(d.name, d.data, d.vocab_size) for d in shapes.load_demo()]
    for name, data, vocab_size in cases:
        live = _live_flags(data, rules, sizes, vocab_size)
        batch = [f.key for f in judge(data, rules, vocab_size=vocab_size).flags]
        assert len(live) == len(set(live)), f"{name}: a flag reported twice"
        assert sorted(live) == sorted(batch), name
    assert len(cases) >= len(shapes.SPECS)


@pytest.mark.parametrize("rules", [HealthRules(), HealthRules(alarm_needs_evidence=False, sustain_steps=1)],
                         ids=["default", "no_evidence_sustain_1"])
def test_live_monitor_fed_step_by_step_raises_each_flag_at_its_step_and_tracks_active_kinds(rules):
    # one row per update (on_alarm="stop" feeds it so): most updates find no signal and skip the judgement; the
    # flags must still be exactly the batch judgement's, each returned by the update of the step it fired at, and
    # the kinds active at every step those of a judgement of the series so far (the first group: the overlap group
    # goes through the hand-off test above and the property tests)
    cases = [(s.name, shapes.series(s.name), None) for s in FIRST]
    cases += [(d.name, d.data, d.vocab_size) for d in shapes.load_demo()]
    skipped = 0
    for name, data, vocab_size in cases:
        monitor = LiveMonitor(rules, vocab_size=vocab_size)
        live = []
        n = data["step"].size
        for i in range(n):
            row = {k: float(v[i]) for k, v in data.items()}
            new = monitor.update(row)
            skipped += monitor._last_quiet
            assert all(f.fired_at == row["step"] for f in new), name
            live += [f.key for f in new]
            if i % 10 == 0 or new or i == n - 1:  # the active kinds against a judgement of the series so far
                flags = judge({k: v[: i + 1] for k, v in data.items()}, rules, vocab_size=vocab_size).flags
                for severity in ("alarm", "warning"):
                    active = {f.kind for f in flags if f.severity == severity and f.until == row["step"]}
                    assert monitor.active_kinds(severity) == {k: k in active for k in RULE_KINDS}, (name, i)
        assert sorted(live) == sorted(f.key for f in judge(data, rules, vocab_size=vocab_size).flags), name
    assert skipped > 0, "no update ever skipped the judgement"


@pytest.mark.parametrize("name", ["table", "summary", "latency", "ceiling", "law", "real", "real_summary"])
def test_the_tables_in_docs_are_the_ones_the_script_prints(name):
    text = (ROOT / "docs" / "experiments.md").read_text()
    assert health_corpus.TABLES[name]() in text, f"run: .venv/bin/python scripts/health_corpus.py --write-docs --only {name}"


def _documented_changes(table: str = "sensitivity"):
    """(threshold, direction index, value, [changed series]) of every change a sensitivity table of the docs reports."""
    text = (ROOT / "docs" / "experiments.md").read_text()
    body = text.split(f"<!-- health-corpus {table}: begin -->")[1].split(f"<!-- health-corpus {table}: end -->")[0]
    out = []
    for line in body.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        name = cells[0].strip("`")
        for direction, cell in enumerate(cells[2:4]):
            if cell.startswith("**"):
                value = float(cell.split("**")[1])
                series = [part.split(":")[0].strip() for part in cell.split("**: ")[1].split("; ") if ":" in part]
                out.append((name, direction, value, series))
    return out


@pytest.mark.parametrize(("table", "corpus"), [("sensitivity", "labelled_cases"), ("real_sensitivity", "real_cases")])
def test_each_change_in_a_sensitivity_table_happens_at_its_value_and_not_before(table, corpus):
    cases = {c.name: c for c in getattr(health_corpus, corpus)()}
    documented = _documented_changes(table)
    assert len(documented) >= 8
    for name, direction, value, series in documented:
        values = health_corpus.SWEEPS[name][direction]
        at = values.index(value)
        for n in series:
            change = health_corpus.first_change([cases[n]], name, values[: at + 1])
            assert change is not None and change.value == value, (name, value, n)


def test_check_reads_back_the_live_monitors_flags_from_the_stored_steps(tmp_path):
    """Every corpus series written as a run's steps (float32 on disk) and judged by `check` raises the flags the live
    monitor raised on the values as the plugin hands them over (Python floats)."""
    from forkwatch.store import RunWriter
    from forkwatch.store.check import check_runs

    live = {}
    for spec in shapes.SPECS:
        data = shapes.series(spec.name)
        w = RunWriter(tmp_path, spec.name, meta={"config": {}})
        w.put("steps", {k: v.astype(np.int32) if k == "step" else v.astype(np.float32) for k, v in data.items()})
        w.close()
        monitor = LiveMonitor()
        rows = [{k: float(v[i]) for k, v in data.items()} for i in range(data["step"].size)]
        live[spec.name] = sorted(f.key for i in range(0, len(rows), 5) for f in monitor.update_many(rows[i : i + 5]))
    for r in check_runs(tmp_path):
        assert sorted(f.key for f in r["report"].flags) == live[r["run_id"]], r["run_id"]
