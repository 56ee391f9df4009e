"""DuckDB views over a log directory (`VIEWS`: runs, the tables of the schema, token_text and truth).

Views are built over an explicit list of validated part files rather than a glob, for three reasons:
- a truncated or corrupt part (a crash, a full disk, a copy in progress) would make DuckDB fail the whole glob; here
  each part's footer is read once (cheap, cached by path, size and mtime) and a bad part is skipped with a warning
  naming the file;
- a part written by an unreadable schema version is skipped with a warning naming the version found and the
  versions supported (reading it directly with `read_part` raises instead);
- the list is a snapshot: a reader sees whole parts only, however fast a writer appends. `refresh_views` (or a new
  `connect`) picks up parts written since.
Every view exists even when its table has no part yet (empty, with the schema's columns), so a page or query on a
fresh run returns no rows instead of failing. `step` is a real INTEGER column of every part (no hive partitioning):
parts are sorted by step with row groups aligned to steps (store/part_file.py), so a filter on `step` decodes only the
row groups holding that step, skipping the others by their min/max statistics (each part's footer is read).
A run laid out in a way this forkwatch does not know (store/run_folder.py, layout versions) is skipped with a warning
saying so; its `runs` row stays.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import ground_truth, run_folder
from .location import Location, fsspec_filesystem, resolve
from .schema import RUNS, TABLES, VERSION_KEY, SchemaVersionError, check_version

logger = logging.getLogger(__name__)

VIEWS = ("runs", *TABLES, "token_text", ground_truth.TRUTH_VIEW)  # every view `connect` makes: the one list

# path -> (size, mtime_ns, column names or None when the part is unusable)
_footer_cache: dict[str, tuple[int, int, frozenset[str] | None]] = {}
_FOOTER_CACHE_MAX = 200_000


@dataclass
class Snapshot:
    """What a set of views was built from: the readable parts per table (as DuckDB opens them: real local paths,
    or s3://bucket/key) and the parts skipped, with why."""

    location: Location
    parts: dict[str, list[str]] = field(default_factory=dict)
    columns: dict[str, set[str]] = field(default_factory=dict)  # columns present in at least one part
    uniform: dict[str, bool] = field(default_factory=dict)  # every part has the same columns
    skipped: list[tuple[str, str]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def log_dir(self) -> str:
        return self.location.url


def read_part(path: str | os.PathLike[str], location: Location | None = None) -> pa.Table:
    """Read one part, refusing (SchemaVersionError) a part written by a schema version this forkwatch can't read.
    `path` is local, or a path on `location`'s filesystem."""
    fs = location.fs if location is not None else None
    meta = pq.read_metadata(path, filesystem=fs).metadata or {}
    check_version(meta.get(VERSION_KEY, b"").decode() or None, str(path))
    return pq.read_table(path, filesystem=fs)


def _part_columns(loc: Location, info: pafs.FileInfo) -> tuple[str, frozenset[str]] | None:
    """The path DuckDB opens and the column names of a usable part, or None (after a warning naming the file) when
    it must be skipped. Footers are cached by path, size and modification time (one read per new part)."""
    shown = loc.display(info.path)
    try:
        if loc.is_local:
            real = os.path.realpath(info.path)
            if not Path(real).is_relative_to(loc.root):  # a symlink pointing out of the log directory
                raise ValueError(f"points outside the log directory (to {real})")
            st = os.stat(real)
            key, size, mtime = real, st.st_size, st.st_mtime_ns
        else:  # the listing's size and time: no request per part on S3
            key, size, mtime = shown, int(info.size or 0), int(info.mtime_ns or 0)
        cached = _footer_cache.get(key)
        if cached is not None and cached[:2] == (size, mtime):
            return (key, cached[2]) if cached[2] is not None else None
        try:
            meta = pq.read_metadata(key if loc.is_local else info.path, filesystem=loc.fs)  # the footer only
            check_version((meta.metadata or {}).get(VERSION_KEY, b"").decode() or None, shown)
            cols: frozenset[str] | None = frozenset(meta.schema.to_arrow_schema().names)
        except SchemaVersionError as e:
            logger.warning("forkwatch: skipping part: %s", e)
            cols = None
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError for truncated or garbled files
            logger.warning("forkwatch: skipping unreadable part %s: %s", shown, e)
            cols = None
        if len(_footer_cache) >= _FOOTER_CACHE_MAX:
            _footer_cache.clear()
        _footer_cache[key] = (size, mtime, cols)
        return (key, cols) if cols is not None else None
    except (OSError, ValueError) as e:
        logger.warning("forkwatch: skipping part %s: %s", shown, e)
        return None


def scan(log_dir: str | os.PathLike[str] | Location) -> Snapshot:
    """Find and validate the parts and run.json files under log_dir (one listing of the whole log directory)."""
    loc = resolve(log_dir)
    snap = Snapshot(loc)
    for table in TABLES:
        snap.parts[table], snap.columns[table] = [], set()
    col_sets: dict[str, set[frozenset[str]]] = {t: set() for t in TABLES}
    for listing in run_folder.list_runs(loc):
        record, meta = _run_record(listing)
        snap.runs.append(record)
        for table in TABLES:
            try:
                run_folder.check_layout(meta, loc.display(loc.path(listing.run_id, run_folder.RUN_JSON)))
                found = listing.table_parts(table)
            except run_folder.LayoutError as e:
                logger.warning("forkwatch: skipping %s of run %s: %s", table, listing.run_id, e)
                snap.skipped.append((loc.display(loc.path(listing.run_id, table)), "unknown layout"))
                continue
            for info in found:
                usable = _part_columns(loc, info)
                if usable is None:
                    snap.skipped.append((loc.display(info.path), "unreadable"))
                    continue
                path, cols = usable
                snap.parts[table].append(path)
                snap.columns[table] |= cols
                col_sets[table].add(cols)
    snap.uniform = {t: len(s) <= 1 for t, s in col_sets.items()}
    return snap


def _run_record(listing: run_folder.RunListing) -> tuple[dict[str, Any], dict[str, Any]]:
    """The `runs` row of a run, and its run.json as read (empty when missing or unreadable)."""
    loc, run_id = listing.location, listing.run_id
    meta = run_folder.read_run_json(loc, run_id) if run_folder.RUN_JSON in listing.files else {}
    path = loc.display(loc.path(run_id, run_folder.RUN_JSON))
    if "schema_version" in meta:
        try:
            check_version(meta["schema_version"], path)
        except SchemaVersionError as e:
            logger.warning("forkwatch: %s", e)
    dropped = _dropped_total(meta.get("dropped"))
    # faults per rank: each rank's own file, or what rank 0 last gathered from it (a rank that died before writing
    # its file is still counted), whichever saw more
    gathered = meta.get("faults_by_rank") if isinstance(meta.get("faults_by_rank"), dict) else {}
    faults = {int(r): _counts(c) for r, c in gathered.items() if str(r).isdigit()}
    faults[0] = _max_counts(faults.get(0, {}), _counts(meta.get("faults")))
    for rank, _ in listing.rank_files():
        rank_meta = run_folder.read_run_json(loc, run_id, run_folder.rank_json(rank))
        dropped += _dropped_total(rank_meta.get("dropped"))
        faults[rank] = _max_counts(faults.get(rank, {}), _counts(rank_meta.get("faults")))

    def _int(key: str) -> int | None:
        v = meta.get(key)
        return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    def _str(key: str) -> str | None:
        v = meta.get(key)
        return None if v is None else str(v)

    return {
        "run_id": run_id,
        "name": _str("name") or run_id,
        "status": _str("status") or "unknown",
        "created_at": _str("created_at"),
        "updated_at": _str("updated_at"),
        "schema_version": _int("schema_version"),
        "forkwatch_version": _str("forkwatch_version"),
        "trl_version": _str("trl_version"),
        "model": _str("model"),
        "world_size": _int("world_size"),
        "last_step": _int("last_step"),
        "resumed_from_step": _int("resumed_from_step"),
        "dropped": dropped,
        "faults": sum(sum(c.values()) for c in faults.values()),
        "faults_detail": fault_detail(faults),
        "meta": json.dumps(meta, default=str),
    }, meta


def _counts(d: Any) -> dict[str, int]:
    """A {place: count} mapping from run.json, ignoring anything else found there."""
    if not isinstance(d, dict):
        return {}
    return {str(k): int(v) for k, v in d.items() if isinstance(v, int | float) and not isinstance(v, bool) and v}


def _max_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: max(a.get(k, 0), b.get(k, 0)) for k in {**a, **b}}


def fault_detail(by_rank: dict[int, dict[str, int]]) -> str:
    """"rank 0: step_end 2, log 1; rank 1: records 1" (ranks without faults left out; '' when none)."""
    return "; ".join(f"rank {r}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
                     for r, c in sorted(by_rank.items()) if c)


def _dropped_total(d: Any) -> int:
    if isinstance(d, dict):
        return sum(int(v) for v in d.values() if isinstance(v, int | float))
    return 0


def duckdb_type(t: pa.DataType) -> str:
    """The DuckDB type a column of Arrow type `t` reads as (for the empty views and missing columns)."""
    if pa.types.is_dictionary(t):
        return duckdb_type(t.value_type)
    if pa.types.is_map(t):
        return f"MAP({duckdb_type(t.key_type)}, {duckdb_type(t.item_type)})"
    if pa.types.is_list(t):
        return f"{duckdb_type(t.value_type)}[]"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    simple = {
        pa.bool_(): "BOOLEAN",
        pa.int8(): "TINYINT",
        pa.int16(): "SMALLINT",
        pa.int32(): "INTEGER",
        pa.int64(): "BIGINT",
        pa.float32(): "FLOAT",
        pa.float64(): "DOUBLE",
        pa.string(): "VARCHAR",
        pa.large_string(): "VARCHAR",
    }
    if t in simple:
        return simple[t]
    raise TypeError(f"no DuckDB type for Arrow type {t}")


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _table_view_sql(table: str, snap: Snapshot) -> str:
    schema = TABLES[table]
    parts = snap.parts[table]
    if not parts:
        cols = ", ".join(f"CAST(NULL AS {duckdb_type(f.type)}) AS {f.name}" for f in schema)
        return f"SELECT {cols} WHERE false"
    present = snap.columns[table]
    # Columns a part of an older schema version lacks read as NULL (union_by_name); when all parts agree, the
    # cheaper plain read is used, which only opens the first footer at bind time.
    cols = ", ".join(
        f.name if f.name in present else f"CAST(NULL AS {duckdb_type(f.type)}) AS {f.name}" for f in schema
    )
    files = ", ".join(_sql_str(p) for p in parts)
    # No hive partitioning: `step` is a column of every part (layout 1's step=NNNNNN folders hold it too).
    opts = ["binary_as_string=true", "hive_partitioning=false"]
    if not snap.uniform[table]:
        opts.append("union_by_name=true")
    return f"SELECT {cols} FROM read_parquet([{files}], {', '.join(opts)})"


def create_views(con: duckdb.DuckDBPyConnection, log_dir: str | os.PathLike[str] | Location) -> Snapshot:
    """(Re)create every view on `con` from the parts now under log_dir; returns what they were built from."""
    snap = scan(log_dir)
    attach_filesystem(con, snap.location)
    for table in TABLES:
        body = _table_view_sql(table, snap)
        if table == "vocab":  # ranks and resumed attempts each write the vocabulary they saw: one row per token
            body = f"SELECT DISTINCT ON (run_id, token_id) * FROM ({body})"
        con.execute(f"CREATE OR REPLACE VIEW {table} AS {body}")
    runs = pa.Table.from_pylist(snap.runs, schema=_runs_load_schema())
    con.execute("DROP TABLE IF EXISTS _forkwatch_runs")
    con.from_arrow(runs).create("_forkwatch_runs")
    casts = ", ".join(
        f"CAST({f.name} AS {duckdb_type(f.type)}) AS {f.name}" if pa.types.is_timestamp(f.type) else f.name
        for f in RUNS
    )
    con.execute(f"CREATE OR REPLACE VIEW runs AS SELECT {casts} FROM _forkwatch_runs ORDER BY run_id")
    con.execute(
        "CREATE OR REPLACE VIEW token_text AS "
        "SELECT t.*, v.text, v.role FROM tokens t LEFT JOIN vocab v ON v.run_id = t.run_id AND v.token_id = t.token_id"
    )
    # Optional ground truth written by a task that knows its decision points (store/ground_truth.py).
    snap.parts[ground_truth.TRUTH_VIEW] = ground_truth.truth_parts(snap.location)
    con.execute(f"CREATE OR REPLACE VIEW {ground_truth.TRUTH_VIEW} AS "
                f"{ground_truth.truth_view_sql(snap.parts[ground_truth.TRUTH_VIEW])}")
    return snap


def attach_filesystem(con: duckdb.DuckDBPyConnection, loc: Location) -> None:
    """Let DuckDB open s3:// parts through the Location's pyarrow filesystem (DuckDB's httpfs extension is not used:
    it is a download, and it would find credentials its own way). Registered once per connection, seen by every
    cursor of it; it serves only the paths the views name (and, in the sandbox, nothing else: allowed_paths)."""
    if loc.is_local or "s3" in con.list_filesystems():
        return
    con.register_filesystem(fsspec_filesystem(loc))


def _runs_load_schema() -> pa.Schema:
    # Timestamps arrive as ISO strings in run.json; DuckDB parses them in the view.
    return pa.schema([pa.field(f.name, pa.string()) if pa.types.is_timestamp(f.type) else f for f in RUNS])


def connect(log_dir: str | os.PathLike[str] | Location) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views of `VIEWS`.

    The views are a snapshot of the parts present now; call `refresh_views(con, log_dir)` to see newer ones."""
    con = duckdb.connect(":memory:")
    # A query on one step reads the footer of every part of the table (row-group statistics live there); parts
    # are immutable once renamed into place, so keeping parsed footers between queries is safe and makes the
    # footer reads of a one-step lookup nearly free (DuckDB checks each file's modification time).
    con.execute("SET parquet_metadata_cache = true")
    create_views(con, log_dir)
    return con


def refresh_views(con: duckdb.DuckDBPyConnection, log_dir: str | os.PathLike[str] | Location) -> Snapshot:
    """Rebuild the views of a `connect` connection to include parts written since (not for sandboxed ones)."""
    return create_views(con, log_dir)
