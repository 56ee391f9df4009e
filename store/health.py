"""Run-level health: the one judgement of a run's step series (`judge`), used by the trainer's live alarms
(`LiveMonitor`, fed step by step), `forkwatch check`, `forkwatch runs` and the dashboard's badges and pictures; the
evidence of harm it weighs; and the one fit of the entropy–reward law (`fit_entropy_law`, and the same fit on every
prefix of the run, which the saturation rule reads). The thresholds and the catalogue of rules are in
store/health_rules.py; the report a person reads is store/check.py.

A rule has an entropy *signal* (collapse.mean, collapse.tail, explosion.mean) and, for an alarm, *evidence of
harm* (docs/methods.md, "Health: warnings and alarms"). Every condition at a step uses only that step and the
steps before it (early levels, trailing windows, the law fitted on the steps so far), so a rule fires at the same step
whether the series is judged whole afterwards or one hand-off at a time during training: the live alarm and
`check` agree on the kind, the rule and the step.

The series: rows are sorted by step and a step given twice keeps its last row. The entropy rules count *logged
steps*: the rows whose mean entropy is finite (a run that logs every N steps, or a row that lacks the entropy, does
not break a streak). Non-finite values (NaN, ±inf) never satisfy a condition; the steps that had them are reported
in `HealthReport.ignored`, never raised. A rule whose column is missing (absent, or never finite) is reported in
`HealthReport.not_evaluated`, never counted as passed. numpy only (no torch).
"""

from __future__ import annotations

import bisect
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from forkwatch.store.health_rules import (
    ALARM_KINDS,
    CONTEXT_COLUMNS,
    ENTROPY,
    EVIDENCE_FOR,
    EVIDENCE_NEEDS,
    LAW_MIN_POINTS,
    LAW_MIN_R2,
    LENGTH,
    NON_FINITE,
    REWARD,
    RULE_KINDS,
    RULES,
    SEVERITIES,
    TRUNCATED,
    HealthRules,
    action_for,
)

__all__ = ["ALARM_KINDS", "RULE_KINDS", "Flag", "HealthReport", "HealthRules", "LawFit", "LiveMonitor",
           "fit_entropy_law", "judge"]

_EVIDENCE_CAP = 50  # steps kept per flag: enough to see the episode, small enough to print


# =========================================================================== the entropy–reward law


@dataclass(frozen=True)
class LawFit:
    """R = −a·exp(H) + b (Cui et al., arXiv:2505.22617) fitted to (mean entropy, mean reward); `ceiling` = b − a, None
    when the fit is refused (with the `reason`)."""

    a: float | None
    b: float | None
    r2: float | None
    n_points: int
    ceiling: float | None
    reason: str | None = None  # why no ceiling is reported

    @property
    def ok(self) -> bool:
        return self.reason is None

    def predict(self, entropy: np.ndarray | float) -> np.ndarray:
        if self.a is None or self.b is None:
            raise ValueError(f"no law to predict with: {self.reason}")
        return -self.a * np.exp(np.asarray(entropy, dtype=np.float64)) + self.b

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """The fit in one line, the same in the terminal and on the dashboard (the one place it is worded)."""
        if not self.ok:
            return f"no ceiling ({self.reason})"
        return (f"R = -a·exp(H) + b with a = {self.a:.4g}, b = {self.b:.4g}: ceiling {self.ceiling:.4g}, "
                f"R² {self.r2:.3f}, {self.n_points} points")


@dataclass
class _PrefixLaw:
    """The least-squares line r = b + slope·x, x = exp(H), fitted on every prefix of the pairs (index i: the pairs up
    to and including i), and its validity at each prefix: one fit and one set of tests for the whole run and for
    the steps so far."""

    n: np.ndarray  # finite pairs so far
    slope: np.ndarray
    b: np.ndarray
    r2: np.ndarray
    varies: np.ndarray  # both x and r have spread
    valid: np.ndarray  # enough points, spread, a > 0, R² high enough

    @property
    def ceiling(self) -> np.ndarray:
        return np.where(self.valid, self.b + self.slope, np.nan)  # b − a with a = −slope


