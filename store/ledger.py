"""`Ledger`: one rank's account of what recording lost — hook faults, dropped records and alerts that could not be
sent — in one place.

Recording must never change training: an exception in a forkwatch hook, in a deferred record producer or in the
writer thread is caught at that boundary, counted here under the name of the place it happened (`faults`), and
logged once per place; records that could not be queued or written are counted per table (`dropped`); alerts
(store/alerts.py) are counted as sent or failed (`alerts`). The writer puts the counts into this rank's run.json /
rank-NNN.json, and the readers sum them over ranks.
Thread-safe: the training thread and the writer thread both count into it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

logger = logging.getLogger(__name__)


class Ledger:
    def __init__(self) -> None:
        self._faults: Counter[str] = Counter()  # per place (hook or job name)
        self._dropped: Counter[str] = Counter()  # records per table
        self._alerts: Counter[str] = Counter()  # "sent" / "failed"
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def guard(self, where: str) -> _Guard:
        """Catch and count an exception raised inside the block (the boundary of a hook or a background job)."""
        return _Guard(self, where)

    def _fault(self, where: str, exc_info: tuple) -> None:
        with self._lock:
            self._faults[where] += 1
            first = self._faults[where] == 1
        if first:
            logger.error("forkwatch: error in %s (training continues; later errors here only counted)", where,
                         exc_info=exc_info)

    def drop(self, table: str, rows: int, kind: str, message: str) -> None:
        """Count `rows` records of `table` as lost; log `message` the first time a drop of this `kind` happens."""
        with self._lock:
            self._dropped[table] += rows
        self.warn_once(f"drop:{kind}", message)

    def alert_sent(self) -> None:
        with self._lock:
            self._alerts["sent"] += 1

    def alert_failed(self, message: str) -> None:
        """Count an alert that could not be sent; log `message` the first time (later ones: counted, in run.json)."""
        with self._lock:
            self._alerts["failed"] += 1
        self.warn_once("alert", message)

    @property
    def alerts(self) -> dict[str, int]:
        """{"sent": n, "failed": m} ({} before the first alert)."""
        with self._lock:
            return {k: self._alerts[k] for k in ("sent", "failed")} if self._alerts else {}

    def warn_once(self, key: str, message: str) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        logger.warning("%s (further such messages suppressed; counts go to run.json)", message)

    @property
    def faults(self) -> dict[str, int]:
        with self._lock:
            return dict(self._faults)

    @property
    def dropped(self) -> dict[str, int]:
        with self._lock:
            return dict(self._dropped)

    def total_faults(self) -> int:
        with self._lock:
            return sum(self._faults.values())

    def total_dropped(self) -> int:
        with self._lock:
            return sum(self._dropped.values())


class _Guard:
    """`Ledger.guard`'s block: a plain class, not a generator context manager, because the hooks enter a dozen of
    these per training step (a quarter of the cost each)."""

    __slots__ = ("ledger", "where")

    def __init__(self, ledger: Ledger, where: str) -> None:
        self.ledger, self.where = ledger, where

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is None or not issubclass(kind, Exception):
            return False  # no error, or KeyboardInterrupt / SystemExit: not ours to swallow
        self.ledger._fault(self.where, (kind, exc, tb))
        return True
