"""The pages' only way to the store: one cached connection per log directory, ONE bounded cache over the store's
named queries (`cached`), and the SQL page's sandbox.

A page asks for a query by its name in store/queries.py (or store/ground_truth.py for the demo's ground truth,
store/fork_values.py for fork value), with every input as an argument, the log directory included:
`cached("step_series", log_dir, run_id)`. So a cached result never answers for another directory, run, step or
option, and no page builds SQL. The connection's views are a snapshot of the parts on disk: it is rebuilt every
`TTL_S` seconds (and on "Reload"), so a run still being written shows its new steps without a restart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import duckdb
import pandas as pd
import streamlit as st
from forkwatch.store import connect, fork_values, ground_truth, queries
from forkwatch.store.location import LOG_DIR_ENV
from forkwatch.store.sandbox import SandboxedConnection, SandboxError, open_sandboxed

TTL_S = 15  # seconds a snapshot (and a query result) is reused: new steps of a live run appear within this
# Where named queries live: each module's __all__ lists them.
_QUERY_MODULES = (queries, ground_truth, fork_values)


def log_dir() -> str | None:
    return os.environ.get(LOG_DIR_ENV) or None


@st.cache_resource(ttl=TTL_S, max_entries=4, show_spinner=False)
def _connection(log_dir: str) -> duckdb.DuckDBPyConnection:
    return connect(log_dir)


def _named(query: str) -> Any:
    for module in _QUERY_MODULES:
        if query in module.__all__:
            return getattr(module, query)
    names = sorted(n for m in _QUERY_MODULES for n in m.__all__)
    raise KeyError(f"no named query {query!r} in the store; the named queries are: {', '.join(names)}")


@st.cache_data(ttl=TTL_S, max_entries=256, show_spinner=False)
def cached(query: str, log_dir: str, *args: Any) -> Any:
    """The result of the store's named query `query` on `log_dir`'s snapshot, called with `args` (hashable values:
    pass a tuple, not a list). Cached for TTL_S seconds per distinct (query, log_dir, args)."""
    run = _named(query)
    # A DuckDB connection is not thread-safe and Streamlit serves each session in its own thread: one cursor per call.
    cur = _connection(log_dir).cursor()
    try:
        return run(cur, *args)
    finally:
        cur.close()


def reload() -> None:
    """Forget every snapshot and cached result (the sidebar's Reload button)."""
    _connection.clear()
    st.cache_data.clear()


# --- the SQL page: text a person typed, run only through the sandbox ---


@dataclass(frozen=True)
class SqlResult:
    frame: pd.DataFrame
    truncated: bool
    error: str | None = None


@st.cache_resource(ttl=TTL_S, max_entries=2, show_spinner=False)
def _sandbox(log_dir: str) -> SandboxedConnection:
    return open_sandboxed(log_dir)  # the sandbox's own limits (time, rows): the same as `forkwatch sql`


@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner="Running the query…")
def run_sql(log_dir: str, sql: str) -> SqlResult:
    """The result, or the sandbox's one-line message when it refused or failed the statement (cached too, so a
    rerun such as a download click does not run it again)."""
    try:
        df = _sandbox(log_dir).query(sql)
    except SandboxError as e:
        return SqlResult(pd.DataFrame(), False, str(e))
    return SqlResult(df, bool(df.attrs.get("truncated")))
