"""open_sandboxed: hostile statements are refused, each for the reason claimed, and none leaves a file behind."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pytest
from forkwatch.store import RunWriter
from forkwatch.store.sandbox import QueryFailed, QueryTimeout, StatementRefused, open_sandboxed
from synthetic_records import step_batches

DENIED = "file system operations are disabled"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A log dir with one run, a secret file outside it, and a symlink inside it pointing at the secret."""
    base = tmp_path_factory.mktemp("sandbox")
    log_dir = base / "logs"
    w = RunWriter(log_dir, "r")
    for b in step_batches(steps=2, completions_per_step=4, min_len=5, max_len=10):
        for table, cols in b.items():
            w.put(table, cols)
    w.close()
    secret = base / "secret.csv"
    secret.write_text("password\nhunter2\n")
    os.symlink(secret, log_dir / "link.csv")
    os.symlink(base, log_dir / "up")
    sb = open_sandboxed(log_dir, timeout_s=1.0)
    before = _files(base)
    yield sb, log_dir, base, secret
    sb.close()
    assert _files(base) == before, "a statement left a file behind"


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_views_are_readable_in_the_sandbox(world):
    sb, *_ = world
    assert sb.query("SELECT count(DISTINCT step) AS n FROM tokens")["n"][0] == 2
    assert sb.query("SELECT count(*) AS n FROM token_text")["n"][0] > 0
    assert sb.query("SELECT status FROM runs")["status"][0] == "finished"


def _hostile(log_dir: Path, base: Path, secret: Path) -> list[tuple[str, type, str]]:
    L = str(log_dir)
    return [
        # reading outside log_dir
        ("SELECT * FROM read_csv('/etc/passwd')", QueryFailed, DENIED),
        ("SELECT * FROM read_text('/etc/passwd')", QueryFailed, DENIED),
        ("SELECT * FROM read_blob('/etc/passwd')", QueryFailed, DENIED),
        ("SELECT * FROM sniff_csv('/etc/passwd')", QueryFailed, DENIED),
        ("SELECT * FROM '/etc/passwd'", QueryFailed, "does not exist"),  # replacement scan is off
        (f"SELECT * FROM read_csv('{secret}')", QueryFailed, DENIED),
        (f"SELECT * FROM read_csv('{L}/link.csv')", QueryFailed, DENIED),  # symlink out of log_dir
        (f"SELECT * FROM read_csv('{L}/up/secret.csv')", QueryFailed, DENIED),  # symlinked folder out of log_dir
        (f"SELECT * FROM read_csv('{L}/../secret.csv')", QueryFailed, DENIED),  # .. path
        (f"SELECT * FROM read_csv('{L}/r/../../secret.csv')", QueryFailed, DENIED),
        ("SELECT * FROM glob('/etc/*')", QueryFailed, DENIED),
        ("SELECT * FROM parquet_metadata('/etc/passwd')", QueryFailed, DENIED),
        # URLs
        ("SELECT * FROM read_csv('https://example.com/a.csv')", QueryFailed, DENIED),
        ("SELECT * FROM read_parquet('s3://bucket/a.parquet')", QueryFailed, DENIED),
        # writing, inside and outside log_dir
        (f"COPY tokens TO '{L}/r/tokens/stolen.parquet'", StatementRefused, "got COPY"),
        (f"COPY (SELECT 1) TO '{base}/out.csv'", StatementRefused, "got COPY"),
        (f"EXPORT DATABASE '{L}/export'", StatementRefused, "got EXPORT"),
        (f"SELECT * FROM query('COPY (SELECT 1) TO ''{L}/q.csv''')", QueryFailed, "single SELECT"),
        ("CREATE TABLE t AS SELECT 1", StatementRefused, "got CREATE"),
        # attaching, extensions, settings
        (f"ATTACH '{L}/db.duckdb'", StatementRefused, "got ATTACH"),
        ("INSTALL httpfs", StatementRefused, "got LOAD"),
        ("LOAD httpfs", StatementRefused, "got LOAD"),
        ("SET enable_external_access = true", StatementRefused, "got SET"),
        ("RESET lock_configuration", StatementRefused, "got SET"),
        ("PRAGMA enable_profiling", StatementRefused, "got PRAGMA"),
        ("CALL checkpoint()", StatementRefused, "got CALL"),
        # several statements at once
        ("SELECT 1; SELECT 2", StatementRefused, "one statement at a time"),
        (f"SELECT 1; COPY (SELECT 1) TO '{L}/x.csv'", StatementRefused, "one statement at a time"),
    ]


def test_hostile_statements_are_refused_for_the_stated_reason(world):
    sb, log_dir, base, secret = world
    cases = _hostile(log_dir, base, secret)
    assert len(cases) >= 20
    for sql, exc, reason in cases:
        with pytest.raises(exc) as info:
            sb.query(sql)
        assert reason in str(info.value), (sql, str(info.value))
        assert "\n" not in str(info.value)


def test_cartesian_product_is_stopped_by_the_time_limit(world):
    sb, *_ = world
    with pytest.raises(QueryTimeout, match="time limit"):
        sb.query("SELECT sum(a.range * b.range) FROM range(100000000) a, range(100000000) b", timeout_s=0.5)
    assert sb.query("SELECT 42 AS x")["x"][0] == 42  # the connection is still usable


def test_permission_layer_holds_even_without_the_statement_guard(world):
    """Defence in depth: bypass the guard and the locked settings still refuse writes, attach and unlocking."""
    sb, log_dir, base, _ = world
    con = sb._con
    locked = "configuration has been locked"
    for sql, reason in (
        (f"COPY (SELECT 1) TO '{log_dir}/r/x.csv'", DENIED),  # inside log_dir: allowed_paths lists part files only
        (f"COPY (SELECT 1) TO '{base}/x.csv'", DENIED),
        (f"ATTACH '{log_dir}/db.duckdb'", DENIED),
        ("INSTALL httpfs", DENIED),
        ("LOAD httpfs", "Loading external extensions is disabled"),
        ("SET enable_external_access = true", locked),
        ("SET allowed_directories = ['/']", locked),
        ("SET lock_configuration = false", locked),
        ("RESET enable_external_access", locked),
    ):
        with pytest.raises(duckdb.Error, match=reason):
            con.execute(sql)


def test_max_rows_truncates_and_says_so(world):
    sb, *_ = world
    df = sb.query("SELECT * FROM range(50)", max_rows=10)
    assert len(df) == 10 and df.attrs["truncated"]
    assert not sb.query("SELECT * FROM range(5)", max_rows=10).attrs["truncated"]


def test_missing_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_sandboxed(tmp_path / "nope")
