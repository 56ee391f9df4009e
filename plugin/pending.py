"""`Pending`: the finished steps waiting for their hand-off to the writer (small steps go together)."""

from __future__ import annotations

import time
from typing import Any


class Pending:
    """Finished steps not yet handed to the writer: each rank's record accumulators and rank 0's `steps` rows.

    A hand-off costs the same fixed work (a few stacked torch ops and host copies, one writer job, one pass of the
    health rules) however small the steps, so steps shorter than `interval_s` go together: `due()` once that long
    has passed since the last hand-off, or once `max_rows` token rows wait (bounded memory). A step longer than
    `interval_s` is handed over at its own end, as with `interval_s=0`.
    """

    def __init__(self, interval_s: float, max_rows: int = 1_000_000) -> None:
        self.interval_s, self.max_rows = interval_s, max_rows
        self.records: list[tuple[int, Any]] = []  # (step, StepAccumulator with tokens / forks / completions)
        self.rows: list[dict[str, Any]] = []  # steps rows, rank 0 only
        self._token_rows = 0
        self._last = time.monotonic()

    def add(self, step: int, acc: Any = None, row: dict[str, Any] | None = None) -> None:
        if acc is not None and (acc.completions or acc.tokens or acc.forks):
            self.records.append((step, acc))
            self._token_rows += sum(t.take.numel() for t in acc.tokens)  # an upper bound from shapes: no device sync
        if row is not None:
            self.rows.append(row)

    def __bool__(self) -> bool:
        return bool(self.records or self.rows)

    def due(self) -> bool:
        return bool(self) and (time.monotonic() - self._last >= self.interval_s or self._token_rows >= self.max_rows)

    def take(self) -> tuple[list[tuple[int, Any]], list[dict[str, Any]]]:
        out = (self.records, self.rows)
        self.records, self.rows, self._token_rows, self._last = [], [], 0, time.monotonic()
        return out
