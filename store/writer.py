"""RunWriter: the training process hands it column batches; ONE background thread writes them as Parquet parts.

This thread is the only background thread forkwatch runs, and its queue the only queue between the plugin and the
disk. The training loop must never wait on the disk nor die because of it. `put` (a batch of numpy columns) and
`submit` (a deferred producer of such batches, e.g. the decoding of sampled completions) only check a row budget and
enqueue (O(1), no conversion); the thread runs the producers, converts to Arrow by the schema, buffers and writes.
The thread does numpy, Arrow and file work only, never torch: torch ops on a second thread start a second OpenMP
team that competes with the training thread's for the same cores. When the queue holds `max_queue_rows` rows, a
producer raises, or a write fails (unwritable folder, full disk), the records are dropped, counted per table in the
run's `Ledger` (store/ledger.py), logged once, and the counts go into run.json. Exceptions are caught at the thread
boundary only.

When parts are written (store/part_buffers.py has the policy): every table is buffered on the thread and written as
one part covering many steps when `part_rows` rows of it are buffered (a batch that big gets a part of its own),
every `flush_interval_s` seconds, on `flush()` and on `close()`. A killed run keeps every part written so far and
loses what was buffered: at most the last `flush_interval_s` seconds of records (default 30 s), and never more than
`part_rows` rows of a table. `flush()` writes everything buffered: call it at checkpoints and at the end, not every
step (that would make one part per step again, ~3 ms of writer time each).
Parts are renamed into place once complete; there is no fsync (a killed process cannot lose page-cache data; a power
loss can lose the last parts, never corrupt the view of the others, since readers skip files whose footer is bad).
Statistics rounding (`stat_mantissa_bits`): see store/arrow_columns.py.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import part_file, run_folder
from .arrow_columns import (
    DEFAULT_STAT_MANTISSA_BITS,
    check_mantissa_bits,
    n_rows,
    round_mantissa,
    stat_relative_tolerance,
    to_arrow,
)
from .ledger import Ledger
from .part_buffers import PartBuffers
from .schema import SCHEMA_VERSION, TABLES

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_QUEUE_ROWS", "DEFAULT_STAT_MANTISSA_BITS", "RunWriter", "round_mantissa", "stat_relative_tolerance"]
RANK_FIELDS = ("run_id", "rank", "status", "dropped", "faults", "updated_at", "last_step")  # rank-NNN.json


def _utcnow() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


class _Flush:
    __slots__ = ("event", "ok")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.ok = True


_STOP = object()
DEFAULT_QUEUE_ROWS = 4_000_000
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
        flush_interval_s: float = 30.0,
        stat_mantissa_bits: int | None = DEFAULT_STAT_MANTISSA_BITS,
        row_group_rows: int = 131_072,
        ledger: Ledger | None = None,
    ) -> None:
        run_folder.check_run_id(run_id)
        check_mantissa_bits(stat_mantissa_bits)
        self.log_dir = Path(log_dir)
        self.run_id = run_id
        self.run_dir = self.log_dir / run_id
        self.rank = rank
        self.world_size = world_size
        self.max_queue_rows = max_queue_rows
        self.part_rows = part_rows
        self.flush_interval_s = flush_interval_s
        self.stat_mantissa_bits = None if stat_mantissa_bits == 23 else stat_mantissa_bits
        self.row_group_rows = row_group_rows
        self.attempt = uuid.uuid4().hex[:8]

        self.ledger = ledger if ledger is not None else Ledger()
        self._queued_rows = 0  # rows in the queue, not yet taken by the thread (the bound of `put`)
        self._queued_lock = threading.Lock()
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._seq = 0
        self._last_step: int | None = None
        self._buffers = PartBuffers(list(TABLES), part_rows=part_rows)  # thread side only
        self._meta_lock = threading.Lock()
        self._meta: dict[str, Any] = {}

        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                self._supersede_after(resume_step)
        except Exception as e:  # (a boundary) unwritable dir, unreadable old part: report; later writes drop too
            self._warn_once("setup", f"forkwatch: cannot prepare {self.run_dir}: {e}; records will be dropped")
        self._init_meta(dict(meta or {}), resume_step)

        self._thread = threading.Thread(target=self._loop, name=f"forkwatch-writer-r{rank}", daemon=True)
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
        with self._queued_lock:
            full = self._queued_rows + n > self.max_queue_rows
            if not full:
                self._queued_rows += n
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
        with self._queued_lock:
            full = self._queued_rows + item.n > self.max_queue_rows
            if not full:
                self._queued_rows += item.n
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

    def update_meta(self, **fields: Any) -> None:
        """Merge fields into run.json (rank 0; other ranks record them in their rank-NNN.json)."""
        with self._meta_lock:
            self._meta.update(fields)
        self._write_meta()

    def close(self, status: str = "finished", timeout: float | None = 60.0) -> None:
        """Flush, stop the thread, and record status, last step and dropped counts. Safe to call twice."""
        if self._closed:
            return
        ok = self.flush(timeout)
        self._closed = True
        self._q.put(_STOP)
        self._thread.join(timeout)
        if not ok:
            self._warn_once("close", "forkwatch: writer did not finish flushing at close; some records are lost")
        fields: dict[str, Any] = {"status": status}
        if self._last_step is not None:
            prev = self._meta.get("last_step")
            fields["last_step"] = max(self._last_step, prev) if isinstance(prev, int) else self._last_step
        self.update_meta(**fields)

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("failed" if exc_type is not None else "finished")

    # ---------------------------------------------------------------- run.json

    def _init_meta(self, meta: dict[str, Any], resume_step: int | None) -> None:
        from forkwatch import __version__

        path = self.run_dir / (run_folder.RUN_JSON if self.rank == 0 else run_folder.rank_json(self.rank))
        previous: dict[str, Any] = {}
        if path.is_file():  # a resumed (or restarted) run keeps its creation time and earlier fields
            try:
                previous = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                logger.warning("forkwatch: ignoring unreadable %s: %s", path, e)
        base = {
            "run_id": self.run_id,
            "name": meta.pop("name", None) or previous.get("name") or self.run_id,
            "status": "running",
            "created_at": previous.get("created_at", _utcnow()),
            "schema_version": SCHEMA_VERSION,
            "forkwatch_version": __version__,
            "world_size": self.world_size,
            "rank": self.rank,
            run_folder.LAYOUT_KEY: run_folder.LAYOUT_VERSION,
        }
        if resume_step is not None:
            base["resumed_from_step"] = resume_step
            base["last_step"] = resume_step
        self._meta = {**previous, **base, **meta}
        self._write_meta()

    def _write_meta(self) -> None:
        with self._meta_lock:
            meta = dict(self._meta)
            meta["dropped"] = self.dropped
            meta["faults"] = self.ledger.faults
            meta["updated_at"] = _utcnow()
            if self.rank != 0:
                meta = {k: meta[k] for k in RANK_FIELDS if k in meta}
            path = self.run_dir / (run_folder.RUN_JSON if self.rank == 0 else run_folder.rank_json(self.rank))
            tmp = path.with_name(f".{path.name}.{self.attempt}.tmp")
            try:
                tmp.write_text(json.dumps(meta, indent=1, default=str))
                os.replace(tmp, path)
            except OSError as e:
                self._warn_once("meta", f"forkwatch: cannot write {path}: {e}")

    # ---------------------------------------------------------------- resume

    def _supersede_after(self, step: int) -> None:
        """Move this rank's parts holding steps > `step` to superseded/<attempt>/, so a resumed run does not
        duplicate the steps it re-runs. Rank 0 also moves parts of ranks >= world_size (a run resumed on fewer
        ranks). Nothing is deleted; a part mixing kept and superseded steps is split (kept rows rewritten)."""
        dest_root = self.run_dir / run_folder.SUPERSEDED / self.attempt
        moved = 0
        try:
            previous = json.loads((self.run_dir / run_folder.RUN_JSON).read_text())
        except (OSError, ValueError):  # no run.json yet, or unreadable (reported by _init_meta)
            previous = {}
        if isinstance(previous, dict):
            run_folder.check_layout(previous, self.run_dir)  # a layout we do not know: move nothing

        def mine(rank: int) -> bool:
            return rank == self.rank or (self.rank == 0 and rank >= self.world_size)

        for table in TABLES:
            if table == "vocab":
                continue  # not tied to a step: earlier tokens still need their text
            for part in run_folder.table_parts(self.run_dir, table):
                m = run_folder.PART.match(part.name)
                span = run_folder.step_range(part)
                if m is None or span is None or not mine(int(m["rank"])):
                    continue
                first, last = span
                if last <= step:
                    continue
                rel = part.relative_to(self.run_dir)
                dest = dest_root / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                if first <= step:  # keep the rows <= step in a new part, then move the original aside
                    t = pq.read_table(part)
                    kept = t.filter(pc.less_equal(t["step"], step))
                    self._write_part(table, kept, tmp_then=lambda p=part, d=dest: os.replace(p, d))
                else:
                    os.replace(part, dest)
                moved += 1
        if moved:
            logger.info("forkwatch: resume at step %d: moved %d part(s) to %s", step, moved, dest_root)

    # ---------------------------------------------------------------- thread side

    def _loop(self) -> None:
        deadline = time.monotonic() + self.flush_interval_s
        while True:
            try:
                item = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                item = None
            try:
                if item is _STOP:
                    self._write_all()
                    return
                if isinstance(item, _Deferred):
                    with self._queued_lock:
                        self._queued_rows -= item.n
                    self._run_producer(item)
                elif item is None or isinstance(item, _Flush):
                    ok = self._write_all()
                    deadline = time.monotonic() + self.flush_interval_s
                    if isinstance(item, _Flush):
                        item.ok = ok
                        item.event.set()
                else:
                    table, columns, n = item
                    with self._queued_lock:
                        self._queued_rows -= n
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
        if batches is None:
            self._drop_all(item.rows, "producer", f"forkwatch: {item.where} producer failed; its records dropped")
            return
        for table, columns in batches:
            try:
                self._absorb(table, columns, n_rows(columns))
            except Exception as e:  # one bad batch: drop it, keep the others
                self._drop(table, n_rows(columns), "bad", f"forkwatch: bad {table} batch dropped: {e!r}")

    def _absorb(self, table: str, columns: Mapping[str, Any], n: int) -> None:
        t = to_arrow(table, columns, n, run_id=self.run_id, mantissa_bits=self.stat_mantissa_bits)
        if t.num_rows == 0:
            return
        hi = pc.max(t["step"]).as_py()
        if hi is not None:
            self._last_step = hi if self._last_step is None else max(self._last_step, hi)
        for due in self._buffers.add(table, t):
            self._write_part(table, due)

    def _write_all(self) -> bool:
        ok = True
        for table, t in self._buffers.take_all().items():
            ok &= self._write_part(table, t)
        return ok

    def _write_part(self, table: str, t: pa.Table, *, tmp_then=None) -> bool:
        """Write `t` (sorted by step) as one part: temp name, then rename. On failure count its rows as dropped."""
        self._seq += 1
        step_range = None
        if "step" in t.column_names and t.num_rows:
            lo, hi = pc.min(t["step"]).as_py(), pc.max(t["step"]).as_py()
            step_range = None if lo is None else (lo, hi)  # vocab rows may carry no step
        folder = self.run_dir / table
        name = run_folder.part_name(self.rank, self.attempt, self._seq, step_range)
        tmp = folder / f".{name}.tmp"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            part_file.write_part_file(tmp, t, row_group_rows=self.row_group_rows)
            if tmp_then is not None:
                tmp_then()
            os.replace(tmp, folder / name)
            return True
        except Exception as e:  # disk full, permission, vanished folder: drop this part, keep the caller running
            self._drop(table, t.num_rows, "write", f"forkwatch: cannot write {table} part in {folder}: {e}")
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return False

    # ---------------------------------------------------------------- accounting

    def _drop(self, table: str, n: int, kind: str, message: str) -> None:
        self.ledger.drop(table, n, kind, message)

    def _drop_all(self, rows: Mapping[str, int], kind: str, message: str) -> None:
        for table, n in rows.items():
            self.ledger.drop(table, n, kind, message)

    def _warn_once(self, key: str, message: str) -> None:
        self.ledger.warn_once(key, message)
