"""Run-level health: the one judgement of a run's step series (`judge`), used by the trainer's live alarms
(`LiveMonitor`, fed step by step), `forkwatch check`, `forkwatch runs` and the dashboard's badges and pictures.

A rule has an entropy *signal* (collapse.mean, collapse.tail, explosion.mean) and, for an alarm, *evidence of
harm* (docs/methods.md, "Health: warnings and alarms"). Every condition at a step uses only that step and the
steps before it (early levels, trailing windows, a law fitted on the steps so far), so a rule fires at the same step
whether the series is judged whole afterwards or one hand-off at a time during training: the live alarm and
`check` agree on the kind, the rule and the step. Non-finite values (NaN, ±inf) never satisfy a condition; the
steps that had them are reported in `HealthReport.ignored`, never raised. numpy only (no torch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from forkwatch.store.health_evidence import EVIDENCE_FOR, Evidence, early_level, evidence, supporting
from forkwatch.store.health_rules import HealthRules
from forkwatch.store.law import LawFit, fit_entropy_law

__all__ = ["ALARM_KINDS", "RULE_KINDS", "Flag", "HealthReport", "HealthRules", "LiveMonitor", "judge"]

RULE_KINDS = ("collapse", "explosion", "saturation")
ALARM_KINDS = ("collapse", "explosion")  # the kinds whose alarms fail `forkwatch check` and may stop training
SEVERITIES = ("warning", "alarm")
_EVIDENCE_CAP = 50  # steps kept per flag: enough to see the episode, small enough to print


@dataclass(frozen=True)
class Flag:
    """One rule that fired: its severity, the steps where its condition held and the values seen there, and for an
    alarm the evidence of harm that held when it fired (for a warning: what evidence was missing)."""

    rule: str  # "collapse.mean" | "collapse.tail" | "explosion.mean" | "explosion.log_vocab" | "saturation"
    severity: str  # "warning" | "alarm"
    fired_at: int  # the step at which the condition had held `sustain_steps` steps
    until: int  # the last step of the episode (the condition may still hold there)
    steps: list[int]
    values: list[float]
    threshold: float
    message: str
    evidence: list[str] = field(default_factory=list)  # readable statements, as of `fired_at`
    supporting: dict[str, float] = field(default_factory=dict)  # early level and value at `fired_at` per column

    @property
    def kind(self) -> str:
        """The kind this flag is about: "collapse", "explosion" or "saturation"."""
        return self.rule.split(".")[0]

    @property
    def is_alarm(self) -> bool:
        return self.severity == "alarm"

    @property
    def key(self) -> tuple[str, str, int]:
        """What identifies a flag across judgements of a growing series: (rule, severity, fired_at)."""
        return self.rule, self.severity, self.fired_at

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"kind": self.kind}


@dataclass
class HealthReport:
    verdict: str  # "collapse" | "explosion" (an alarm fired) | "healthy" (warnings allowed) | "insufficient_data"
    flags: list[Flag]
    law: LawFit
    n_steps: int  # finite entropy steps seen
    early_entropy: float | None
    ignored: dict[str, list[int]] = field(default_factory=dict)  # column -> steps whose value was NaN/inf
    notes: list[str] = field(default_factory=list)

    @property
    def deciding(self) -> Flag | None:
        """The flag that decides the verdict: the first alarm (the one that stops a run under on_alarm="stop"), or
        without alarms the first warning."""
        for severity in ("alarm", "warning"):
            found = [f for f in self.flags if f.severity == severity]
            if found:
                return min(found, key=_rank)
        return None

    @property
    def severity(self) -> str:
        """"alarm", "warning" or "none"."""
        return self.deciding.severity if self.deciding else "none"

    @property
    def alarm(self) -> bool:
        return self.severity == "alarm"

    def to_dict(self) -> dict[str, Any]:
        d = self.deciding
        return {
            "verdict": self.verdict,
            "severity": self.severity,
            "rule": d.rule if d else None,
            "fired_at": d.fired_at if d else None,
            "flags": [f.to_dict() for f in self.flags],
            "law": self.law.to_dict(),
            "n_steps": self.n_steps,
            "early_entropy": self.early_entropy,
            "ignored": self.ignored,
            "notes": self.notes,
        }


def _rank(f: Flag) -> tuple:
    """Earlier first; at the same step a collapse before an explosion, then by rule, an alarm before a warning."""
    return f.fired_at, f.kind != "collapse", f.rule, f.severity != "alarm"


# --------------------------------------------------------------------------- the series


def _column(data: Any, name: str) -> np.ndarray | None:
    # A mapping of columns, or a pandas DataFrame (not imported here: store stays light).
    col = data.get(name) if isinstance(data, Mapping) else data[name] if name in getattr(data, "columns", ()) else None
    if col is None:
        return None
    # pandas' NA / None (a NULL diagnostic) become NaN here: "undefined" never satisfies a condition
    values = np.asarray(col, dtype=np.float64)
    if name == "step":
        return values
    # The steps table stores these as float32: the live monitor's values (Python floats) are rounded the same way,
    # so a value on a threshold compares alike during training and when read back from disk.
    return values.astype(np.float32).astype(np.float64)


def last_row_per_step(steps: np.ndarray) -> np.ndarray:
    """Indices that sort `steps` and keep the last row of a repeated step (a resumed run may re-log one): the same
    rule as queries' `LAST_ROW_PER_STEP` (the last row written wins), for series already in memory."""
    order = np.argsort(steps, kind="stable")
    keep = np.ones(order.size, dtype=bool)
    keep[:-1] = steps[order][1:] != steps[order][:-1]
    return order[keep & np.isfinite(steps[order])]


