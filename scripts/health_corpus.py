"""The health rules over the labelled corpora: the tables of docs/experiments.md ("The health rules on a labelled
corpus") — results, misses and false alarms over noise seeds, detection latency, the sensitivity of every threshold,
the reward-ceiling decision before and after — and, once, the demo's designed runs saved into the corpus.

    .venv/bin/python scripts/health_corpus.py               # print the tables (default rules)
    .venv/bin/python scripts/health_corpus.py --write-docs  # replace the tables in docs/experiments.md
    .venv/bin/python scripts/health_corpus.py --demo DIR    # train the demo's collapse, explosion and one healthy
                                                            # run (seed 0) and save their steps to corpus/demo/

The synthetic series are corpus/shapes.py's (noise seed 0 in the per-series tables, seeds 0–4 in the summary); the
demo's are corpus/demo/*.csv; the real runs, when corpus/real/ holds them, corpus/real/manifest.csv's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "corpus"))
import shapes  # noqa: E402
from forkwatch.store.health import HealthReport, HealthRules, judge  # noqa: E402

DOCS = ROOT / "docs" / "experiments.md"
# the rules as they were before severity levels: every entropy signal an alarm (the "signal alone" column)
SIGNAL_ONLY = HealthRules(alarm_needs_evidence=False)
DEMO_RUNS = ("grpo_alphabetical", "grpo_entropy_bonus", "grpo")  # designed collapse, explosion, healthy
SEEDS = range(5)


@dataclass(frozen=True)
class Case:
    """One labelled series: where it comes from and how to judge it."""

    name: str
    label: str
    group: str  # "synthetic" | "overlap" | "demo" | "real"
    source: str
    data: dict
    vocab_size: int | None = None
    reward_range: tuple[float, float] | None = None
    onset: int | None = None

    def judge(self, rules: HealthRules | None = None, *, declared: bool = False) -> HealthReport:
        rules = rules or HealthRules()
        if declared and self.reward_range is not None:
            rules = replace(rules, reward_range=self.reward_range)
        return judge(self.data, rules, vocab_size=self.vocab_size)


def synthetic_cases(seed: int = 0) -> list[Case]:
    overlap = {s.name for s in shapes.OVERLAP}
    return [Case(s.name, s.label, "overlap" if s.name in overlap else "synthetic", s.source.split(" (")[0],
                 shapes.series(s.name, seed), None, s.reward_range, s.onset_step) for s in shapes.SPECS]


def demo_cases() -> list[Case]:
    return [Case(f"demo_{d.name}", d.label, "demo", d.source, d.data, d.vocab_size) for d in shapes.load_demo()]


def labelled_cases(seed: int = 0) -> list[Case]:
    return synthetic_cases(seed) + demo_cases()


REAL = ROOT / "corpus" / "real"
# The runs whose names no preset knows (ROLL, XTuner, an OpenRLHF report table, a W&B export with short names):
# their names as corpus/real/README.md describes them, by run id (a prefix covers a family of runs)
_EXP27 = "entropy=entropy,reward=score_mean,length=len_mean,truncated=len_clip_ratio,loss=pg_loss,grad_norm=grad_norm"
REAL_COLUMNS = {
    "rdan_": "entropy=actor/entropy,reward=reward/selected_mean,length=length/mean,truncated=length/cap_hit_rate,"
             "loss=actor/pg_loss,grad_norm=actor_train/grad_norm,kl=actor/kl_loss",
    "rft_": "entropy=Entropy,reward=Reward,length=RespLen,truncated=Trunc,loss=Loss,grad_norm=GradNorm,kl=KL",
    "cogrpo_": "entropy=avg entropy,reward=rewards/mean,length=response_len/mean",
    # ef_r1's export names its score and truncation ratio differently from its siblings'
    "exp27_q25_1.5b_gsm8k_ef_r1": "entropy=entropy,reward=score,length=len_mean,truncated=clip_ratio,loss=pg_loss,"
                                  "grad_norm=grad_norm",
    "exp27_": _EXP27,
}


def _real_columns(run_id: str) -> str | None:
    """The column mapping of a real run that no framework preset reads (the longest matching id prefix), or None."""
    hits = [k for k in REAL_COLUMNS if run_id.startswith(k)]
    return REAL_COLUMNS[max(hits, key=len)] if hits else None


def real_cases() -> list[Case]:
    """The public runs of corpus/real/ (manifest.csv), read by the importer as `forkwatch check` reads them: the
    framework's preset, or the names above; [] when the corpus is not there."""
    import csv

    from forkwatch.store.importer import PRESETS, parse_columns, read_source

    manifest = REAL / "manifest.csv"
    if not manifest.is_file():
        return []
    cases = []
    for row in csv.DictReader(manifest.open()):
        columns = parse_columns(_real_columns(row["id"]))
        preset = row["framework"] if row["framework"] in PRESETS and not columns else None
        run = read_source(REAL / row["file"], columns=columns, preset=preset)
        cases.append(Case(row["id"], row["label"], "real", f"{row['repository']} ({row['framework']})",
                          run.series()))
    return cases