def _prefix_law(entropy: np.ndarray, reward: np.ndarray, *, min_points: int, min_r2: float) -> _PrefixLaw:
    with np.errstate(over="ignore"):
        x = np.exp(entropy.astype(np.float64))
    r = reward.astype(np.float64)
    ok = np.isfinite(x) & np.isfinite(r)
    # running sums of values shifted by the first finite pair: the centred sums below then lose no precision to
    # cancellation (x = exp(H) and a reward are O(1)–O(10³); a shift keeps their squares small)
    first = np.flatnonzero(ok)[:1]
    x0, r0 = (x[first[0]], r[first[0]]) if first.size else (0.0, 0.0)
    dx, dr = np.where(ok, x - x0, 0.0), np.where(ok, r - r0, 0.0)
    n = np.cumsum(ok)
    sx, sr, sxx, sxr, srr = (np.cumsum(v) for v in (dx, dr, dx * dx, dx * dr, dr * dr))
    with np.errstate(invalid="ignore", divide="ignore"):
        cxx, crr, cxr = sxx - sx * sx / n, srr - sr * sr / n, sxr - sx * sr / n  # centred sums of squares
        # no spread: a centred sum of squares at rounding level of the values' own size
        varies = (cxx > 1e-12 * np.maximum(1.0, sxx)) & (crr > 1e-12 * np.maximum(1.0, srr))
        slope = cxr / cxx
        b = r0 + sr / n - slope * (x0 + sx / n)
        r2 = cxr * cxr / (cxx * crr)
        valid = (n >= min_points) & varies & (-slope > 0) & (r2 >= min_r2)
    return _PrefixLaw(n, slope, b, r2, varies, valid)


def fit_entropy_law(
    entropy: Any, reward: Any, *, min_points: int = LAW_MIN_POINTS, min_r2: float = LAW_MIN_R2, fraction: float = 1.0
) -> LawFit:
    """Least-squares fit of R = −a·exp(H) + b (arXiv:2505.22617), linear in x = exp(H), on the (mean entropy, mean
    reward) pairs of a run: forkwatch fits each step's *training* reward, where the paper fits validation
    performance (docs/methods.md says what that changes).

    Pairs with a non-finite value are dropped. `fraction` < 1 fits only the first part of the run (the paper found
    the first ~15 % of steps enough to extrapolate). The ceiling is refused (None, with a `reason`) from fewer than
    `min_points` pairs, when entropy or reward does not vary, when a ≤ 0 (reward does not rise as entropy falls, so
    the law does not describe the run) or when R² < `min_r2`: the same tests the saturation rule applies to the fit
    on the steps so far.
    """
    h = np.asarray(entropy, dtype=np.float64)
    r = np.asarray(reward, dtype=np.float64)
    if h.shape != r.shape:
        raise ValueError(f"entropy and reward differ in length: {h.shape} vs {r.shape}")
    law = _prefix_law(h, r, min_points=min_points, min_r2=min_r2)
    total = int(law.n[-1]) if law.n.size else 0
    k = total if fraction >= 1 else min(total, max(1, math.ceil(fraction * total)))
    if k < min_points:
        return LawFit(None, None, None, k, None, f"{k} finite (entropy, reward) point(s), fewer than {min_points}")
    i = int(np.searchsorted(law.n, k))  # the prefix that holds the first k pairs
    if not law.varies[i]:
        return LawFit(None, None, None, k, None, "entropy or reward does not vary: nothing to fit")
    a, b, r2 = round(-float(law.slope[i]), 8), round(float(law.b[i]), 8), round(float(law.r2[i]), 6)
    if a <= 0:
        return LawFit(a, b, r2, k, None, f"a = {a:.4g} ≤ 0: reward does not rise as entropy falls")
    if r2 < min_r2:
        return LawFit(a, b, r2, k, None, f"poor fit: R² = {r2:.3f} < {min_r2}")
    return LawFit(a, b, r2, k, round(b - a, 8))


# =========================================================================== flags and the report


@dataclass(frozen=True)
class Flag:
    """One rule that fired: its severity, the steps where its condition held and the values seen there, the evidence
    of harm that held when it fired (for a warning: what evidence was missing), the numbers around it, and the
    recommended action with its source. `describe()` is the one wording of a flag, wherever it is shown."""

    rule: str  # a key of health_rules.RULES: "collapse.mean", "explosion.non_finite", "saturation", ...
    severity: str  # "warning" | "alarm"
    fired_at: int  # the step at which the condition had held `sustain_steps` logged steps
    until: int  # the last step of the episode (the condition may still hold there)
    steps: list[int]
    values: list[float]
    threshold: float
    message: str
    evidence: list[str] = field(default_factory=list)  # readable statements, as of `fired_at`
    supporting: dict[str, float] = field(default_factory=dict)  # <column>_early / <column>_at_flag, where logged
    harm: list[str] = field(default_factory=list)  # the names of the evidence of harm that held (health_rules)
    action: str = ""
    action_source: str = ""

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
        """The flag as plain JSON values (a non-finite value, as the loss of `explosion.non_finite`, becomes None:
        its message says what it was)."""
        d = asdict(self) | {"kind": self.kind}
        d["values"] = [v if math.isfinite(v) else None for v in self.values]
        d["threshold"] = self.threshold if math.isfinite(self.threshold) else None
        return d

    def describe_lines(self) -> list[str]:
        """The flag as a person reads it, one fact per line: what fired where, the signal, the evidence, the numbers
        at the flag (reward, length, truncation, KL and clip ratios beside their early levels, where logged), and
        what to do next with its source. The trainer's log line, `forkwatch check`, the alert and the dashboard all
        show these lines (`describe` joins them into one)."""
        lines = [f"{self.rule} at step {self.fired_at}: {self.kind.upper()} {self.severity.upper()} — {self.message}"]
        shown = ", ".join(f"{v:.4g}" for v in self.values[:8]) + (" …" if len(self.values) > 8 else "")
        steps = f"{self.steps[0]}" if len(self.steps) == 1 else f"{self.steps[0]}–{self.steps[-1]}"
        threshold = f"; threshold {self.threshold:.4g}" if math.isfinite(self.threshold) else ""
        lines.append(f"signal: steps {steps} ({len(self.steps)} shown); values {shown}{threshold}")
        lines += [f"evidence: {e}" for e in self.evidence]
        at = _at_flag(self.supporting)
        if at:
            lines.append(f"at the flag: {at}")
        if self.action:
            lines.append(f"what to do: {self.action} (source: {self.action_source})")
        return lines

    def describe(self) -> str:
        """The flag in one line (`describe_lines` joined): the trainer's log and run.json's `stopped_by_alarm`."""
        return " | ".join(self.describe_lines())


