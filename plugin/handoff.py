"""The hand-off: how a finished step's numbers get from the training thread to the writer, in one place.

The callback drives one `HandOff` per `train()`:

    scalars = handoff.add(step, acc, parts)   # every step end: this rank's records wait here; rank 0 builds the
                                              # `steps` row (`steps_row`, below) and gets the scalars to log
    if handoff.due():                         # once `interval_s` has passed, or an alarm fired, or the rows
        flags = handoff.run()                 # waiting reach the writer's queue budget
    handoff.trainer_log(step, logs)           # on_log: TRL's loss, grad_norm, kl, clip ratios join the step's row
    ...                                       # (a row whose step the trainer logs waits for them before it is written)
    handoff.run(health=False, final=True)     # train end, crash: whatever waits, at once

`run` is the hand-off itself, on the training thread: the waiting `steps` rows go to the writer as one batch and
through the health rules; the recorded tokens, forks and completions are copied to the host (plugin/records.py
`to_host`) and go to the writer as one deferred job, which builds the table columns and decodes the text on the
writer's thread (`HostRecords.batches`). A hand-off has a fixed cost (a few stacked tensor ops, one queue item, one
evaluation of the health rules) whatever the number of steps in it, so steps shorter than `interval_s` are handed
over together.

This is the only place before the writer's queue where records wait, and the writer's queue budget (`queue_rows`)
is the one row cap: a hand-off is also due when the token rows waiting here reach it.

Health rules: the store's rules (store/health.py) are used in this module only. They are evaluated over the new
`steps` rows at each hand-off, or, when a run stops on alarms (`stop_on_alarm`), over each row at its own step end
so that training stops at the end of the step where the alarm fired even when no hand-off is due (the rules re-read
the whole series only when a new row shows a signal, store/health.py `LiveMonitor`; runs that only log alarms keep
them batched all the same).

The `steps` row itself (`steps_row`, numpy only, rank 0 at the end of the step): built from every rank's
`StepAccumulator.collect()`, no torch (the device values crossed to the host once, in `collect`). A statistic that
is undefined for a step (a mean of no values, a standard deviation of fewer than two, a fraction of zero tokens, a
selector diagnostic of micro-batches whose advantages are all 0) is None, stored as NULL: NaN in a stored column
would read as a measured value that went wrong.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from forkwatch.plugin.records import to_host
from forkwatch.plugin.step_data import StepAccumulator
from forkwatch.store.health import HealthRules, LiveMonitor
from forkwatch.store.health_rules import NON_FINITE
from forkwatch.store.importer import trainer_scalars
from forkwatch.store.ledger import Ledger
from forkwatch.store.schema import STEP_PERCENTILES, STEPS, boolean_columns, percentile_name
from forkwatch.store.spectrum import spectrum_counts

logger = logging.getLogger(__name__)


class HandOff:
    def __init__(self, writer: Any, *, ledger: Ledger, rank: int, tokenizer: Any, interval_s: float, max_rows: int,
                 select_method: str | None, health_rules: HealthRules | None = None, vocab_size: int | None = None,
                 stop_on_alarm: bool = False) -> None:
        self.writer, self.ledger, self.rank, self.tokenizer = writer, ledger, rank, tokenizer
        self.interval_s, self.max_rows, self.select_method = interval_s, max_rows, select_method
        # Rank 0 evaluates the rules; with stop_on_alarm every rank does, over the same gathered rows, so that all
        # ranks stop at the same step (a rank that went on alone would wait forever in the next collective). The
        # rules were checked at attach (ForkwatchConfig), so building them cannot fail here.
        self.stop_on_alarm = stop_on_alarm
        self.health = LiveMonitor(health_rules, vocab_size=vocab_size) if rank == 0 or stop_on_alarm else None
        self.alarm_scalars: dict[str, float] = {}  # forkwatch/{alarm,warning}/<kind>: the rules as of their last evaluation
        self._records: list[tuple[int, StepAccumulator]] = []  # (step, this rank's captures with records)
        self._rows: list[dict[str, Any]] = []  # rank 0: steps rows not yet handed over
        self._unchecked: list[dict[str, Any]] = []  # rank 0: rows the health rules have not seen yet
        self._flags: list[Any] = []  # flags found since the last `run`
        self._token_rows = 0
        self._last = time.monotonic()
        self._last_row: dict[str, Any] | None = None  # the newest steps row (completed by the trainer's own log)
        self._log_due = False  # the trainer logs at `_last_row`'s step, after its end: the row waits for that

    def __bool__(self) -> bool:
        return bool(self._records or self._rows)

    # ------------------------------------------------------------------ every step
    def add(self, step: int, acc: StepAccumulator, parts: list[dict[str, Any]] | None = None, *,
            log_due: bool = False) -> dict[str, float]:
        """This rank's captures of `step` wait for the next hand-off. `parts` (on rank 0, and on every rank with
        stop_on_alarm) is every rank's `acc.collect()` (with `dropped`): the step's `steps` row is built from it
        (waiting for the hand-off on rank 0) and the scalars to log for the step are returned (TRL's own metric buffer
        averages them over the logging window, exactly like TRL's `entropy`). `log_due`: the trainer logs this step
        (`control.should_log`), so its row waits for `trainer_log` before it is handed over."""
        if acc.completions or acc.tokens or acc.forks:
            self._records.append((step, acc))
            self._token_rows += sum(t.take.numel() for t in acc.tokens)  # an upper bound from shapes: no device sync
        if not parts:
            return {}
        selected = select_means(parts)
        row = steps_row(step, parts, select_method=self.select_method, selected=selected,
                        dropped=sum(p.get("dropped", 0) for p in parts))
        row["time"] = dt.datetime.now(dt.timezone.utc)
        if self.rank == 0:  # only rank 0 writes steps rows
            self._rows.append(row)
        self._unchecked.append(row)
        self._last_row, self._log_due = row, log_due
        if self.stop_on_alarm:
            with self.ledger.guard("health"):
                self._check_health()
        scalars = {k: float(v) for k, v in row.items() if k not in ("step", "time") and not k.startswith(SELECT_PREFIX)
                   and v is not None and not isinstance(v, list)}
        scalars.update({f"select/{k}": v for k, v in selected.items() if v is not None})
        scalars.update(self.alarm_scalars)
        return scalars

    def trainer_log(self, step: int, logs: dict[str, Any]) -> None:
        """The trainer's own scalars of `step` (TRL's loss, grad_norm, kl, clip ratios; logged after the step's end,
        at logging steps) join that step's `steps` row: a row already handed over is handed over again, completed
        (the last row of a step wins, in the store as in the health rules). A non-finite loss or gradient norm is
        an alarm: the rules then run at once, so it is acted on at this step (the next step would train on
        non-finite weights)."""
        values = trainer_scalars(logs)
        row = self._last_row
        if row is None or row["step"] != step:
            return
        self._log_due = False
        if not values:
            return
        row.update(values)
        row["time"] = dt.datetime.now(dt.timezone.utc)
        if self.rank == 0 and not any(r is row for r in self._rows):  # handed over without them after all
            self._rows.append(row)
        if not any(r is row for r in self._unchecked):
            self._unchecked.append(row)
        if self.stop_on_alarm or values.get(NON_FINITE):
            with self.ledger.guard("health"):
                self._check_health()

    def due(self) -> bool:
        """Whether the callback should `run` the hand-off at this step end."""
        return bool(self._flags) or bool(self) and (
            time.monotonic() - self._last >= self.interval_s or self._token_rows >= self.max_rows)

    # ------------------------------------------------------------------ the hand-off
    def run(self, *, health: bool = True, final: bool = False) -> list[Any]:
        """Hand everything waiting to the writer (but the newest steps row while the trainer's log of its step is
        still to come, unless `final`: a crash, the end); -> the health flags found since the last run (`is_alarm`,
        `describe()`). Training thread; each part guarded on its own, so a fault in one does not cost the others."""
        records, rows = self._records, self._rows
        held = [] if final or not self._log_due else [r for r in rows if r is self._last_row]
        if held:
            rows = [r for r in rows if r is not self._last_row]
        self._records, self._rows, self._token_rows, self._last = [], held, 0, time.monotonic()
        if rows:
            with self.ledger.guard("steps_rows"):
                keys = dict.fromkeys(k for r in rows for k in r)
                self.writer.put("steps", {k: [r.get(k) for r in rows] for k in keys})
        if health:
            with self.ledger.guard("health"):
                self._check_health()
        self._unchecked = []
        if records:
            with self.ledger.guard("records"):
                host = to_host(records, rank=self.rank, tokenizer=self.tokenizer)
                self.writer.submit(host.batches, rows=host.rows, where="records")
        flags, self._flags = self._flags, []
        return flags

    def _check_health(self) -> None:
        if self.health is None or not self._unchecked:
            return
        rows, self._unchecked = self._unchecked, []
        self._flags.extend(self.health.update_many(rows))
        self.alarm_scalars = {f"{severity}/{k}": float(v) for severity in ("alarm", "warning")
                              for k, v in self.health.active_kinds(severity).items()}


def is_alarm(flag: Any) -> bool:
    """Whether a health flag is an alarm (which stops training under on_alarm="stop"), not a warning."""
    return flag.is_alarm


# ------------------------------------------------------------------------------------------------ the steps row
SELECT_PREFIX = "select_"  # metric m of the selector fills the STEPS column select_<m>, when the schema has one
_SELECT_COLUMNS = frozenset(n for n in STEPS.names if n.startswith(SELECT_PREFIX) and n != "select_method")
_BOOLEAN = boolean_columns(STEPS)
_PERCENTILE_NAMES = tuple(percentile_name(q) for q in STEP_PERCENTILES)
_QS = np.asarray(STEP_PERCENTILES, dtype=np.float64)


def select_means(parts: list[dict[str, Any]]) -> dict[str, float | None]:
    """Each selector metric's mean over the step's micro-batches of every rank where it is defined (finite); None
    where it is defined in none (e.g. grad_share when every advantage of the step is 0)."""
    found: dict[str, list[float]] = {}
    for p in parts:
        for k, v in p["select_metrics"].items():
            found.setdefault(k, []).extend(v)
    out: dict[str, float | None] = {}
    for k, v in found.items():
        finite = [x for x in v if math.isfinite(x)]
        out[k] = math.fsum(finite) / len(finite) if finite else None
    return out


def steps_row(step: int, parts: list[dict[str, Any]], *, select_method: str | None, dropped: int,
              selected: dict[str, float | None]) -> dict[str, Any]:
    """One `steps` row (STEPS schema minus run_id and time); `selected` is `select_means(parts)`."""
    ent = np.concatenate([p["entropy"] for p in parts])
    ren = np.concatenate([p["renyi2"] for p in parts])
    gjs = np.concatenate([p["group_js"] for p in parts])
    n = int(ent.size)
    rewards = np.concatenate([p["rewards"] for p in parts])
    lengths = np.concatenate([p["lengths"] for p in parts])
    truncated = np.concatenate([p["truncated"] for p in parts])
    reward_mean, length_mean, truncated_fraction = finite_means(np.stack([rewards, lengths, truncated]))
    row: dict[str, Any] = {
        "step": step,
        "n_tokens": n,
        "n_completions": int(rewards.size),
        # one sort for all three when group_js was computed; all its statistics None when not
        **summarize_many({"entropy": ent, "renyi2": ren, **({"group_js": gjs} if gjs.size else {})}),
        **({} if gjs.size else _NO_GROUP_JS),
        "fork_fraction": sum(p["n_forks"] for p in parts) / n if n else None,
        "selected_fraction": sum(p["n_selected"] for p in parts) / n if n else None,
        "select_method": select_method,
        "reward_mean": reward_mean,
        "reward_std": sample_std(rewards),
        "completion_length_mean": length_mean,
        "truncated_fraction": truncated_fraction,
        "forkwatch_seconds": float(max(p["seconds"] for p in parts)) if parts else 0.0,
        "dropped_records": int(dropped),
    }
    for name, value in selected.items():
        col = SELECT_PREFIX + name
        if col in _SELECT_COLUMNS:  # a boolean column holds "true in most micro-batches"
            row[col] = bool(value > 0.5) if col in _BOOLEAN and value is not None else value
    ranks = np.concatenate([p.get("effective_rank", np.zeros(0)) for p in parts])
    ranks = ranks[np.isfinite(ranks)]
    row["entropy_spectrum"] = spectrum_counts(ent)
    row["effective_rank_mean"] = float(ranks.mean()) if ranks.size else None  # null: not measured this step
    return row


def percentiles(values: np.ndarray, qs: Sequence[float] = STEP_PERCENTILES) -> list:
    """Linear-interpolated quantiles (numpy's default method) of a 1-D array -> list of floats, None for an empty one;
    of each row of a 2-D array -> one list per row.

    One sort and a vectorised lerp: `np.quantile` costs ~50 us of dispatch per call, which on a small step was a
    visible share of forkwatch's per-step time.
    """
    if values.shape[-1] == 0:
        none = [None] * len(qs)
        return none if values.ndim == 1 else [none for _ in range(values.shape[0])]
    a = np.sort(values.astype(np.float64, copy=False), axis=-1)
    n = a.shape[-1]
    h = (n - 1) * (_QS if qs is STEP_PERCENTILES else np.asarray(qs, dtype=np.float64))
    lo = np.floor(h).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    t, below, above = h - lo, a[..., lo], a[..., hi]
    diff = above - below
    # numpy's _lerp: from the nearer end, so that t = 1 gives `above` exactly
    return np.where(t >= 0.5, above - diff * (1 - t), below + diff * t).tolist()


def summarize_many(series: dict[str, np.ndarray]) -> dict[str, float | None]:
    """{<name>_mean, <name>_p10, ...} (the STEP_PERCENTILES) of same-length arrays (a step's entropy and renyi2) with
    one sort and one mean (token-weighted); None for every statistic of an empty array."""
    if len({v.size for v in series.values()}) > 1:
        return {k: x for prefix, v in series.items() for k, x in summarize_many({prefix: v}).items()}
    v = np.stack([a.astype(np.float64, copy=False) for a in series.values()])  # (k, n)
    means = v.mean(1).tolist() if v.shape[1] else [None] * len(series)
    out = {}
    for prefix, mean, pct in zip(series, means, percentiles(v), strict=True):
        out[f"{prefix}_mean"] = mean
        out.update({f"{prefix}_{name}": x for name, x in zip(_PERCENTILE_NAMES, pct, strict=True)})
    return out


_NO_GROUP_JS = summarize_many({"group_js": np.zeros(0)})  # every statistic None: group_js was not computed


def finite_means(rows: np.ndarray) -> list[float | None]:
    """Mean of the finite values of each row (None for a row with none), in a few numpy calls for all rows."""
    finite = np.isfinite(rows)
    count = finite.sum(1)
    total = np.where(finite, rows, 0.0).sum(1)
    return [float(t / c) if c else None for t, c in zip(total.tolist(), count.tolist(), strict=True)]


def sample_std(a: np.ndarray) -> float | None:
    """Sample standard deviation (ddof 1) of the non-NaN values; None under two of them."""
    a = a[~np.isnan(a)]
    return float(np.sqrt(((a - a.mean()) ** 2).sum() / (a.size - 1))) if a.size > 1 else None
