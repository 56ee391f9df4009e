"""RunWriter: the training process hands it column batches; ONE background thread writes them as Parquet parts.

This thread is the only background thread forkwatch runs, and its queue the only queue between the plugin and the
store. The training loop must never wait on the store nor die because of it. `put` (a batch of numpy columns),
`submit` (a deferred producer of such batches, e.g. the decoding of sampled completions) and `update_meta` (fields of
run.json) only check the row cap and enqueue (O(1), no conversion, no I/O); the thread runs the producers, converts
to Arrow by the schema, buffers, writes parts and run.json, and on resume moves superseded parts aside before
anything else. The thread does numpy, Arrow and file work only, never torch: torch ops on a second thread start a
second OpenMP team that competes with the training thread's for the same cores.

One row cap: `max_queue_rows` bounds the rows the writer holds, queued or buffered for a part, until they are
written. When a put would pass it, a producer raises, or a write fails (unwritable folder, full disk, an object
store still down after the retries of store/location.py), the records are dropped, counted per table in the run's
`Ledger` (store/ledger.py), logged once, and the counts go into run.json.
Exceptions are caught at the thread boundary only.

When parts are written (store/part_file.py has the policy): every table is buffered on the thread and written as
one part covering many steps when `part_rows` rows of it are buffered (a batch that big gets a part of its own),
every `flush_interval_s` seconds, on `flush()` and on `close()`. A killed run keeps every part written so far and
loses what was buffered: at most the last `flush_interval_s` seconds of records (default 30 s, or the environment's
`FLUSH_INTERVAL_ENV`, which `forkwatch demo` sets to a few seconds so that its runs grow on screen), and never more than
`part_rows` rows of a table. `flush()` writes everything buffered: call it at checkpoints and at the end, not every
step (that would make one part per step again, ~3 ms of writer time each).
The log directory is a local folder or an S3 prefix (store/location.py). A part is encoded in memory and written
whole or not at all: a temp name then a rename on disk (no fsync: a killed process cannot lose page-cache data; a
power loss can lose the last parts, never corrupt the view of the others, since readers skip files whose footer is
bad), one upload on S3, retried with a bound.
Statistics rounding (`stat_mantissa_bits`): see store/arrow_columns.py.
Alerts (store/alerts.py): with `alert_webhook`, rank 0's `alert(flag)` queues one health flag; the thread posts it
(a short timeout, bounded tries), counts it sent or failed in the ledger and brings run.json's `alerts` up to date.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import part_file, run_folder, run_meta
from .alerts import AlertSink, redact
from .arrow_columns import (
    DEFAULT_STAT_MANTISSA_BITS,
    check_mantissa_bits,
    n_rows,
    round_mantissa,
    stat_relative_tolerance,
    to_arrow,
)
from .ledger import Ledger
from .location import UPLOAD_TRIES, Location, resolve, with_retries
from .schema import TABLES

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_QUEUE_ROWS", "DEFAULT_STAT_MANTISSA_BITS", "FLUSH_INTERVAL_ENV", "RunWriter", "round_mantissa", "stat_relative_tolerance"]


def _default_flush_interval() -> float:
    """30 s, or `FLUSH_INTERVAL_ENV` when set; refuses a value that is not a positive number, naming the variable."""
    text = os.environ.get(FLUSH_INTERVAL_ENV)
    if text is None:
        return 30.0
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise ValueError(f"{FLUSH_INTERVAL_ENV}={text!r}: set it to a positive number of seconds, or unset it (30 s)")
    return value


class _Flush:
    __slots__ = ("event", "ok")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.ok = True


class _Stop:
    __slots__ = ("status",)

    def __init__(self, status: str) -> None:
        self.status = status


class _Alert:
    __slots__ = ("flag",)

    def __init__(self, flag: Any) -> None:
        self.flag = flag


class _Meta:
    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields


DEFAULT_QUEUE_ROWS = 4_000_000
FLUSH_INTERVAL_ENV = "FORKWATCH_FLUSH_INTERVAL_S"  # the default of `flush_interval_s` when set (seconds, > 0)
Batches = Iterable[tuple[str, Mapping[str, Any]]]  # what a producer returns: (table, columns) pairs


class _Deferred:
    __slots__ = ("producer", "rows", "where")

    def __init__(self, producer: Callable[[], Batches], rows: Mapping[str, int], where: str) -> None:
        self.producer, self.rows, self.where = producer, dict(rows), where

    @property
    def n(self) -> int:
        return sum(self.rows.values())


class RunWriter:
    """Writes one rank's records of one run under LOG_DIR/<run_id>/. See the module docstring for the policy."""

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        run_id: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        meta: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
        max_queue_rows: int = DEFAULT_QUEUE_ROWS,
        part_rows: int = 1_000_000,
        flush_interval_s: float | None = None,
        stat_mantissa_bits: int | None = DEFAULT_STAT_MANTISSA_BITS,
        row_group_rows: int = 131_072,
        ledger: Ledger | None = None,
        alert_webhook: str | None = None,
        dashboard_url: str | None = None,
    ) -> None:
        run_folder.check_run_id(run_id)
        check_mantissa_bits(stat_mantissa_bits)
        self.location: Location = resolve(log_dir)
        self.log_dir = self.location.url
        self.run_id = run_id
        self.run_dir = self.location.path(run_id)
        self.rank = rank
        self.world_size = world_size
        self.max_queue_rows = max_queue_rows
        self.part_rows = part_rows
        self.flush_interval_s = flush_interval_s if flush_interval_s is not None else _default_flush_interval()
        self.stat_mantissa_bits = None if stat_mantissa_bits == 23 else stat_mantissa_bits
        self.row_group_rows = row_group_rows
        self.attempt = uuid.uuid4().hex[:8]
        # a disk error will not go away by waiting; an object store's often does (a restart, a network blip)
        self._tries = 1 if self.location.is_local else UPLOAD_TRIES

        self.ledger = ledger if ledger is not None else Ledger()
        # alerts leave from this writer's thread, rank 0 only (the flags are the same on every rank)
        self._alerts = AlertSink(alert_webhook, run_id=run_id, ledger=self.ledger, dashboard_url=dashboard_url) \
            if alert_webhook and rank == 0 else None
        # THE row cap: rows the writer holds, queued or buffered for a part, not yet written (or dropped).
        self._held_rows = 0
        self._held_lock = threading.Lock()
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._seq = 0
        self._last_step: int | None = None
        self._buffers = part_file.PartBuffers(list(TABLES), part_rows=part_rows)  # thread side only
        self._meta: dict[str, Any] = {}  # thread side only
        self._upload_failed = False  # thread side: a part's upload failed after its retries in this `_write_all`

        # Everything touching the store (resume's moves and splits, run.json) runs on the writer thread.
        self._thread = threading.Thread(
            target=self._loop, args=(dict(meta or {}), resume_step), name=f"forkwatch-writer-r{rank}", daemon=True
        )
        self._thread.start()

    # ---------------------------------------------------------------- caller side

    @property
    def dropped(self) -> dict[str, int]:
        """Records dropped per table (every table listed, 0 when none)."""
        return {**dict.fromkeys(TABLES, 0), **self.ledger.dropped}

    def put(self, table: str, columns: Mapping[str, Any]) -> bool:
        """Queue one batch of rows of `table` (every schema column but run_id). Returns False when it was dropped.

        The writer takes ownership of the arrays: do not modify them afterwards."""
        try:
            n = n_rows(columns)
        except Exception:  # not a mapping of columns: a caller bug, still never an exception into training
            n = 0
            self._drop(table, n, "bad", f"forkwatch: put({table!r}, ...) needs a dict of columns; batch dropped")
            return False
        if self._closed or table not in TABLES:
            what = "a closed writer" if self._closed else f"unknown table {table!r}"
            self._drop(table, n, "put", f"forkwatch: put to {what}; records dropped")
            return False
        with self._held_lock:
            full = self._held_rows + n > self.max_queue_rows
            if not full:
                self._held_rows += n
        if full or not self._thread.is_alive():
            self._drop(table, n, "full", f"forkwatch: writer queue full ({self.max_queue_rows} rows); records dropped")
            return False
        self._q.put((table, columns, n))
        return True

    def submit(self, producer: Callable[[], Batches], *, rows: Mapping[str, int], where: str = "records") -> bool:
        """Queue a deferred producer of batches, run on the writer thread: `producer()` returns (table, columns)
        pairs, each as `put` takes them. `rows` ({table: rows it will produce}) counts against the queue bound and
        is what is counted as dropped if the producer cannot run. The producer must do no torch work (see the module
        docstring); an exception in it is counted in the ledger as a fault under `where`. Returns False when it was
        dropped unrun."""
        item = _Deferred(producer, rows, where)
        if self._closed:
            self._drop_all(item.rows, "put", "forkwatch: submit to a closed writer; records dropped")
            return False
        with self._held_lock:
            full = self._held_rows + item.n > self.max_queue_rows
            if not full:
                self._held_rows += item.n
        if full or not self._thread.is_alive():
            self._drop_all(item.rows, "full", f"forkwatch: writer queue full ({self.max_queue_rows} rows); records dropped")
            return False
        self._q.put(item)
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Write everything queued so far. True when it all reached the disk within `timeout` seconds."""
        if not self._thread.is_alive():
            return False
        f = _Flush()
        self._q.put(f)
        return f.event.wait(timeout) and f.ok

    def alert(self, flag: Any) -> None:
        """Queue an alert for a health flag (store/health.py `Flag`): posted on the writer's thread, counted sent or
        failed; nothing happens without `alert_webhook` or on ranks > 0. Never blocks, never raises."""
        if self._alerts is not None and not self._closed:
            self._q.put(_Alert(flag))

    def update_meta(self, **fields: Any) -> None:
        """Merge fields into run.json (rank 0; other ranks record them in their rank-NNN.json). Only queued: the
        writer thread writes the file, after the records queued before this call."""
        if self._closed:
            return
        self._q.put(_Meta(dict(fields)))

    def close(self, status: str = "finished", timeout: float | None = 60.0) -> None:
        """Flush, record status, last step and dropped counts, stop the thread. Safe to call twice."""
        if self._closed:
            return
        ok = self.flush(timeout)
        self._closed = True
        self._q.put(_Stop(status))
        self._thread.join(timeout)
        if not ok or self._thread.is_alive():
            self._warn_once("close", "forkwatch: writer did not finish flushing at close; some records are lost")

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("failed" if exc_type is not None else "finished")

    # ---------------------------------------------------------------- run.json (its fields: store/run_meta.py)

    def _init_meta(self, meta: dict[str, Any], resume_step: int | None) -> None:
        previous = run_meta.read_run_json(self.location, self.run_id, run_meta.file_name(self.rank))
        self._meta = run_meta.start(previous, meta, run_id=self.run_id, rank=self.rank, world_size=self.world_size,
                                    resume_step=resume_step)
        self._write_meta()

    def _write_meta(self) -> None:
        path = self.location.path(self.run_id, run_meta.file_name(self.rank))
        data = run_meta.document(self._meta, rank=self.rank, dropped=self.dropped, faults=self.ledger.faults,
                                 alerts=self.ledger.alerts)
        try:  # overwritten whole: readers see the previous run.json or this one
            with_retries(lambda: self.location.put_whole(path, data), tries=self._tries)
        except Exception as e:
            self._warn_once("meta", f"forkwatch: cannot write {self.location.display(path)}: {e}")

    def _stop(self, status: str) -> None:
        self._write_all()
        failed = self.ledger.alerts.get("failed", 0)
        if failed:
            logger.warning("forkwatch: %d of %d alert(s) could not be sent to %s (counted in run.json: alerts)",
                           failed, failed + self.ledger.alerts.get("sent", 0), redact(self._alerts.url))
        self._meta.update(run_meta.closing(self._meta, status, self._last_step))
        self._write_meta()

    # ---------------------------------------------------------------- resume

    def _start(self, meta: dict[str, Any], resume_step: int | None) -> None:
        """The thread's first job: move superseded parts aside (on resume), then write run.json."""
        try:
            if self.location.is_local:
                os.makedirs(self.run_dir, exist_ok=True)
            if resume_step is not None:
                self._supersede_after(resume_step)
        except Exception as e:  # (a boundary) unwritable dir, unreadable old part: report; later writes drop too
            self._warn_once("setup", f"forkwatch: cannot prepare {self.location.display(self.run_dir)}: {e}; "
                                     "records will be dropped")
        self._init_meta(meta, resume_step)

    def _supersede_after(self, step: int) -> None:
        """Move this rank's parts holding steps > `step` to superseded/<attempt>/, so a resumed run does not
        duplicate the steps it re-runs. Rank 0 also moves parts of ranks >= world_size (a run resumed on fewer
        ranks). Nothing is deleted; a part mixing kept and superseded steps is split (kept rows rewritten)."""
        dest_root = self.location.path(self.run_id, run_folder.SUPERSEDED, self.attempt)
        moved = 0
        previous = run_meta.read_run_json(self.location, self.run_id)
        run_folder.check_layout(previous, self.location.display(self.run_dir))  # unknown layout: move nothing
        listing = run_folder.list_run(self.location, self.run_id)

        def mine(rank: int) -> bool:
            return rank == self.rank or (self.rank == 0 and rank >= self.world_size)

        for table in TABLES:
            if table == "vocab":
                continue  # not tied to a step: earlier tokens still need their text
            for info in listing.table_parts(table):
                m = run_folder.PART.match(info.base_name)
                span = run_folder.step_range(info.path)
                if m is None or span is None or not mine(int(m["rank"])):
                    continue
                first, last = span
                if last <= step:
                    continue
                dest = f"{dest_root}/{info.path[len(self.run_dir) + 1:]}"
                kept = None
                if first <= step:  # keep the rows <= step in a new part, after moving the original aside
                    t = pq.read_table(info.path, filesystem=self.location.fs)
                    kept = t.filter(pc.less_equal(t["step"], step))
                with_retries(lambda s=info.path, d=dest: self.location.move(s, d), tries=self._tries)
                if kept is not None:
                    self._write_part(table, kept, held=False)
                moved += 1
        if moved:
            logger.info("forkwatch: resume at step %d: moved %d part(s) to %s", step, moved,
                        self.location.display(dest_root))

    # ---------------------------------------------------------------- thread side

    def _loop(self, meta: dict[str, Any], resume_step: int | None) -> None:
        try:
            self._start(meta, resume_step)
        except Exception as e:  # the thread boundary
            self._warn_once("loop", f"forkwatch: writer error: {e!r}")
        deadline = time.monotonic() + self.flush_interval_s
        while True:
            try:
                item = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                item = None
            try:
                if isinstance(item, _Stop):
                    self._stop(item.status)
                    return
                if isinstance(item, _Meta):
                    self._meta.update(item.fields)
                    self._write_meta()
                elif isinstance(item, _Alert):
                    self._alerts.send(item.flag, self._meta.get("name"))
                    self._write_meta()
                elif isinstance(item, _Deferred):
                    self._run_producer(item)
                elif item is None or isinstance(item, _Flush):
                    ok = self._write_all()
                    deadline = time.monotonic() + self.flush_interval_s
                    if isinstance(item, _Flush):
                        item.ok = ok
                        item.event.set()
                else:
                    table, columns, n = item
                    self._absorb(table, columns, n)
                    if time.monotonic() >= deadline:  # a busy queue must not postpone the timed flush
                        self._write_all()
                        deadline = time.monotonic() + self.flush_interval_s
            except Exception as e:  # the thread boundary: nothing may escape into (or kill) the writer
                if isinstance(item, _Deferred):
                    self._drop_all(item.rows, "bad", f"forkwatch: {item.where} records dropped: {e!r}")
                elif isinstance(item, tuple):
                    self._drop(item[0], item[2], "bad", f"forkwatch: bad {item[0]} batch dropped: {e!r}")
                else:
                    self._warn_once("loop", f"forkwatch: writer error: {e!r}")
                if isinstance(item, _Flush):
                    item.ok = False
                    item.event.set()

    def _run_producer(self, item: _Deferred) -> None:
        batches = None
        with self.ledger.guard(item.where):
            batches = list(item.producer())
        self._release(item.n)  # from here on, the rows are held as what the producer made
        if batches is None:
            self._drop_all(item.rows, "producer", f"forkwatch: {item.where} producer failed; its records dropped")
            return
        for table, columns in batches:
            n = 0
            try:
                n = n_rows(columns)
                self._hold(n)
                self._absorb(table, columns, n)
            except Exception as e:  # one bad batch: drop it, keep the others
                self._drop(table, n, "bad", f"forkwatch: bad {table} batch dropped: {e!r}")

    def _absorb(self, table: str, columns: Mapping[str, Any], n: int) -> None:
        """Convert a held batch of n rows and buffer it; a part due is written (which releases its rows)."""
        try:
            t = to_arrow(table, columns, n, run_id=self.run_id, mantissa_bits=self.stat_mantissa_bits)
        except Exception:
            self._release(n)  # the caller counts the batch as dropped
            raise
        if t.num_rows == 0:
            self._release(n)
            return
        hi = pc.max(t["step"]).as_py()
        if hi is not None:
            self._last_step = hi if self._last_step is None else max(self._last_step, hi)
        for due in self._buffers.add(table, t):
            self._write_part(table, due)

    def _write_all(self) -> bool:
        """Write every buffered part. Once one part has failed after all its retries, the store is taken to be down
        for the rest of this flush: each remaining part is tried once (and dropped, counted, if that fails), so that
        a flush during an outage (a checkpoint's `flush(timeout=60)` waits for it) costs seconds, not the retries of
        every table in turn. The next flush retries in full again."""
        ok, self._upload_failed = True, False
        for table, t in self._buffers.take_all().items():
            ok &= self._write_part(table, t, tries=1 if self._upload_failed else self._tries)
        return ok

    def _write_part(self, table: str, t: pa.Table, *, held: bool = True, tries: int | None = None) -> bool:
        """Write `t` (sorted by step) as one part, whole or not at all, in up to `tries` attempts (default: the
        retries an object store gets); on failure count its rows as dropped. `held`: its rows count against the row
        cap until now."""
        self._seq += 1
        step_range = None
        if "step" in t.column_names and t.num_rows:
            lo, hi = pc.min(t["step"]).as_py(), pc.max(t["step"]).as_py()
            step_range = None if lo is None else (lo, hi)  # vocab rows may carry no step
        folder = self.location.path(self.run_id, table)
        path = f"{folder}/{run_folder.part_name(self.rank, self.attempt, self._seq, step_range)}"
        data = None
        try:
            data = part_file.encode_part(t, row_group_rows=self.row_group_rows)
            with_retries(lambda: self.location.put_whole(path, data), tries=self._tries if tries is None else tries)
            return True
        except Exception as e:  # disk full, permission, store down: drop this part, keep the caller running
            if data is not None:  # encoded, so the store refused it (not a bad batch)
                self._upload_failed = True
            self._drop(table, t.num_rows, "write",
                       f"forkwatch: cannot write {table} part in {self.location.display(folder)}: {e}")
            return False
        finally:
            if held:
                self._release(t.num_rows)

    # ---------------------------------------------------------------- accounting

    def _hold(self, n: int) -> None:
        with self._held_lock:
            self._held_rows += n

    def _release(self, n: int) -> None:
        with self._held_lock:
            self._held_rows -= n

    def _drop(self, table: str, n: int, kind: str, message: str) -> None:
        self.ledger.drop(table, n, kind, message)

    def _drop_all(self, rows: Mapping[str, int], kind: str, message: str) -> None:
        for table, n in rows.items():
            self.ledger.drop(table, n, kind, message)

    def _warn_once(self, key: str, message: str) -> None:
        self.ledger.warn_once(key, message)