def _at_flag(supporting: Mapping[str, float]) -> str:
    """"reward_mean 0.31 (early 0.52), kl 0.04 (early 0.001)" from the `<name>_at_flag` / `<name>_early` pairs."""
    names = [k[: -len("_at_flag")] for k in supporting if k.endswith("_at_flag")]
    return ", ".join(f"{n} {supporting[n + '_at_flag']:.4g} (early {supporting[n + '_early']:.4g})"
                     if n + "_early" in supporting else f"{n} {supporting[n + '_at_flag']:.4g}" for n in names)


@dataclass
class HealthReport:
    verdict: str  # "collapse" | "explosion" (an alarm fired) | "healthy" (warnings allowed) | "insufficient_data"
    flags: list[Flag]
    law: LawFit
    n_steps: int  # logged steps with a finite mean entropy
    early_entropy: float | None
    ignored: dict[str, list[int]] = field(default_factory=dict)  # column -> steps whose value was NaN/inf
    notes: list[str] = field(default_factory=list)
    not_evaluated: dict[str, str] = field(default_factory=dict)  # rule or evidence -> why it could not be evaluated

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
            "not_evaluated": self.not_evaluated,
            "notes": self.notes,
        }


def _rank(f: Flag) -> tuple:
    """Earlier first; at the same step a collapse before an explosion, then by rule, an alarm before a warning."""
    return f.fired_at, f.kind != "collapse", f.rule, f.severity != "alarm"


# =========================================================================== the series


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


def early_level(values: np.ndarray, k: int) -> tuple[float, int]:
    """The early level (median of the first k finite values) and the index from which it is known."""
    idx = np.flatnonzero(np.isfinite(values))[:k]
    if idx.size < k:
        return math.nan, values.size
    return float(np.median(values[idx])), int(idx[-1])


def trailing_median(x: np.ndarray, w: int) -> np.ndarray:
    """Median of each step's trailing window of w steps (fewer at the start), NaN ignored: causal smoothing."""
    n = x.size
    if n >= w and np.isfinite(x).all():  # the usual case, without nanmedian's masked-array path (10× faster)
        out = np.empty(n)
        out[w - 1 :] = np.median(np.lib.stride_tricks.sliding_window_view(x, w), axis=1)
        out[: w - 1] = _nan_trailing_median(x[: w - 1], w)  # the first, shorter windows
        return out
    return _nan_trailing_median(x, w)


def _nan_trailing_median(x: np.ndarray, w: int) -> np.ndarray:
    padded = np.concatenate([np.full(w - 1, np.nan), x])
    windows = np.lib.stride_tricks.sliding_window_view(padded, w)  # (n, w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN window: NaN, which satisfies nothing
        return np.nanmedian(windows, axis=1)


def _present(col: np.ndarray | None) -> bool:
    """A column the rules can read: given, with at least one finite value (a column of NULLs is a missing one)."""
    return col is not None and bool(np.isfinite(col).any())


@dataclass
class _Series:
    steps: np.ndarray  # every row, sorted, one per step
    cols: dict[str, np.ndarray | None]  # every row
    obs: np.ndarray  # the rows with a finite mean entropy: the logged steps the entropy rules count
    ignored: dict[str, list[int]]


def _columns_of(rules: HealthRules) -> tuple[str, ...]:
    return (ENTROPY, rules.tail_column, REWARD, LENGTH, TRUNCATED, NON_FINITE, "loss", "grad_norm", *CONTEXT_COLUMNS)