def _sustained(cond: np.ndarray, n: int) -> list[tuple[int, int, int]]:
    """Episodes of `cond` lasting at least n: (start, fire index = start + n − 1, end exclusive)."""
    out = []
    padded = np.concatenate([[False], cond, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    for start, end in zip(edges[0::2], edges[1::2], strict=True):
        if end - start >= n:
            out.append((int(start), int(start + n - 1), int(end)))
    return out


# --------------------------------------------------------------------------- the judgement


def _prepare(data: Any, rules: HealthRules) -> tuple[np.ndarray, dict[str, np.ndarray | None], dict[str, list[int]]]:
    steps_raw = _column(data, "step")
    if steps_raw is None or _column(data, "entropy_mean") is None:
        raise ValueError("judge() needs the columns 'step' and 'entropy_mean' (the steps table has both)")
    idx = last_row_per_step(steps_raw)
    steps = steps_raw[idx].astype(np.int64)
    cols: dict[str, np.ndarray | None] = {}
    ignored: dict[str, list[int]] = {}
    for name in ("entropy_mean", rules.tail_column, "reward_mean", "completion_length_mean", "truncated_fraction"):
        col = _column(data, name)
        cols[name] = None if col is None else col[idx]
        if cols[name] is not None and not np.isfinite(cols[name]).all():
            ignored[name] = [int(s) for s in steps[~np.isfinite(cols[name])]]
    return steps, cols, ignored


def judge(data: Any, rules: HealthRules | None = None, *, vocab_size: int | None = None) -> HealthReport:
    """Judge one run's step series with `rules` (the run's own, from run.json, wherever a stored run is judged).

    `data`: a DataFrame or a mapping of columns with at least `step` and `entropy_mean`; the tail column
    (`entropy_p90`), `reward_mean`, `completion_length_mean` and `truncated_fraction` are used when present.
    `vocab_size` (from run.json, when known) enables the log-V explosion alarm.
    """
    rules = rules or HealthRules()
    steps, cols, ignored = _prepare(data, rules)
    ent = cols["entropy_mean"]
    assert ent is not None
    reward = cols["reward_mean"]
    law = fit_entropy_law(
        ent, reward if reward is not None else np.full_like(ent, np.nan),
        min_points=rules.law_min_points, min_r2=rules.law_min_r2,
    )
    notes = [f"{len(v)} non-finite {k} value(s) ignored" for k, v in ignored.items()]
    finite_at = np.flatnonzero(np.isfinite(ent))
    n = int(finite_at.size)
    if n < rules.min_steps:
        notes.append(f"{n} finite entropy step(s), fewer than min_steps={rules.min_steps}: no verdict yet")
        return HealthReport("insufficient_data", [], law, n, None, ignored, notes)
    early, ready = early_level(ent, rules.early_steps)
    # No rule fires before min_steps finite steps (nor before the early level is known), so that a flag's step never
    # depends on how long the series was when it was judged.
    armed = np.arange(steps.size) >= max(ready, int(finite_at[rules.min_steps - 1]))
    ev = evidence(cols, rules, steps.size)
    flags: list[Flag] = []
    with np.errstate(invalid="ignore"):
        if early > 0:
            thr = rules.collapse_fraction * early
            flags += _signal_flags(
                "collapse.mean", armed & (ent < thr), steps, ent, thr, rules, ev, cols,
                "mean entropy fell below {thr:.4g} nats (collapse_fraction × early level "
                f"{early:.4g}) for {{n}} steps, {{start}}–{{end}} (last {{last:.4g}})",
            )
        tail = cols[rules.tail_column]
        if tail is not None:
            early_tail, tail_ready = early_level(tail, rules.early_steps)
            if early_tail > rules.tail_floor:  # a tail that never rose above the floor did not "vanish"
                flags += _signal_flags(
                    "collapse.tail", armed & (np.arange(steps.size) >= tail_ready) & (tail < rules.tail_floor),
                    steps, tail, rules.tail_floor, rules, ev, cols,
                    f"{rules.tail_column} fell below tail_floor {{thr:.4g}} nats (early {early_tail:.4g}) for {{n}} "
                    "steps, {start}–{end} (last {last:.4g})",
                )
        if early > 0:
            thr = rules.explosion_factor * early
            flags += _signal_flags(
                "explosion.mean", armed & (ent > thr), steps, ent, thr, rules, ev, cols,
                "mean entropy rose above {thr:.4g} nats (explosion_factor × early level "
                f"{early:.4g}) for {{n}} steps, {{start}}–{{end}} (last {{last:.4g}})",
            )
        if vocab_size and vocab_size > 1:
            thr = rules.explosion_log_vocab_fraction * math.log(vocab_size)
            flags += _episodes(
                "explosion.log_vocab", "alarm", armed & (ent > thr), steps, ent, thr, rules, cols,
                f"mean entropy rose above {{thr:.4g}} nats ({rules.explosion_log_vocab_fraction:g} × log V, "
                f"V={vocab_size}) for {{n}} steps, {{start}}–{{end}} (last {{last:.4g}})",
                lambda i: ["entropy near log V: sampling is close to uniform over the vocabulary"],
            )
        flags += _saturation(steps, ent, reward, early, armed, rules, cols)
    # in the order `deciding` ranks them, so the first alarm a caller meets in `flags` (or in a LiveMonitor batch) is
    # the one that decides the verdict
    flags.sort(key=_rank)
    report = HealthReport("healthy", flags, law, n, round(early, 6), ignored, notes)
    if report.alarm:
        report.verdict = report.deciding.kind
    return report


def _episodes(
    rule: str, severity: str, cond: np.ndarray, steps: np.ndarray, values: np.ndarray, threshold: float,
    rules: HealthRules, cols: dict[str, np.ndarray | None], text: str, evidence_at: Any,
) -> list[Flag]:
    flags = []
    for start, fire, end in _sustained(cond, rules.sustain_steps):
        sl = slice(start, min(end, start + _EVIDENCE_CAP))
        flags.append(
            Flag(
                rule=rule, severity=severity, fired_at=int(steps[fire]), until=int(steps[end - 1]),
                steps=[int(s) for s in steps[sl]], values=[round(float(v), 6) for v in values[sl]],
                threshold=round(float(threshold), 6),
                message=text.format(
                    start=int(steps[start]), end=int(steps[end - 1]), n=end - start, thr=threshold, last=values[end - 1]
                ),
                evidence=evidence_at(fire), supporting=supporting(cols, rules, fire),
            )
        )  # fmt: skip
    return flags


def _signal_flags(
    rule: str, signal: np.ndarray, steps: np.ndarray, values: np.ndarray, threshold: float, rules: HealthRules,
    ev: Evidence, cols: dict[str, np.ndarray | None], text: str,
) -> list[Flag]:
    """A signal's warnings (the signal alone) and alarms (the signal with evidence of harm, sustained together)."""
    names = [e for e in EVIDENCE_FOR[rule] if e in ev.held]

    def held_at(i: int) -> list[str]:
        return [ev.say[e](i) for e in names if ev.held[e][i]]

    if not rules.alarm_needs_evidence:
        return _episodes(rule, "alarm", signal, steps, values, threshold, rules, cols, text,
                         lambda i: held_at(i) or ["alarm_needs_evidence=False: the signal alone is an alarm"])
    harm = np.zeros(signal.size, dtype=bool)
    for e in names:
        harm |= ev.held[e]
    alarms = _episodes(rule, "alarm", signal & harm, steps, values, threshold, rules, cols, text, held_at)
    missing = "no evidence of harm yet (looked for: " + ", ".join(EVIDENCE_FOR[rule]) + ")"
    warned = _episodes(rule, "warning", signal, steps, values, threshold, rules, cols, text, lambda i: [missing])
    # a signal whose evidence was already there when it fired is an alarm only, not also a warning at the same step
    fired = {f.fired_at for f in alarms}
    return alarms + [f for f in warned if f.fired_at not in fired]


def _prefix_law(ent: np.ndarray, reward: np.ndarray, rules: HealthRules) -> tuple[np.ndarray, np.ndarray]:
    """The law R = −a·exp(H) + b fitted at every step on the steps so far (running least-squares sums): its
    ceiling b − a and whether the fit passes the same tests as `fit_entropy_law` (enough points, a > 0, R²)."""
    with np.errstate(over="ignore"):
        x = np.exp(ent)
    ok = np.isfinite(x) & np.isfinite(reward)
    x, r = np.where(ok, x, 0.0), np.where(ok, reward, 0.0)
    n = np.cumsum(ok)
    sx, sr, sxx, sxr, srr = (np.cumsum(v) for v in (x, r, x * x, x * r, r * r))
    with np.errstate(invalid="ignore", divide="ignore"):
        vx, vr, cxr = n * sxx - sx * sx, n * srr - sr * sr, n * sxr - sx * sr
        slope = cxr / vx
        b = (sr - slope * sx) / n
        r2 = cxr * cxr / (vx * vr)
        valid = (n >= rules.law_min_points) & (vx > 1e-12 * n * n) & (vr > 1e-12 * n * n) & (-slope > 0)
        valid &= r2 >= rules.law_min_r2
    ceiling = np.where(valid, b + slope, np.nan)  # b − a with a = −slope
    return ceiling, valid


def _saturation(
    steps: np.ndarray, ent: np.ndarray, reward: np.ndarray | None, early: float, armed: np.ndarray,
    rules: HealthRules, cols: dict[str, np.ndarray | None],
) -> list[Flag]:
    if reward is None or not early > 0:
        return []
    r0, ready = early_level(reward, rules.early_steps)
    ceiling, valid = _prefix_law(ent, reward, rules)
    room = ceiling - r0
    w = rules.saturation_window
    drop = np.full(ent.size, np.nan)  # entropy still falling: the drop over the trailing window / early level
    if ent.size >= w:
        drop[w - 1 :] = (ent[: ent.size - w + 1] - ent[w - 1 :]) / early
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = (ceiling - reward) / room
        cond = armed & valid & (np.arange(ent.size) >= ready) & (room > 0)
        cond &= (gap <= rules.saturation_gap) & (drop >= rules.saturation_min_drop)
    episodes = _sustained(cond, rules.sustain_steps)
    flags = []
    for start, fire, end in episodes:
        c = float(ceiling[fire])
        thr = c - rules.saturation_gap * (c - r0)
        flags += _episodes(
            "saturation", "warning", np.isin(np.arange(ent.size), np.arange(start, end)), steps, reward, thr,
            rules, cols,
            f"reward reached {{thr:.4g}} or more (within saturation_gap of the law's ceiling {c:.4g}, fitted on "
            "the steps so far) while entropy kept falling, {n} steps, {start}–{end} (last reward {last:.4g})",
            lambda i: ["the entropy–reward law predicts little reward left to gain by lowering entropy further"],
        )
    return flags


class LiveMonitor:
    """`judge`, fed during training: each hand-off's steps rows are appended and the series judged again; the flags
    not reported before come back once each (warnings and alarms), at the step they fired. Because every condition
    is causal (see the module docstring), these are exactly the flags `judge` finds on the whole series afterwards.

    The plugin calls: `LiveMonitor(rules, vocab_size=V)`, `update_many(rows) -> list[Flag]` (act on
    `flag.is_alarm`: only alarms stop training), `active_kinds()` (alarms active at the last step, by kind) and
    `active_kinds("warning")`. Judging the whole series keeps one implementation; it costs O(steps × window), so it
    is skipped for new rows where no rule's signal holds (`_quiet`): every flag fires at a step where its signal
    holds, so such rows can bring no new flag, and any episode open before them has ended (the report, wanted only
    when read, is judged then).
    """

    def __init__(self, rules: HealthRules | None = None, *, vocab_size: int | None = None) -> None:
        self.rules = rules or HealthRules()
        self.vocab_size = vocab_size
        self._series: dict[str, list[float]] = {}
        self._reported: set[tuple[str, str, int]] = set()
        self._report: HealthReport | None = None
        self._stale = False  # rows were added since `_report` was judged
        self._early: float | None = None  # the entropy's early level, once known (fixed while steps only grow)
        self._ordered, self._max_step = True, -math.inf  # every step so far came after all the earlier ones
        self._last_quiet = False  # no signal held at the rows of the last update: no episode is active now

    @property
    def report(self) -> HealthReport | None:
        """The judgement of the whole series so far (None before any entropy)."""
        if self._stale:
            self._report, self._stale = judge(self._series, self.rules, vocab_size=self.vocab_size), False
        return self._report

    def update(self, row: Mapping[str, Any]) -> list[Flag]:
        return self.update_many([row])

    def update_many(self, rows: list[Mapping[str, Any]]) -> list[Flag]:
        """Append several steps' rows, judge once, and return the flags not reported before (an episode that fired
        and cleared inside `rows` included)."""
        if not rows:
            return []
        if any("step" not in row for row in rows):
            raise ValueError("LiveMonitor.update() needs a 'step' value in every row")
        n0 = len(self._series.get("step", []))
        for row in rows:
            self._append(row)
        if "entropy_mean" not in self._series:
            return []
        self._stale = True
        self._last_quiet = self._quiet(n0)
        if self._last_quiet:
            return []
        new = [f for f in self.report.flags if f.key not in self._reported]
        self._reported |= {f.key for f in new}
        return new

    def _quiet(self, n0: int) -> bool:
        """Whether no rule's signal holds at any of the rows from index n0 on: the same float32-rounded values and
        the same comparisons as `judge`. False whenever unsure: before the early level is known, and for good once
        a step came that was not after every earlier one (`judge` then keeps the last row of a repeated step and
        sorts: row indices are no longer the judged series')."""
        steps = self._series["step"]
        for s in steps[n0:]:
            self._ordered = self._ordered and s > self._max_step
            self._max_step = max(self._max_step, s)
        if not self._ordered:
            return False
        rules = self.rules
        raw = self._series["entropy_mean"]
        if self._early is None:
            early, _ = early_level(_column(self._series, "entropy_mean"), rules.early_steps)
            if not early > 0:
                return False
            self._early = early
        early, w = self._early, rules.saturation_window
        at = max(0, n0 - w + 1)  # the rows the new ones' saturation drop looks back to
        ent = _column({"entropy_mean": raw[at:]}, "entropy_mean")
        tail = self._series.get(rules.tail_column)
        tail = None if tail is None else _column({"t": tail[n0:]}, "t")
        log_vocab = (rules.explosion_log_vocab_fraction * math.log(self.vocab_size)
                     if self.vocab_size and self.vocab_size > 1 else math.inf)
        collapse, explosion = rules.collapse_fraction * early, rules.explosion_factor * early
        for i in range(n0, len(raw)):
            e = ent[i - at]
            if e < collapse or e > explosion or e > log_vocab:
                return False
            if tail is not None and tail[i - n0] < rules.tail_floor:
                return False
            if i >= w - 1 and (ent[i - w + 1 - at] - e) / early >= rules.saturation_min_drop:  # saturation's drop
                return False
        return True

    def _append(self, row: Mapping[str, Any]) -> None:
        n = len(self._series.get("step", []))
        for name, value in row.items():
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue  # not a number (e.g. select_method) or undefined (None): not used by the rules
            self._series.setdefault(name, [math.nan] * n).append(v)
        for col in self._series.values():  # a column missing from this row gets NaN, keeping columns aligned
            if len(col) == n:
                col.append(math.nan)

    def active_kinds(self, severity: str = "alarm") -> dict[str, bool]:
        """For each kind (collapse, explosion, saturation): whether a flag of it with this severity is active at the
        last step."""
        if severity not in SEVERITIES:
            raise ValueError(f"severity={severity!r}: choose one of {SEVERITIES}")
        if self._last_quiet:  # every episode ended before the newest rows (`_quiet`): none is active, no judgement
            return dict.fromkeys(RULE_KINDS, False)
        flags = self.report.flags if self.report else []
        last = max(self._series.get("step", [math.nan]), default=math.nan)
        kinds = {f.kind for f in flags if f.severity == severity and f.until == last}
        return {k: k in kinds for k in RULE_KINDS}
