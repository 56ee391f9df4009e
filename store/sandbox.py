"""A DuckDB connection for SQL a person typed (the dashboard's SQL page, `forkwatch sql`); docs/architecture.md, Security, explains the model.

Layers, each of which would stop most attacks alone:
1. File access. The views are created first (they name the part files), then, in the order DuckDB 2.0 requires:
   `allowed_paths` = exactly the validated part files (not the whole directory: `allowed_directories` would also let
   a statement write into LOG_DIR, and would admit files we never validated), `enable_external_access=false`
   (no other file, no URL, no ATTACH of a file), extension autoload/autoinstall off, Python replacement scans off
   (a query must not reach the caller's variables), no spill files (`temp_directory=''`), memory and thread limits,
   and finally `lock_configuration=true` so no statement can undo any of it. DuckDB resolves symlinks before
   checking, and the part list holds real paths inside LOG_DIR only (views.scan drops links pointing out).
   On S3 the parts are s3://bucket/key names, served by the log directory's own filesystem (views.attach_filesystem):
   the same allow-list admits those keys only; no other bucket, key or URL, and DuckDB holds no credentials (they
   stay in the pyarrow filesystem; DuckDB's secrets and httpfs are never used).
2. A statement guard: DuckDB's own parser splits the text; exactly one statement of type SELECT is admitted
   (no COPY/EXPORT, ATTACH, INSTALL/LOAD, SET/RESET, PRAGMA, CREATE, CALL, several statements ...).
3. A time limit: a timer thread interrupts the connection (`con.interrupt()`), and the rows returned are capped.
"""

from __future__ import annotations

import logging
import os
import threading

import duckdb
import pandas as pd
import pyarrow as pa

from .location import Location, resolve
from .views import Snapshot, create_views

logger = logging.getLogger(__name__)


class SandboxError(Exception):
    """A statement the sandbox refused or could not run. The message is one line, fit to show to the user."""


class StatementRefused(SandboxError):
    """The text is not exactly one read-only (SELECT) statement."""


class QueryFailed(SandboxError):
    """DuckDB rejected or failed the statement (syntax, unknown column, file access denied ...)."""


class QueryTimeout(SandboxError):
    """The statement ran past the time limit and was interrupted."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class SandboxedConnection:
    """The result of `open_sandboxed`. Run statements with `query` / `query_arrow`; the raw connection is not
    exposed, so every statement passes the guard and the time limit."""

    def __init__(self, con: duckdb.DuckDBPyConnection, snapshot: Snapshot, *, timeout_s: float, max_rows: int | None):
        self._con = con
        self.snapshot = snapshot
        self.timeout_s = timeout_s
        self.max_rows = max_rows
        self._lock = threading.Lock()  # one statement at a time: interrupt() targets the connection

    def check(self, sql: str) -> str:
        """Return the single statement in `sql` if it is a SELECT, else raise StatementRefused (or QueryFailed
        when it does not parse)."""
        try:
            statements = self._con.extract_statements(sql)
        except duckdb.Error as e:
            raise QueryFailed(_one_line(e)) from None
        if not statements:
            raise StatementRefused("refused: no SQL statement given")
        if len(statements) > 1:
            raise StatementRefused(f"refused: one statement at a time ({len(statements)} given)")
        kind = statements[0].type
        if kind != duckdb.StatementType.SELECT:
            raise StatementRefused(
                f"refused: only read-only SELECT statements are allowed (got {kind.name.replace('_', ' ')})"
            )
        return sql

    def query_arrow(self, sql: str, *, max_rows: int | None = None, timeout_s: float | None = None) -> pa.Table:
        """Run one SELECT; at most `max_rows` rows come back (table.schema.metadata[b'truncated'] says if cut)."""
        self.check(sql)
        limit = max_rows if max_rows is not None else self.max_rows
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        with self._lock:
            timer = threading.Timer(timeout, self._con.interrupt)
            timer.daemon = True
            timer.start()
            try:
                rel = self._con.sql(sql)
                if rel is None:  # not a query producing rows (the guard should have stopped it)
                    raise StatementRefused("refused: statement returns no rows")
                if limit is not None:
                    rel = rel.limit(limit + 1)
                table = rel.to_arrow_table()
            except SandboxError:
                raise
            except duckdb.InterruptException:
                raise QueryTimeout(f"query interrupted: it ran longer than the {timeout:g} s time limit") from None
            except duckdb.Error as e:
                if not timer.is_alive() and "interrupt" in str(e).lower():
                    raise QueryTimeout(f"query interrupted: it ran longer than the {timeout:g} s time limit") from None
                raise QueryFailed(_one_line(e)) from None
            finally:
                timer.cancel()
        truncated = limit is not None and table.num_rows > limit
        if truncated:
            table = table.slice(0, limit)
        return table.replace_schema_metadata(
            {**(table.schema.metadata or {}), b"truncated": b"1" if truncated else b"0"}
        )

    def query(self, sql: str, *, max_rows: int | None = None, timeout_s: float | None = None) -> pd.DataFrame:
        """Run one SELECT and return a DataFrame; `df.attrs['truncated']` says whether rows were cut at max_rows."""
        table = self.query_arrow(sql, max_rows=max_rows, timeout_s=timeout_s)
        df = table.to_pandas(maps_as_pydicts="lossy")  # MAP columns (rewards) as dicts, not tuple lists
        df.attrs["truncated"] = table.schema.metadata.get(b"truncated") == b"1"
        return df

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> SandboxedConnection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# The limits of a statement a person typed, for the CLI's `sql` and the dashboard's SQL page alike.
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_ROWS = 10_000


def open_sandboxed(
    log_dir: str | os.PathLike[str] | Location,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_rows: int | None = DEFAULT_MAX_ROWS,
    memory_limit: str = "1GB",
    threads: int = 2,
) -> SandboxedConnection:
    """A connection with the views over log_dir that reads only their part files and runs one SELECT at a time
    within `timeout_s` seconds. Raises FileNotFoundError when log_dir is not a directory (or its bucket does not
    exist)."""
    loc = resolve(log_dir)
    if not loc.exists():
        raise FileNotFoundError(f"no such directory: {log_dir}")
    con = duckdb.connect(":memory:")
    try:
        snap = create_views(con, loc)
        paths = [p for parts in snap.parts.values() for p in parts]
        # Order matters: the allow-list before external access goes off, everything before the lock.
        con.execute("SET temp_directory = ''")  # no spill files; DuckDB refuses this once external access is off
        con.execute("SET allowed_paths = ?", [paths])
        con.execute("SET enable_external_access = false")
        for setting in (
            "SET autoinstall_known_extensions = false",
            "SET autoload_known_extensions = false",
            "SET allow_community_extensions = false",
            "SET python_enable_replacements = false",
        ):
            con.execute(setting)
        con.execute("SET memory_limit = ?", [memory_limit])
        con.execute("SET threads = ?", [threads])
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return SandboxedConnection(con, snap, timeout_s=timeout_s, max_rows=max_rows)