def _prepare(data: Any, rules: HealthRules) -> _Series:
    steps_raw = _column(data, "step")
    if steps_raw is None:
        raise ValueError("judge() needs a 'step' column (the steps table has one; an imported series maps its own)")
    idx = last_row_per_step(steps_raw)
    steps = steps_raw[idx].astype(np.int64)
    cols: dict[str, np.ndarray | None] = {}
    ignored: dict[str, list[int]] = {}
    for name in dict.fromkeys(_columns_of(rules)):
        col = _column(data, name)
        cols[name] = None if col is None else col[idx]
        if name in (ENTROPY, rules.tail_column, REWARD, LENGTH, TRUNCATED) and _present(cols[name]):
            bad = ~np.isfinite(cols[name])
            if name != ENTROPY and cols[ENTROPY] is not None:
                bad &= np.isfinite(cols[ENTROPY])  # only at the logged steps the rules judge
            if bad.any():
                ignored[name] = [int(s) for s in steps[bad]]
    ent = cols[ENTROPY]
    obs = np.flatnonzero(np.isfinite(ent)) if ent is not None else np.zeros(0, dtype=np.int64)
    return _Series(steps, cols, obs, ignored)


def _not_evaluated(s: _Series, rules: HealthRules, vocab_size: int | None) -> dict[str, str]:
    """The rules and evidence whose column is missing: reported as not evaluated, never as passed."""
    def missing(name: str) -> str | None:
        col = rules.tail_column if name == "tail" else name
        # absent, or never a finite number (a stored column of NULLs): the same to the rules, and said alike
        return None if _present(s.cols.get(col)) else f"no {col} logged in the series"

    out = {}
    for rule, (needs, _) in RULES.items():
        why = next((m for m in map(missing, needs) if m), None)
        if rule == "explosion.log_vocab" and why is None and not (vocab_size and vocab_size > 1):
            why = "the vocabulary size is not known"
        if rule == "explosion.non_finite" and why:
            if _present(s.cols["loss"]) or _present(s.cols["grad_norm"]):
                why = None  # loss / gradient norm given without the flag column: judged from their values
            else:
                why = "no loss or gradient norm logged in the series"
        if why:
            out[rule] = why
    for name, col in EVIDENCE_NEEDS.items():
        if (why := missing(col)) and not all(r in out for r, ev in EVIDENCE_FOR.items() if name in ev):
            out[f"evidence {name}"] = why
    return out


# =========================================================================== the evidence of harm


@dataclass
class _Evidence:
    """Per-step evidence arrays (bool, over the logged steps) with the numbers a statement quotes, all causal."""

    held: dict[str, np.ndarray]
    say: dict[str, Callable[[int], str]]  # name -> the statement at a step index


