"""The hand-off: how a finished step's numbers get from the training thread to the writer, in one place.

The callback drives one `HandOff` per `train()`:

    scalars = handoff.add(step, acc, parts)   # every step end: this rank's records wait here; rank 0 builds the
                                              # `steps` row (plugin/step_stats.py) and gets the scalars to log
    if handoff.due():                         # once `interval_s` has passed, or an alarm fired, or the rows
        flags = handoff.run()                 # waiting reach the writer's queue budget
    handoff.trainer_log(step, logs)           # on_log: TRL's loss, grad_norm, kl, clip ratios join the step's row
    ...                                       # (a row whose step the trainer logs waits for them before it is written)
    handoff.run(health=False, final=True)     # train end, crash: whatever waits, at once

`run` is the hand-off itself, on the training thread: the waiting `steps` rows go to the writer as one batch and
through the health rules; the recorded tokens, forks and completions are copied to the host (plugin/record_copy.py)
and go to the writer as one deferred job, which builds the table columns and decodes the text on the writer's thread
(plugin/record_decode.py). A hand-off has a fixed cost (a few stacked tensor ops, one queue item, one evaluation of
the health rules) whatever the number of steps in it, so steps shorter than `interval_s` are handed over together.

This is the only place before the writer's queue where records wait, and the writer's queue budget (`queue_rows`)
is the one row cap: a hand-off is also due when the token rows waiting here reach it.

Health rules: the store's rules (store/health.py) are used in this module only. They are evaluated over the new
`steps` rows at each hand-off, or, when a run stops on alarms (`stop_on_alarm`), over each row at its own step end
so that training stops at the end of the step where the alarm fired even when no hand-off is due (the rules re-read
the whole series only when a new row shows a signal, store/health.py `LiveMonitor`; runs that only log alarms keep
them batched all the same).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any

from forkwatch.plugin.captures import StepAccumulator
from forkwatch.plugin.record_copy import to_host
from forkwatch.plugin.step_stats import SELECT_PREFIX, select_means, steps_row
from forkwatch.store.health import HealthRules, LiveMonitor
from forkwatch.store.health_rules import NON_FINITE
from forkwatch.store.importer import trainer_scalars
from forkwatch.store.ledger import Ledger

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
