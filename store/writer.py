"""RunWriter: the training process hands it column batches; a background thread writes them as Parquet parts.

The training loop must never wait on the disk nor die because of it. `put` only checks a row budget and enqueues
(O(1), no conversion); the thread converts, buffers and writes. When the queue holds `max_queue_rows` rows, or a write
fails (unwritable folder, full disk), the records are dropped, counted per table, logged once, and the counts go into
run.json. Exceptions are caught at the thread boundary only (STYLE.md 8).

When parts are written (the trade-off between crash safety and file count):
- tokens and forks go to `step=NNNNNN/` folders; a step's rows are written as soon as a later step arrives (so a
  killed run loses at most the step in progress), or when `part_rows` rows of one step are buffered.
- steps, completions and vocab are small: they are buffered and written every `flush_interval_s` seconds, when
  `part_rows` rows are buffered, or on `flush()`/`close()`, so a long run makes a few hundred parts, not one per step.
  A killed run keeps everything written so far: at most `flush_interval_s` seconds of small-table rows are lost.
- `flush()` writes everything buffered. Call it at checkpoints and at the end, not every step (that would make one
  tiny part per step).
Parts are renamed into place once complete; there is no fsync (a killed process cannot lose page-cache data; a power
loss can lose the last parts, never corrupt the view of the others, since readers skip files whose footer is bad).

Statistics precision: the float32 token statistics (schema.ROUNDED_STATS) are rounded to `stat_mantissa_bits`
mantissa bits (round half to even). The default, 10 bits, bounds the relative error by 2**-11 (4.9e-4): at least 3
significant decimal digits. The low bits become zeros, which BYTE_STREAM_SPLIT + zstd store almost for free; this is
what brings a token row to ~12 bytes. `stat_mantissa_bits=None` (or 23) keeps exact float32.
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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import layout
from .schema import PARTITIONED_BY_STEP, ROUNDED_STATS, SCHEMA_VERSION, TABLES, VERSION_KEY

logger = logging.getLogger(__name__)

DEFAULT_STAT_MANTISSA_BITS = 10


def stat_relative_tolerance(mantissa_bits: int | None = DEFAULT_STAT_MANTISSA_BITS) -> float:
    """Largest relative error the rounding of `mantissa_bits` introduces (0 when not rounding)."""
    if mantissa_bits is None or mantissa_bits >= 23:
        return 0.0
    return 2.0 ** -(mantissa_bits + 1)


def round_mantissa(values: np.ndarray, mantissa_bits: int) -> np.ndarray:
    """Round float32 values to `mantissa_bits` explicit mantissa bits, half to even; inf and nan pass unchanged."""
    drop = 23 - mantissa_bits
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    half = np.uint32((1 << (drop - 1)) - 1)
    odd = (bits >> np.uint32(drop)) & np.uint32(1)
    rounded = (bits + half + odd) & np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
    finite = (bits & np.uint32(0x7F800000)) != np.uint32(0x7F800000)
    # A carry into the exponent is the correct rounding (e.g. 1.99999 -> 2.0); only the largest finite values
    # could round to inf, and those are kept as they are.
    overflow = (rounded & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    return np.where(finite & ~overflow, rounded, bits).view(np.float32)


_PARQUET_OPTIONS: dict[str, Any] = dict(
    compression="zstd",
    compression_level=3,
    write_statistics=True,
    # run_id, step and the method names repeat on every row: dictionary + RLE makes them nearly free.
    use_dictionary=["run_id", "step", "select_method", "prompt", "rewards.key_value.key"],
)
# Positions count up and completion ids repeat: deltas make both almost free (0.23 -> 0.03 B/row for position).
_DELTA = {"position": "DELTA_BINARY_PACKED", "completion_id": "DELTA_BINARY_PACKED"}
# Floats (and the Zipf-distributed token ids) compress far better split into byte streams: the high bytes (sign,
# exponent) repeat, the rounded-off low mantissa bytes are zeros. Integer BYTE_STREAM_SPLIT needs pyarrow >= 17.
_BSS_INTS = ("token_id",) if int(pa.__version__.split(".")[0]) >= 17 else ()


def _utcnow() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


class _Flush:
    __slots__ = ("event", "ok")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.ok = True


_STOP = object()


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
        max_queue_rows: int = 4_000_000,
        part_rows: int = 2_000_000,
        flush_interval_s: float = 30.0,
        stat_mantissa_bits: int | None = DEFAULT_STAT_MANTISSA_BITS,
        row_group_rows: int = 131_072,
    ) -> None:
        if not run_id or "/" in run_id or run_id.startswith(".") or "\\" in run_id:
            raise ValueError(f"run_id {run_id!r} must be a plain folder name (no '/', not starting with '.')")
        if stat_mantissa_bits is not None and not 1 <= stat_mantissa_bits <= 23:
            raise ValueError(f"stat_mantissa_bits={stat_mantissa_bits} must be in 1..23, or None for exact float32")
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

        self._dropped: dict[str, int] = {t: 0 for t in TABLES}
        self._dropped_lock = threading.Lock()
        self._warned: set[str] = set()
        self._queued_rows = 0  # rows in the queue, not yet taken by the thread (the bound of `put`)
        self._queued_lock = threading.Lock()
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._seq = 0
        self._last_step: int | None = None
        # Thread-side buffers: partitioned tables by step, the others as one list per table.
        self._by_step: dict[str, dict[int, list[pa.Table]]] = {t: {} for t in PARTITIONED_BY_STEP}
        self._batched: dict[str, list[pa.Table]] = {t: [] for t in TABLES if t not in PARTITIONED_BY_STEP}
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
        with self._dropped_lock:
            return dict(self._dropped)

    def put(self, table: str, columns: Mapping[str, Any]) -> bool:
        """Queue one batch of rows of `table` (every schema column but run_id). Returns False when it was dropped.

        The writer takes ownership of the arrays: do not modify them afterwards."""
        try:
            n = _n_rows(columns)
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

        path = self.run_dir / (layout.RUN_JSON if self.rank == 0 else layout.rank_json(self.rank))
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
            meta["updated_at"] = _utcnow()
            if self.rank != 0:
                meta = {
                    k: meta[k] for k in ("run_id", "rank", "status", "dropped", "updated_at", "last_step") if k in meta
                }
            path = self.run_dir / (layout.RUN_JSON if self.rank == 0 else layout.rank_json(self.rank))
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
        dest_root = self.run_dir / layout.SUPERSEDED / self.attempt
        moved = 0

        def mine(rank: int) -> bool:
            return rank == self.rank or (self.rank == 0 and rank >= self.world_size)

        for table in TABLES:
            partitioned = table in PARTITIONED_BY_STEP
            for part in layout.table_parts(self.run_dir, table, partitioned):
                m = layout.PART.match(part.name)
                assert m is not None
                if not mine(int(m["rank"])):
                    continue
                if partitioned:
                    first = last = int(layout.STEP_DIR.match(part.parent.name)[1])  # type: ignore[index]
                elif table != "vocab" and m["first"] is not None:
                    first, last = int(m["first"]), int(m["last"])
                else:
                    continue  # vocab: not tied to a step
                if last <= step:
                    continue
                rel = part.relative_to(self.run_dir)
                dest = dest_root / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                if first <= step:  # keep the rows <= step in a new part, then move the original aside
                    t = pq.read_table(part)
                    kept = t.filter(pa.compute.less_equal(t["step"], step))
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
                if item is None or isinstance(item, _Flush):
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
            except Exception as e:  # the thread boundary: nothing may escape into (or kill) the writer
                if isinstance(item, tuple):
                    self._drop(item[0], item[2], "bad", f"forkwatch: bad {item[0]} batch dropped: {e!r}")
                else:
                    self._warn_once("loop", f"forkwatch: writer error: {e!r}")
                if isinstance(item, _Flush):
                    item.ok = False
                    item.event.set()

    def _absorb(self, table: str, columns: Mapping[str, Any], n: int) -> None:
        t = self._to_arrow(table, columns, n)
        if t.num_rows == 0:
            return
        steps = t["step"]
        hi = pa.compute.max(steps).as_py()
        self._last_step = hi if self._last_step is None else max(self._last_step, hi)
        if table in PARTITIONED_BY_STEP:
            buf = self._by_step[table]
            lo = pa.compute.min(steps).as_py()
            if lo == hi:
                buf.setdefault(lo, []).append(t)
            else:
                for s in np.unique(steps.to_numpy()):
                    buf.setdefault(int(s), []).append(t.filter(pa.compute.equal(steps, s)))
            # A later step arrived: the earlier ones are complete on this rank, write them now (crash safety).
            for s in sorted(buf):
                rows = sum(x.num_rows for x in buf[s])
                if s < hi or rows >= self.part_rows:
                    self._write_step(table, s)
        else:
            self._batched[table].append(t)
            if sum(x.num_rows for x in self._batched[table]) >= self.part_rows:
                self._write_batched(table)

    def _to_arrow(self, table: str, columns: Mapping[str, Any], n: int) -> pa.Table:
        schema = TABLES[table]
        unknown = set(columns) - set(schema.names)
        if unknown:
            raise ValueError(f"unknown column(s) {sorted(unknown)} for table {table}")
        arrays = []
        for field in schema:
            if field.name == "run_id":
                arrays.append(pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([self.run_id])))
                continue
            value = columns.get(field.name)
            if value is None:
                arrays.append(pa.nulls(n, field.type))
                continue
            if field.name == "step" and np.isscalar(value):
                value = np.full(n, value, np.int32)
            if isinstance(value, pa.ChunkedArray):
                value = value.combine_chunks()
            if not isinstance(value, pa.Array):
                if isinstance(value, np.ndarray) and pa.types.is_float32(field.type):
                    value = value.astype(np.float32, copy=False)
                if (
                    self.stat_mantissa_bits is not None
                    and field.name in ROUNDED_STATS.get(table, ())
                    and isinstance(value, np.ndarray)
                ):
                    value = round_mantissa(value, self.stat_mantissa_bits)
                value = pa.array(value, type=field.type)
            elif field.name in ROUNDED_STATS.get(table, ()) and self.stat_mantissa_bits is not None:
                mask = value.is_null()
                rounded = round_mantissa(
                    value.cast(pa.float32()).to_numpy(zero_copy_only=False), self.stat_mantissa_bits
                )
                value = pa.array(rounded, type=pa.float32(), mask=mask.to_numpy(zero_copy_only=False))
            if value.type != field.type:
                value = value.cast(field.type)
            if len(value) != n:
                raise ValueError(f"column {field.name} has {len(value)} rows, expected {n}")
            arrays.append(value)
        return pa.Table.from_arrays(arrays, schema=schema)

    def _write_all(self) -> bool:
        ok = True
        for table, buf in self._by_step.items():
            for s in sorted(buf):
                ok &= self._write_step(table, s)
        for table in self._batched:
            ok &= self._write_batched(table)
        return ok

    def _write_step(self, table: str, step: int) -> bool:
        parts = self._by_step[table].pop(step, [])
        if not parts:
            return True
        t = pa.concat_tables(parts)
        if "completion_id" in t.column_names:  # so row-group statistics narrow a lookup of one completion
            cid = t["completion_id"].to_numpy()
            if len(cid) > 1 and np.any(cid[1:] < cid[:-1]):
                t = t.sort_by([("completion_id", "ascending"), ("position", "ascending")])
        return self._write_part(table, t, step_dir=layout.step_dir(step))

    def _write_batched(self, table: str) -> bool:
        parts, self._batched[table] = self._batched[table], []
        if not parts:
            return True
        t = pa.concat_tables(parts)
        if "step" in t.column_names:
            t = t.sort_by([("step", "ascending")])
        return self._write_part(table, t)

    def _write_part(self, table: str, t: pa.Table, *, step_dir: str | None = None, tmp_then=None) -> bool:
        """Write `t` as one part (temp name, then rename). On failure count its rows as dropped and go on."""
        self._seq += 1
        step_range = None
        if step_dir is None and "step" in t.column_names and t.num_rows:
            lo, hi = pa.compute.min(t["step"]).as_py(), pa.compute.max(t["step"]).as_py()
            step_range = None if lo is None else (lo, hi)  # vocab rows may carry no step
        folder = self.run_dir / table / step_dir if step_dir else self.run_dir / table
        name = layout.part_name(self.rank, self.attempt, self._seq, step_range)
        tmp = folder / f".{name}.tmp"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            schema = t.schema.with_metadata({**(t.schema.metadata or {}), VERSION_KEY: str(SCHEMA_VERSION).encode()})
            encodings = {
                **{
                    f.name: "BYTE_STREAM_SPLIT" for f in t.schema if pa.types.is_floating(f.type) or f.name in _BSS_INTS
                },
                **{k: v for k, v in _DELTA.items() if k in t.column_names},
            }
            pq.write_table(
                t.replace_schema_metadata(schema.metadata),
                tmp,
                row_group_size=self.row_group_rows,
                column_encoding=encodings,
                **_PARQUET_OPTIONS,
            )
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
        with self._dropped_lock:
            self._dropped[table] = self._dropped.get(table, 0) + n
        self._warn_once(f"drop:{kind}", message)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("%s (further such messages suppressed; counts go to run.json)", message)


def _n_rows(columns: Mapping[str, Any]) -> int:
    for name, value in columns.items():
        if name != "step" or not np.isscalar(value):
            try:
                return len(value)
            except TypeError:
                continue
    return 0
