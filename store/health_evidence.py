"""The evidence of harm that turns a health signal into an alarm (docs/methods.md, "Health: warnings and alarms"),
computed per step from that step and the ones before it only (causal: the live alarm and `check` agree). Each
evidence is a boolean array over the steps plus a sentence quoting its numbers at a step. numpy only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from forkwatch.store.health_rules import HealthRules

# Which evidence corroborates which signal (docs/methods.md gives each one's reason).
EVIDENCE_FOR = {
    "collapse.mean": ("reward_not_improving", "reward_falling", "length_collapsed", "tail_gone"),
    "collapse.tail": ("reward_not_improving", "reward_falling", "length_collapsed"),
    "explosion.mean": ("reward_falling", "length_runaway", "truncation_runaway"),
}


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


@dataclass
class Evidence:
    """Per-step evidence arrays (bool) with the numbers a statement quotes, all causal."""

    held: dict[str, np.ndarray]
    say: dict[str, Callable[[int], str]]  # name -> the statement at a step index


def evidence(cols: dict[str, np.ndarray | None], rules: HealthRules, n: int) -> Evidence:
    w = rules.evidence_window
    held: dict[str, np.ndarray] = {}
    say: dict[str, Callable[[int], str]] = {}
    idx = np.arange(n)
    reward = cols.get("reward_mean")
    if reward is not None:
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
            drop_thr = np.fmax(rules.reward_drop_fraction * move, rules.noise_z * se)
            known = idx >= max(ready, w)
            held["reward_not_improving"] = known & (gain <= stall_thr)
            held["reward_falling"] = known & (best - rs > drop_thr) & (move > 0)
        say["reward_not_improving"] = lambda i: (
            f"reward not improving: {gain[i]:+.4g} over the last {w} steps (needs > {stall_thr[i]:.4g}, "
            f"{rules.reward_stall_fraction:g} × its largest move {move[i]:.4g})")
        say["reward_falling"] = lambda i: (
            f"reward falling: {rs[i]:.4g}, {best[i] - rs[i]:.4g} below its best {best[i]:.4g} (threshold "
            f"{drop_thr[i]:.4g})")
    length = cols.get("completion_length_mean")
    if length is not None:
        l0, ready = early_level(length, rules.early_steps)
        ls = trailing_median(length, w)
        with np.errstate(invalid="ignore"):
            held["length_collapsed"] = (idx >= ready) & (ls < rules.length_collapse_fraction * l0)
            held["length_runaway"] = (idx >= ready) & (ls > rules.length_runaway_factor * l0)
        say["length_collapsed"] = lambda i: (
            f"completions collapsing: length {ls[i]:.4g} < {rules.length_collapse_fraction:g} × early {l0:.4g}")
        say["length_runaway"] = lambda i: (
            f"completions running away: length {ls[i]:.4g} > {rules.length_runaway_factor:g} × early {l0:.4g}")
    trunc = cols.get("truncated_fraction")
    if trunc is not None:
        t0, ready = early_level(trunc, rules.early_steps)
        ts = trailing_median(trunc, w)
        with np.errstate(invalid="ignore"):
            held["truncation_runaway"] = (idx >= ready) & (ts > t0 + rules.truncation_rise)
        say["truncation_runaway"] = lambda i: (
            f"completions hitting the length cap: truncated {ts[i]:.1%} > early {t0:.1%} + {rules.truncation_rise:g}")
    tail = cols.get(rules.tail_column)
    if tail is not None:
        with np.errstate(invalid="ignore"):
            held["tail_gone"] = tail < rules.tail_floor
        say["tail_gone"] = lambda i: f"the tail is gone: {rules.tail_column} {tail[i]:.4g} < tail_floor {rules.tail_floor:g}"
    return Evidence(held, say)


def supporting(cols: dict[str, np.ndarray | None], rules: HealthRules, i: int) -> dict[str, float]:
    """Reward, length and truncation at the fire step (trailing window median) beside their early levels."""
    out = {}
    for name in ("reward_mean", "completion_length_mean", "truncated_fraction"):
        col = cols.get(name)
        if col is None:
            continue
        before, ready = early_level(col, rules.early_steps)
        now = col[max(0, i - rules.evidence_window + 1) : i + 1]
        now = now[np.isfinite(now)]
        if ready <= i and now.size:
            out[f"{name}_early"] = round(before, 6)
            out[f"{name}_at_flag"] = round(float(np.median(now)), 6)
    return out