def _evidence(cols: dict[str, np.ndarray | None], rules: HealthRules, n: int) -> _Evidence:
    w = rules.evidence_window
    held: dict[str, np.ndarray] = {}
    say: dict[str, Callable[[int], str]] = {}
    idx = np.arange(n)
    reward = cols.get(REWARD)
    if _present(reward):
        r0, ready = early_level(reward, rules.early_steps)
        rs = trailing_median(reward, w)
        with np.errstate(invalid="ignore"):
            move = np.fmax.accumulate(np.where(np.isfinite(rs), np.abs(rs - r0), np.nan))  # largest move so far
            best = np.fmax.accumulate(rs)
            gain = np.full(n, np.nan)
            gain[w:] = rs[w:] - rs[:-w]  # this window's median against the one before it
            diffs = np.concatenate([[np.nan], np.abs(np.diff(reward))])
            # per-step noise from successive differences (robust: MAD), and the standard error of a window median
            sigma = 1.4826 * trailing_median(diffs, 2 * w) / math.sqrt(2)
            se = 1.2533 * sigma / math.sqrt(w)
            stall_thr = rules.reward_stall_fraction * move
            # a gain is told from noise beyond noise_z standard errors of a difference of two window medians
            gain_noise = rules.noise_z * math.sqrt(2) * se
            drop_thr = np.fmax(rules.reward_drop_fraction * move, rules.noise_z * se)
            known = idx >= max(ready, w)
            stalled = known & (gain <= stall_thr) & (gain <= gain_noise)
            falling = known & (best - rs > drop_thr) & (move > 0)
            if rules.reward_range is not None:
                # at its ceiling the reward is where it can be: neither a stall nor a dip within the margin (the
                # noise of a plateau's best-so-far) is harm; a fall out of the margin still is
                lo, hi = rules.reward_range
                top = hi - rules.reward_ceiling_margin * (hi - lo)
                stalled &= ~(rs >= top)
                falling &= ~(rs >= top)
            held["reward_not_improving"] = stalled
            held["reward_falling"] = falling
        room = "" if rules.reward_range is None else f", below its ceiling {top:.4g}"
        say["reward_not_improving"] = lambda i: (
            f"reward not improving: {gain[i]:+.4g} over the last {w} steps (needs > {min(stall_thr[i], gain_noise[i]):.4g}"
            f": {rules.reward_stall_fraction:g} × its largest move {move[i]:.4g}, or beyond noise {gain_noise[i]:.4g})"
            f" at {rs[i]:.4g}{room}")
        say["reward_falling"] = lambda i: (
            f"reward falling: {rs[i]:.4g}, {best[i] - rs[i]:.4g} below its best {best[i]:.4g} (threshold "
            f"{drop_thr[i]:.4g}){room}")
    length = cols.get(LENGTH)
    if _present(length):
        l0, ready = early_level(length, rules.early_steps)
        ls = trailing_median(length, w)
        with np.errstate(invalid="ignore"):
            held["length_collapsed"] = (idx >= ready) & (ls < rules.length_collapse_fraction * l0)
            held["length_runaway"] = (idx >= ready) & (ls > rules.length_runaway_factor * l0)
        say["length_collapsed"] = lambda i: (
            f"completions collapsing: length {ls[i]:.4g} < {rules.length_collapse_fraction:g} × early {l0:.4g}")
        say["length_runaway"] = lambda i: (
            f"completions running away: length {ls[i]:.4g} > {rules.length_runaway_factor:g} × early {l0:.4g}")
    trunc = cols.get(TRUNCATED)
    if _present(trunc):
        t0, ready = early_level(trunc, rules.early_steps)
        ts = trailing_median(trunc, w)
        with np.errstate(invalid="ignore"):
            held["truncation_runaway"] = (idx >= ready) & (ts > t0 + rules.truncation_rise)
        say["truncation_runaway"] = lambda i: (
            f"completions hitting the length cap: truncated {ts[i]:.1%} > early {t0:.1%} + {rules.truncation_rise:g}")
    tail = cols.get(rules.tail_column)
    if _present(tail):
        with np.errstate(invalid="ignore"):
            held["tail_gone"] = tail < rules.tail_floor
        say["tail_gone"] = lambda i: f"the tail is gone: {rules.tail_column} {tail[i]:.4g} < tail_floor {rules.tail_floor:g}"
    return _Evidence(held, say)


def _supporting(cols: dict[str, np.ndarray | None], rules: HealthRules, i: int) -> dict[str, float]:
    """Reward, length, truncation and (where logged) the KL and clip ratios at the fire step (trailing window
    median) beside their early levels."""
    out = {}
    for name in (REWARD, LENGTH, TRUNCATED, *CONTEXT_COLUMNS):
        col = cols.get(name)
        if not _present(col):
            continue
        before, ready = early_level(col, rules.early_steps)
        now = col[max(0, i - rules.evidence_window + 1) : i + 1]
        now = now[np.isfinite(now)]
        if ready <= i and now.size:
            out[f"{name}_early"] = round(before, 6)
            out[f"{name}_at_flag"] = round(float(np.median(now)), 6)
    return out


# =========================================================================== the judgement


def judge(data: Any, rules: HealthRules | None = None, *, vocab_size: int | None = None) -> HealthReport:
    """Judge one run's step series with `rules` (the run's own, from run.json, wherever a stored run is judged).

    `data`: a DataFrame or a mapping of columns with at least `step`; `entropy_mean`, the tail column
    (`entropy_p90`), `reward_mean`, `completion_length_mean`, `truncated_fraction`, `non_finite` (or `loss` and
    `grad_norm`) and the KL / clip-ratio columns are used when present, and the rules that need a missing one are
    listed in `not_evaluated`. `vocab_size` (from run.json, when known) enables the log-V explosion alarm.
    """
    rules = rules or HealthRules()
    s = _prepare(data, rules)
    not_evaluated = _not_evaluated(s, rules, vocab_size)
    flags = _non_finite_flags(s, rules)
    o = s.obs
    cols = {k: None if v is None else v[o] for k, v in s.cols.items()}  # the logged steps
    steps = s.steps[o]
    ent = cols[ENTROPY]
    reward = cols[REWARD] if _present(cols[REWARD]) else None
    law = fit_entropy_law(
        ent if ent is not None else np.zeros(0), reward if reward is not None else np.full(o.size, np.nan),
        min_points=rules.law_min_points, min_r2=rules.law_min_r2,
    )
    notes = [f"{len(v)} non-finite {k} value(s) ignored" for k, v in s.ignored.items()]
    n = int(o.size)
    early = None
    if n < rules.min_steps:
        notes.append(f"{n} finite entropy step(s), fewer than min_steps={rules.min_steps}: no entropy verdict yet")
    else:
        early, ready = early_level(ent, rules.early_steps)
        # No rule fires before min_steps logged steps (nor before the early level is known), so that a flag's step
        # never depends on how long the series was when it was judged.
        armed = np.arange(n) >= max(ready, rules.min_steps - 1)
        flags += _entropy_flags(steps, cols, early, armed, rules, vocab_size)
    # in the order `deciding` ranks them, so the first alarm a caller meets in `flags` (or in a LiveMonitor batch) is
    # the one that decides the verdict
    flags.sort(key=_rank)
    verdict = "healthy" if early is not None else "insufficient_data"
    report = HealthReport(verdict, flags, law, n, None if early is None else round(early, 6), s.ignored, notes,
                          not_evaluated)
    if report.alarm:
        report.verdict = report.deciding.kind
    return report


