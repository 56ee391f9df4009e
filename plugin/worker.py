"""`StepWorker`: one background thread that runs forkwatch's per-step bookkeeping off the training thread;
`Pending`: the finished steps waiting to be handed to it (small steps go together).

The training thread hands it callables (records -> numpy/Arrow columns, decoding of sampled completions, the
writer's `put`, the live health rules) and goes on training; they run in order, one at a time. A job's exception is
caught at this thread boundary by the monitor's `Faults` guard (counted, logged once), like a hook's. The queue is
unbounded but each job holds one step's small CPU tensors; `wait` lets the callback bound the lag where an answer is
needed (the health flags of the previous step, a checkpoint's flush).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

_STOP = object()


class Job:
    """A submitted callable; `result(timeout)` waits for it (None when it failed or timed out)."""

    __slots__ = ("fn", "where", "done", "value")

    def __init__(self, fn: Callable[[], Any], where: str) -> None:
        self.fn, self.where = fn, where
        self.done = threading.Event()
        self.value: Any = None

    def result(self, timeout: float | None = None) -> Any:
        return self.value if self.done.wait(timeout) else None


class StepWorker:
    def __init__(self, guard: Callable[[str], Any], name: str = "forkwatch-step-worker") -> None:
        self._guard = guard  # Faults.guard: a context manager counting exceptions per `where`
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, where: str, fn: Callable[[], Any]) -> Job:
        job = Job(fn, where)
        if not self._thread.is_alive():  # closed: run inline rather than lose the records
            self._run(job)
        else:
            self._q.put(job)
        return job

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every job submitted so far has run. True when they all finished within `timeout`."""
        return self.submit("drain", lambda: None).done.wait(timeout)

    def close(self, timeout: float | None = 60.0) -> None:
        """Run what is queued, then stop the thread. Safe to call twice."""
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join(timeout)

    def _run(self, job: Job) -> None:
        try:
            with self._guard(job.where):
                job.value = job.fn()
        finally:
            job.done.set()

    def _loop(self) -> None:
        while (job := self._q.get()) is not _STOP:
            self._run(job)


class Pending:
    """Finished steps not yet handed to the worker: each rank's record accumulators and rank 0's `steps` rows.

    A hand-off costs the same few milliseconds of fixed work (Arrow conversion, one tokenizer call, one pass of the
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
