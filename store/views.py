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
saying so; its `runs` row stays. The `runs` view is one row per run folder, built by store/run_meta.py from run.json
and the ranks' files, with the token rows its parts' footers count.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import ground_truth, run_folder, run_meta
from .location import Location, fsspec_filesystem, resolve
from .schema import RUNS, TABLES, VERSION_KEY, SchemaVersionError, check_version, duckdb_type

logger = logging.getLogger(__name__)

VIEWS = ("runs", *TABLES, "token_text", ground_truth.TRUTH_VIEW)  # every view `connect` makes: the one list

# path -> (size, mtime_ns, column names or None when the part is unusable, rows)
_footer_cache: dict[str, tuple[int, int, frozenset[str] | None, int]] = {}
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
    folders: list[run_folder.RunListing] = field(default_factory=list)  # the log directory's one listing
    runs: list[dict[str, object]] = field(default_factory=list)  # the `runs` rows (store/run_meta.py)

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


def _part_columns(loc: Location, info: pafs.FileInfo) -> tuple[str, frozenset[str], int] | None:
    """The path DuckDB opens, the column names and the row count of a usable part, or None (after a warning naming
    the file) when it must be skipped. Footers are cached by path, size and modification time (one read per new
    part)."""
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
            return (key, cached[2], cached[3]) if cached[2] is not None else None
        rows = 0
        try:
            meta = pq.read_metadata(key if loc.is_local else info.path, filesystem=loc.fs)  # the footer only
            check_version((meta.metadata or {}).get(VERSION_KEY, b"").decode() or None, shown)
            cols: frozenset[str] | None = frozenset(meta.schema.to_arrow_schema().names)
            rows = meta.num_rows
        except SchemaVersionError as e:
            logger.warning("forkwatch: skipping part: %s", e)
            cols = None
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError for truncated or garbled files
            logger.warning("forkwatch: skipping unreadable part %s: %s", shown, e)
            cols = None
        if len(_footer_cache) >= _FOOTER_CACHE_MAX:
            _footer_cache.clear()
        _footer_cache[key] = (size, mtime, cols, rows)
        return (key, cols, rows) if cols is not None else None
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
    snap.folders = run_folder.list_run_folders(loc)
    for listing in snap.folders:
        meta = run_meta.read_run_json(loc, listing.run_id) if run_folder.RUN_JSON in listing.files else {}
        recorded_tokens = 0
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
                path, cols, rows = usable
                snap.parts[table].append(path)
                snap.columns[table] |= cols
                col_sets[table].add(cols)
                if table == "tokens":
                    recorded_tokens += rows
        snap.runs.append(run_meta.runs_row(listing, meta, recorded_tokens=recorded_tokens))
    snap.uniform = {t: len(s) <= 1 for t, s in col_sets.items()}
    return snap


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
    snap.parts[ground_truth.TRUTH_VIEW] = ground_truth.create_view(con, snap.folders)
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