def _entropy_flags(steps: np.ndarray, cols: dict[str, np.ndarray | None], early: float, armed: np.ndarray,
                   rules: HealthRules, vocab_size: int | None) -> list[Flag]:
    ent = cols[ENTROPY]
    n = ent.size
    ev = _evidence(cols, rules, n)
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
        if _present(tail):
            early_tail, tail_ready = early_level(tail, rules.early_steps)
            if early_tail > rules.tail_floor:  # a tail that never rose above the floor did not "vanish"
                flags += _signal_flags(
                    "collapse.tail", armed & (np.arange(n) >= tail_ready) & (tail < rules.tail_floor),
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
                lambda i: (["entropy near log V: sampling is close to uniform over the vocabulary"], []),
            )
        flags += _saturation(steps, ent, cols[REWARD], early, armed, rules, cols)
    return flags


def _episodes(
    rule: str, severity: str, cond: np.ndarray, steps: np.ndarray, values: np.ndarray, threshold: float,
    rules: HealthRules, cols: dict[str, np.ndarray | None], text: str,
    evidence_at: Callable[[int], tuple[list[str], list[str]]], sustain: int | None = None,
) -> list[Flag]:
    """One flag per episode of `cond` lasting `sustain` (default: sustain_steps) rows; `evidence_at(i)` gives the
    statements and the names of the harm that held at the fire row."""
    flags = []
    for start, fire, end in _sustained(cond, sustain or rules.sustain_steps):
        sl = slice(start, min(end, start + _EVIDENCE_CAP))
        said, harm = evidence_at(fire)
        action = action_for(rule, harm)
        flags.append(
            Flag(
                rule=rule, severity=severity, fired_at=int(steps[fire]), until=int(steps[end - 1]),
                steps=[int(s) for s in steps[sl]],
                values=[round(float(v), 6) if math.isfinite(v) else float(v) for v in values[sl]],
                threshold=round(float(threshold), 6),
                message=text.format(
                    start=int(steps[start]), end=int(steps[end - 1]), n=end - start, thr=threshold, last=values[end - 1]
                ),
                evidence=said, supporting=_supporting(cols, rules, fire), harm=harm,
                action=action.text, action_source=action.source,
            )
        )  # fmt: skip
    return flags