def right(label: str, report: HealthReport) -> bool:
    """A healthy run is right when it raised no alarm (warnings allowed); a failing one when alarmed with its kind."""
    return not report.alarm if label == "healthy" else report.verdict == label


def _first(report: HealthReport) -> str:
    d = report.deciding
    return f"{d.rule} at {d.fired_at}" if d else "—"


def _marked(name: str, lines: Iterable[str]) -> str:
    return "\n".join([f"<!-- health-corpus {name}: begin -->", *lines, f"<!-- health-corpus {name}: end -->"])


# --------------------------------------------------------------------------- results


def table(cases: list[Case] | None = None) -> str:
    """The results table (markdown): every series at noise seed 0 with the default rules."""
    lines = ["| series | steps | label | verdict | severity | first flag (rule at step) | right | signal alone "
             "| imitates |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in cases if cases is not None else labelled_cases():
        report, alone = c.judge(), c.judge(SIGNAL_ONLY)
        name = f"{c.name} ⁺" if c.group == "overlap" else c.name
        lines.append(f"| {name} | {int(c.data['step'].size)} | {c.label} | {report.verdict} | {report.severity} | "
                     f"{_first(report)} | {'✓' if right(c.label, report) else '✗'} | {alone.verdict} | {c.source} |")
    return _marked("table", lines)


def summary() -> str:
    """Misses (a failing series not alarmed with its kind), false alarms (a healthy series alarmed) and wrong kinds,
    per group, over noise seeds 0–4 (the demo's runs have one draw each)."""
    counts: dict[str, dict[str, int]] = {}
    named: dict[str, set[str]] = {}
    for seed in SEEDS:
        for c in synthetic_cases(seed) + (demo_cases() if seed == 0 else []):
            r = c.judge()
            g = counts.setdefault(c.group, {"draws": 0, "healthy": 0, "failing": 0, "false": 0, "missed": 0,
                                            "kind": 0})
            g["draws"] += 1
            if c.label == "healthy":
                g["healthy"] += 1
                g["false"] += r.alarm
            else:
                g["failing"] += 1
                g["missed"] += not r.alarm
                g["kind"] += r.alarm and r.verdict != c.label
            if not right(c.label, r):
                named.setdefault(c.group, set()).add(c.name)
    lines = ["| group | draws | false alarms (healthy alarmed) | misses (failing, no alarm) | wrong kind | "
             "series wrong at some seed |", "|---|---|---|---|---|---|"]
    for group, g in counts.items():
        lines.append(f"| {group} | {g['draws']} | {g['false']} of {g['healthy']} | {g['missed']} of {g['failing']} | "
                     f"{g['kind']} | {', '.join(sorted(named.get(group, []))) or '—'} |")
    return _marked("summary", lines)


# --------------------------------------------------------------------------- latency


def _latency(c: Case) -> tuple[int | None, int | None]:
    """Steps from the onset to the first flag of the series' kind (warning or alarm) and to its first alarm."""
    flags = [f for f in c.judge().flags if f.kind == c.label]
    warn = min((f.fired_at for f in flags), default=None)
    alarm = min((f.fired_at for f in flags if f.is_alarm), default=None)
    return (None if warn is None else warn - c.onset), (None if alarm is None else alarm - c.onset)


def latency() -> str:
    """Detection latency on the failing synthetic series: seed 0's steps, and the median over seeds 0–4."""
    per_seed = [{c.name: (c, _latency(c)) for c in synthetic_cases(seed) if c.onset is not None} for seed in SEEDS]
    lines = ["| series | label | steps | onset | first flag of its kind (seed 0) | first alarm (seed 0) | "
             "latency to a flag: seed 0 / median of 5 | latency to the alarm: seed 0 / median of 5 |",
             "|---|---|---|---|---|---|---|---|"]

    def med(values: list[int | None]) -> str:
        found = [v for v in values if v is not None]
        text = f"{statistics.median(found):g}" if found else "—"
        return text + (f" ({len(values) - len(found)} of {len(values)} never)" if len(found) < len(values) else "")

    for name, (c, (warn, alarm)) in per_seed[0].items():
        warns = [s[name][1][0] for s in per_seed]
        alarms = [s[name][1][1] for s in per_seed]
        at = ["—" if lat is None else str(c.onset + lat) for lat in (warn, alarm)]
        lines.append(f"| {name} | {c.label} | {int(c.data['step'].size)} | {c.onset} | {at[0]} | {at[1]} | "
                     f"{'—' if warn is None else warn} / {med(warns)} | {'—' if alarm is None else alarm} / "
                     f"{med(alarms)} |")
    return _marked("latency", lines)


# --------------------------------------------------------------------------- sensitivity


def _steps(start: float, stop: float, step: float) -> list[float]:
    n = int(round(abs(stop - start) / step))
    return [round(start + (step if stop > start else -step) * i, 6) for i in range(1, n + 1)]


# Each threshold's sweep, outward from its default in each direction (a value the rules refuse is skipped).
SWEEPS: dict[str, tuple[list[float], list[float]]] = {
    "collapse_fraction": (_steps(0.2, 0.01, 0.01), _steps(0.2, 0.6, 0.01)),
    "tail_floor": (_steps(0.05, 0.0, 0.005), _steps(0.05, 0.4, 0.005)),
    "explosion_factor": (_steps(2.0, 1.05, 0.05), _steps(2.0, 8.0, 0.1)),
    "explosion_log_vocab_fraction": (_steps(0.5, 0.05, 0.05), _steps(0.5, 1.0, 0.05)),
    "sustain_steps": ([2, 1], list(range(4, 31))),
    "evidence_window": (list(range(19, 4, -1)), list(range(21, 40)) + list(range(40, 201, 5))),
    "reward_stall_fraction": (_steps(0.05, 0.0, 0.005), _steps(0.05, 0.5, 0.005)),
    "reward_drop_fraction": (_steps(0.25, 0.0, 0.01), _steps(0.25, 1.0, 0.01)),
    "noise_z": (_steps(5.0, 0.0, 0.25), _steps(5.0, 15.0, 0.25)),
    "length_collapse_fraction": (_steps(0.5, 0.05, 0.05), _steps(0.5, 0.95, 0.05)),
    "length_runaway_factor": (_steps(3.0, 1.1, 0.1), _steps(3.0, 8.0, 0.1)),
    "truncation_rise": (_steps(0.15, 0.0, 0.01), _steps(0.15, 0.9, 0.01)),
    "early_steps": (list(range(4, 0, -1)), list(range(6, 41))),
    "min_steps": (list(range(7, 0, -1)), list(range(9, 61))),
}


@dataclass(frozen=True)
class Change:
    value: float
    changed: tuple[tuple[str, str, str, bool], ...]  # (series, label, new verdict, new verdict right)


def first_change(cases: list[Case], name: str, values: list[float],
                 baseline: dict[str, str] | None = None) -> Change | None:
    """The first value of `values` (ordered outward from the default) at which some case's verdict differs from its
    verdict under the default rules, and which cases changed."""
    baseline = baseline or {c.name: c.judge().verdict for c in cases}
    for v in values:
        try:
            rules = HealthRules(**{name: int(v) if isinstance(getattr(HealthRules(), name), int) else v})
        except ValueError:
            continue
        changed = []
        for c in cases:
            r = c.judge(rules)
            if r.verdict != baseline[c.name]:
                changed.append((c.name, c.label, r.verdict, right(c.label, r)))
        if changed:
            return Change(v, tuple(changed))
    return None


def _say(change: Change | None, values: list[float]) -> str:
    if change is None:
        return f"none to {values[-1]:g}" if values else "—"
    what = "; ".join(f"{n}: {v} ({'unlabelled' if label == 'unlabelled' else 'now right' if ok else 'now wrong'})"
                     for n, label, v, ok in change.changed[:3])
    more = f"; +{len(change.changed) - 3} more" if len(change.changed) > 3 else ""
    return f"**{change.value:g}**: {what}{more}"


def sensitivity(cases: list[Case] | None = None, name: str = "sensitivity") -> str:
    """Each threshold swept away from its default, down and up: the value at which the first verdict changes and
    which series change (seed 0 and the demo's runs by default)."""
    cases = cases if cases is not None else labelled_cases()
    baseline = {c.name: c.judge().verdict for c in cases}
    default = HealthRules()
    lines = ["| threshold | default | lowered: first change | raised: first change |", "|---|---|---|---|"]
    for field_ in fields(HealthRules):
        if field_.name not in SWEEPS:
            continue
        down, up = SWEEPS[field_.name]
        lines.append(f"| `{field_.name}` | {getattr(default, field_.name):g} | "
                     f"{_say(first_change(cases, field_.name, down, baseline), down)} | "
                     f"{_say(first_change(cases, field_.name, up, baseline), up)} |")
    return _marked(name, lines)


# --------------------------------------------------------------------------- the reward ceiling


def ceiling() -> str:
    """The series that declare a reward range, judged without it (before) and with it (after), seeds 0–4; every
    other series is judged the same either way (it declares none)."""
    lines = ["| series | label | reward range | before: verdicts (seeds 0–4) | after: verdicts (seeds 0–4) |",
             "|---|---|---|---|---|"]
    for spec in (s for s in shapes.SPECS if s.reward_range is not None):
        before, after = [], []
        for seed in SEEDS:
            c = next(c for c in synthetic_cases(seed) if c.name == spec.name)
            before.append(c.judge().verdict)
            after.append(c.judge(declared=True).verdict)
        lines.append(f"| {spec.name} | {spec.label} | {spec.reward_range} | {_counts(before)} | {_counts(after)} |")
    return _marked("ceiling", lines)


def _counts(verdicts: list[str]) -> str:
    return ", ".join(f"{v} {verdicts.count(v)}" for v in dict.fromkeys(verdicts))


# --------------------------------------------------------------------------- the law, extrapolated


def law() -> str:
    """The entropy–reward law fitted on the first 15 % of each synthetic series' steps (the paper's claim: enough to
    extrapolate), its prediction of the reward over the last 10 % of steps (at their entropy) against the reward
    observed there, and the fit on the whole series beside it (seed 0)."""
    from forkwatch.store.health import fit_entropy_law

    lines = ["| series | label | early fit (15 %): a, b, R², points | predicted late reward | observed late reward | "
             "error | whole-run fit: ceiling, R² |", "|---|---|---|---|---|---|---|"]
    for c in synthetic_cases():
        h, r = c.data["entropy_mean"], c.data["reward_mean"]
        early = fit_entropy_law(h, r, fraction=0.15)
        whole = fit_entropy_law(h, r)
        tail = slice(int(0.9 * h.size), None)
        observed = float(statistics.median(r[tail]))
        if early.ok:
            predicted = float(statistics.median(early.predict(h[tail])))
            fit = f"{early.a:.3g}, {early.b:.3g}, {early.r2:.2f}, {early.n_points}"
            cells = f"{predicted:.3f} | {observed:.3f} | {predicted - observed:+.3f}"
        else:
            fit, cells = f"refused: {early.reason}", f"— | {observed:.3f} | —"
        whole_cell = f"{whole.ceiling:.3f}, {whole.r2:.2f}" if whole.ok else f"refused ({whole.reason})"
        lines.append(f"| {c.name} | {c.label} | {fit} | {cells} | {whole_cell} |")
    return _marked("law", lines)


# --------------------------------------------------------------------------- the real runs (held out)

_BARS = "▁▂▃▄▅▆▇█"


def spark(values, bins: int = 20) -> str:
    """A curve in one line: the mean of each of `bins` equal stretches of the finite values, scaled min..max."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return "—"
    means = [float(np.mean(c)) for c in np.array_split(v, min(bins, v.size))]
    lo, hi = min(means), max(means)
    return "".join(_BARS[0 if hi == lo else round((m - lo) / (hi - lo) * 7)] for m in means)


def _curve(values) -> str:
    import numpy as np

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return "—" if v.size == 0 else f"{spark(v)} {v[0]:.3g}→{v[-1]:.3g}"


def real() -> str:
    """Every real run with the default rules: verdict, the flags (rule, severity, step; the first three), and its
    entropy and reward curves (20 stretches, scaled to their own range; first → last value)."""
    lines = ["| run | source | rows (last step) | label | verdict | flags: rule severity @ step | right | entropy | "
             "reward |", "|---|---|---|---|---|---|---|---|---|"]
    for c in real_cases():
        r = c.judge()
        flags = "; ".join(f"{f.rule} {f.severity} @ {f.fired_at}" for f in r.flags[:3])
        flags += f"; +{len(r.flags) - 3} more" if len(r.flags) > 3 else ""
        ok = "—" if c.label == "unlabelled" else "✓" if right(c.label, r) else "✗"
        steps = c.data["step"]
        lines.append(f"| {c.name} | {c.source} | {steps.size} ({int(steps[-1])}) | {c.label} | {r.verdict} | "
                     f"{flags or '—'} | {ok} | {_curve(c.data['entropy_mean'])} | "
                     f"{_curve(c.data.get('reward_mean', []))} |")
    return _marked("real", lines)


def real_summary() -> str:
    """The real runs by label: how many were alarmed, warned only, left quiet or without a verdict."""
    rows: dict[str, dict[str, int]] = {}
    for c in real_cases():
        r = c.judge()
        key = "alarm" if r.alarm else "warning only" if r.severity == "warning" else (
            "no verdict" if r.verdict == "insufficient_data" else "nothing")
        rows.setdefault(c.label, {}).setdefault(key, 0)
        rows[c.label][key] += 1
    lines = ["| label | runs | alarm | warning only | nothing | no verdict |", "|---|---|---|---|---|---|"]
    for label, counts in rows.items():
        lines.append(f"| {label} | {sum(counts.values())} | " + " | ".join(
            str(counts.get(k, 0)) for k in ("alarm", "warning only", "nothing", "no verdict")) + " |")
    return _marked("real_summary", lines)


def real_sensitivity() -> str:
    """The sensitivity table on the real runs (labelled and unlabelled: a verdict that changes on an unlabelled run
    is neither right nor wrong, and is marked by its label)."""
    return sensitivity(real_cases(), name="real_sensitivity")


# --------------------------------------------------------------------------- docs


TABLES: dict[str, Callable[[], str]] = {"table": table, "summary": summary, "latency": latency,
                                         "sensitivity": sensitivity, "ceiling": ceiling, "law": law, "real": real,
                                         "real_summary": real_summary, "real_sensitivity": real_sensitivity}


def write_docs(names: Iterable[str] = TABLES) -> None:
    text = DOCS.read_text()
    for name in names:
        begin, end = f"<!-- health-corpus {name}: begin -->", f"<!-- health-corpus {name}: end -->"
        if begin not in text:
            raise SystemExit(f"{DOCS} has no {begin!r} marker: add the section first")
        head, rest = text.split(begin, 1)
        text = head + TABLES[name]() + rest.split(end, 1)[1]
    DOCS.write_text(text)


def save_demo(out: Path) -> None:
    """Train the demo's designed runs once (seed 0) through the demo pipeline and save their steps as CSV."""
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
    p.add_argument("--only", choices=sorted(TABLES), action="append", help="only these tables")
    p.add_argument("--demo", metavar="WORK_DIR", type=Path, help="train the demo runs here and save their steps")
    args = p.parse_args()
    if args.demo:
        save_demo(args.demo)
    names = args.only or list(TABLES)
    if args.write_docs:
        write_docs(names)
    for name in names:
        print(TABLES[name]())
        print()


if __name__ == "__main__":
    main()