def _sustained(cond: np.ndarray, n: int) -> list[tuple[int, int, int]]:
    """Episodes of `cond` lasting at least n: (start, fire index = start + n − 1, end exclusive)."""
    out = []
    padded = np.concatenate([[False], cond, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    for start, end in zip(edges[0::2], edges[1::2], strict=True):
        if end - start >= n:
            out.append((int(start), int(start + n - 1), int(end)))
    return out


def _signal_flags(
    rule: str, signal: np.ndarray, steps: np.ndarray, values: np.ndarray, threshold: float, rules: HealthRules,
    ev: _Evidence, cols: dict[str, np.ndarray | None], text: str,
) -> list[Flag]:
    """A signal's warnings (the signal alone) and alarms (the signal with evidence of harm, sustained together)."""
    names = [e for e in EVIDENCE_FOR[rule] if e in ev.held]

    def held_at(i: int) -> tuple[list[str], list[str]]:
        harm = [e for e in names if ev.held[e][i]]
        return [ev.say[e](i) for e in harm], harm

    if not rules.alarm_needs_evidence:
        def alone(i: int) -> tuple[list[str], list[str]]:
            said, harm = held_at(i)
            return (said, harm) if said else (["alarm_needs_evidence=False: the signal alone is an alarm"], [])

        return _episodes(rule, "alarm", signal, steps, values, threshold, rules, cols, text, alone)
    harm = np.zeros(signal.size, dtype=bool)
    for e in names:
        harm |= ev.held[e]
    alarms = _episodes(rule, "alarm", signal & harm, steps, values, threshold, rules, cols, text, held_at)
    looked = EVIDENCE_FOR[rule]
    unseen = [e for e in looked if e not in ev.held]
    missing = "no evidence of harm yet (looked for: " + ", ".join(e for e in looked if e in ev.held) + ")"
    if unseen:
        missing += "; not evaluated (no column): " + ", ".join(unseen)
    warned = _episodes(rule, "warning", signal, steps, values, threshold, rules, cols, text, lambda i: ([missing], []))
    # a signal whose evidence was already there when it fired is an alarm only, not also a warning at the same step
    fired = {f.fired_at for f in alarms}
    return alarms + [f for f in warned if f.fired_at not in fired]


def _non_finite_flags(s: _Series, rules: HealthRules) -> list[Flag]:
    """An explosion alarm at each step where the loss or the gradient norm was logged NaN or ±inf (no history, no
    sustain: the step it appears). Read from the `non_finite` column where there is one (a stored value of NaN and a
    NULL look alike once read back, so the plugin and the importer record the fact itself), else from the values."""
    flag_col, loss, grad = s.cols[NON_FINITE], s.cols["loss"], s.cols["grad_norm"]
    if _present(flag_col):
        cond = flag_col > 0.5
    else:  # without the flag, only ±inf: a NaN here may be a step at which nothing was logged
        cond = np.zeros(s.steps.size, dtype=bool)
        for col in (loss, grad):
            if col is not None:
                cond |= np.isinf(col)
    if not cond.any():
        return []
    values = grad if grad is not None else loss if loss is not None else np.full(s.steps.size, np.nan)

    def what(i: int) -> tuple[list[str], list[str]]:
        seen = [f"{name} {col[i]:g}" for name, col in (("loss", loss), ("grad_norm", grad))
                if col is not None and not math.isfinite(col[i])]
        return ([f"{', '.join(seen) or 'a non-finite loss or gradient norm'} logged: the update at this step is not a "
                 "number, and the weights it touches are lost"], [])

    return _episodes("explosion.non_finite", "alarm", cond, s.steps, values, math.inf, rules, s.cols,
                     "the loss or gradient norm logged at step {start} is not a finite number ({n} logged step(s) "
                     "in a row, to step {end})", what, sustain=1)


def _saturation(
    steps: np.ndarray, ent: np.ndarray, reward: np.ndarray | None, early: float, armed: np.ndarray,
    rules: HealthRules, cols: dict[str, np.ndarray | None],
) -> list[Flag]:
    if not _present(reward) or not early > 0:
        return []
    r0, ready = early_level(reward, rules.early_steps)
    law = _prefix_law(ent, reward, min_points=rules.law_min_points, min_r2=rules.law_min_r2)
    ceiling = law.ceiling
    room = ceiling - r0
    w = rules.saturation_window
    drop = np.full(ent.size, np.nan)  # entropy still falling: the drop over the trailing window / early level
    if ent.size >= w:
        drop[w - 1 :] = (ent[: ent.size - w + 1] - ent[w - 1 :]) / early
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = (ceiling - reward) / room
        cond = armed & law.valid & (np.arange(ent.size) >= ready) & (room > 0)
        cond &= (gap <= rules.saturation_gap) & (drop >= rules.saturation_min_drop)
    flags = []
    for start, _, end in _sustained(cond, rules.sustain_steps):
        fire = start + rules.sustain_steps - 1
        c = float(ceiling[fire])
        thr = c - rules.saturation_gap * (c - r0)
        flags += _episodes(
            "saturation", "warning", np.isin(np.arange(ent.size), np.arange(start, end)), steps, reward, thr,
            rules, cols,
            f"reward reached {{thr:.4g}} or more (within saturation_gap of the law's ceiling {c:.4g}, fitted on "
            "the steps so far) while entropy kept falling, {n} steps, {start}–{end} (last reward {last:.4g})",
            lambda i: (["the entropy–reward law predicts little reward left to gain by lowering entropy further"], []),
        )
    return flags


# =========================================================================== live


class LiveMonitor:
    """`judge`, fed during training: each hand-off's steps rows are appended and the series judged again; the flags
    not reported before come back once each (warnings and alarms), at the step they fired. Because every condition
    is causal (see the module docstring), these are exactly the flags `judge` finds on the whole series afterwards.

    The plugin calls: `LiveMonitor(rules, vocab_size=V)`, `update_many(rows) -> list[Flag]` (act on
    `flag.is_alarm`: only alarms stop training), `active_kinds()` (alarms active at the last step, by kind) and
    `active_kinds("warning")`. A row for the same step as the last one replaces it (the trainer's own logged scalars
    arrive after the step's row: the row is given again, completed), as `judge` keeps the last row of a step.
    Judging the whole series keeps one implementation; it costs O(steps × window), so it is skipped for new rows
    where no rule's signal holds (`_quiet`): every flag fires at a step where its signal holds, so such rows can
    bring no new flag, and any episode open before them has ended (the report, wanted only when read, is judged
    then).
    """

    def __init__(self, rules: HealthRules | None = None, *, vocab_size: int | None = None) -> None:
        self.rules = rules or HealthRules()
        self.vocab_size = vocab_size
        self._series: dict[str, list[float]] = {}
        self._reported: set[tuple[str, str, int]] = set()
        self._report: HealthReport | None = None
        self._stale = False  # rows were added since `_report` was judged
        self._early: float | None = None  # the entropy's early level, once known (fixed while steps only grow)
        self._early_row = -1  # the row from which it is known (a replaced row up to it makes it unknown again)
        self._ordered, self._max_step = True, -math.inf  # every step so far came after all the earlier ones
        self._obs: list[int] = []  # while ordered: the rows with a finite (float32) mean entropy
        self._last_quiet = False  # no signal held at the rows of the last update: no episode is active now

    @property
    def report(self) -> HealthReport | None:
        """The judgement of the whole series so far (None before any row)."""
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
        n0 = None
        for row in rows:
            at = self._append(row)
            n0 = at if n0 is None else min(n0, at)
        self._stale = True
        self._last_quiet = self._quiet(n0)
        if self._last_quiet:
            return []
        new = [f for f in self.report.flags if f.key not in self._reported]
        self._reported |= {f.key for f in new}
        return new

    def _append(self, row: Mapping[str, Any]) -> int:
        """Add a row (or replace the last one, for the same step); -> its index."""
        steps = self._series.get("step", [])
        n = len(steps)
        step = float(row["step"])
        if n and self._ordered and step == steps[-1]:  # the same step again: the last row is replaced whole
            n -= 1
            for col in self._series.values():
                col.pop()
            if self._obs and self._obs[-1] == n:
                self._obs.pop()
        else:
            self._ordered = self._ordered and step > self._max_step
            self._max_step = max(self._max_step, step)
        for name, value in row.items():
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue  # not a number (e.g. select_method) or undefined (None): not used by the rules
            self._series.setdefault(name, [math.nan] * n).append(v)
        for col in self._series.values():  # a column missing from this row gets NaN, keeping columns aligned
            if len(col) == n:
                col.append(math.nan)
        ent = self._series.get(ENTROPY)
        if self._ordered and ent is not None and math.isfinite(np.float32(ent[n])):
            self._obs.append(n)
        return n

    def _quiet(self, n0: int) -> bool:
        """Whether no rule's signal holds at any of the rows from index n0 on: the same float32-rounded values and
        the same comparisons as `judge`, over the same logged steps. False whenever unsure: before the early level is
        known, and for good once a step came that was not after every earlier one (`judge` then keeps the last row
        of a repeated step and sorts: row indices are no longer the judged series')."""
        if not self._ordered or ENTROPY not in self._series:
            return False
        flag_col = self._series.get(NON_FINITE)
        if flag_col is not None and any(v > 0.5 for v in flag_col[n0:]):
            return False
        if NON_FINITE not in self._series and any(
                math.isinf(v) for name in ("loss", "grad_norm") for v in self._series.get(name, ())[n0:]):
            return False
        rules = self.rules
        if n0 <= self._early_row:
            self._early = None
        if self._early is None:
            early, self._early_row = early_level(_column(self._series, ENTROPY), rules.early_steps)
            if not early > 0:
                return False
            self._early = early
        early, w = self._early, rules.saturation_window
        obs = self._obs
        j0 = bisect.bisect_left(obs, n0)  # the first logged step among the new rows (no array built per update)
        if j0 == len(obs):
            return True
        at = max(0, j0 - w + 1)  # the logged steps the new ones' saturation drop looks back to
        ent = _column({"e": [self._series[ENTROPY][i] for i in obs[at:]]}, "e")
        tail = self._series.get(rules.tail_column)
        tail = None if tail is None else _column({"t": [tail[i] for i in obs[j0:]]}, "t")
        log_vocab = (rules.explosion_log_vocab_fraction * math.log(self.vocab_size)
                     if self.vocab_size and self.vocab_size > 1 else math.inf)
        collapse, explosion = rules.collapse_fraction * early, rules.explosion_factor * early
        for j in range(j0, len(obs)):
            e = ent[j - at]
            if e < collapse or e > explosion or e > log_vocab:
                return False
            if tail is not None and tail[j - j0] < rules.tail_floor:
                return False
            if j >= w - 1 and (ent[j - w + 1 - at] - e) / early >= rules.saturation_min_drop:  # saturation's drop
                return False
        return True

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
