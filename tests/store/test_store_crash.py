"""Readers see whole parts only: while a writer appends, after SIGKILL, and around truncated or corrupt files."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pyarrow.parquet as pq
import pytest
from forkwatch.store import RunWriter, SchemaVersionError, connect, read_part
from forkwatch.store.schema import VERSION_KEY
from synthetic import simple_tokens, write_flushed_steps


def test_reader_querying_while_writer_appends_sees_only_whole_parts(tmp_path):
    rows_per_step = 5000  # step s has rows_per_step rows, all in one part
    w = RunWriter(tmp_path, "r", flush_interval_s=0.01)
    done = threading.Event()

    def produce():
        for step in range(40):
            w.put("tokens", simple_tokens(step, rows_per_step))
            w.put("steps", {"step": [step], "n_tokens": [rows_per_step]})
            w.flush(5)
        done.set()

    t = threading.Thread(target=produce)
    t.start()
    seen_steps = set()
    reads = 0
    while not done.is_set() or reads < 3:
        con = connect(tmp_path)
        counts = con.execute("SELECT step, count(*) FROM tokens GROUP BY step").fetchall()
        assert all(c == rows_per_step for _, c in counts), counts
        steps_rows = con.execute("SELECT count(*), count(DISTINCT step) FROM steps").fetchone()
        assert steps_rows[0] == steps_rows[1]
        seen_steps |= {s for s, _ in counts}
        reads += 1
        con.close()
    t.join()
    w.close()
    assert reads >= 3 and len(seen_steps) > 1  # the reader really ran while steps were being added
    final = connect(tmp_path).execute("SELECT count(DISTINCT step), count(*) FROM tokens").fetchone()
    assert final == (40, 40 * rows_per_step)


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np
    from forkwatch.store import RunWriter
    w = RunWriter(sys.argv[1], "killed", flush_interval_s=3600)
    step = 0
    while True:
        n = 20000
        w.put("tokens", {"step": step, "completion_id": np.zeros(n, np.int64), "position": np.arange(n, dtype=np.int32),
                         "token_id": np.zeros(n, np.int32), "entropy": np.ones(n, np.float32)})
        w.put("steps", {"step": [step], "n_tokens": [n]})
        w.put("completions", {"step": [step], "completion_id": [step], "completion": ["x" * 100]})
        if w.flush(10):
            print(step, flush=True)
        step += 1
    """
)


def test_sigkill_mid_run_leaves_every_flushed_step_readable(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    flushed = []
    try:
        for line in proc.stdout:
            flushed.append(int(line))
            if len(flushed) >= 8:
                break
        # Keep writing a little (the kill lands mid-write or mid-buffer), then kill without any chance to clean up.
        proc.stdout.readline()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    con = connect(tmp_path)
    per_step = dict(con.execute("SELECT step, count(*) FROM tokens GROUP BY step").fetchall())
    for step in flushed:
        assert per_step.get(step) == 20000, step
    assert set(per_step.values()) == {20000}  # nothing half-written is visible
    steps = {s for (s,) in con.execute("SELECT step FROM steps").fetchall()}
    assert set(flushed) <= steps
    assert con.execute("SELECT status FROM runs").fetchone()[0] == "running"  # never closed


def test_truncated_and_corrupt_parts_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    parts = write_flushed_steps(tmp_path)
    data = parts[0].read_bytes()
    parts[0].write_bytes(data[: len(data) // 2])  # truncated (a copy in progress, a full disk)
    garbled = bytearray(parts[1].read_bytes())
    garbled[-40:-8] = os.urandom(32)  # footer garbled, magic bytes intact
    parts[1].write_bytes(bytes(garbled))
    with caplog.at_level(logging.WARNING, logger="forkwatch.store.views"):
        con = connect(tmp_path)
        assert con.execute("SELECT list(DISTINCT step) FROM tokens").fetchone()[0] == [2]
        assert con.execute("SELECT count(*) FROM tokens").fetchone()[0] == 100
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert str(parts[0]) in messages and str(parts[1]) in messages


def test_part_of_an_unknown_schema_version_is_refused_naming_both_versions(tmp_path, caplog):
    parts = write_flushed_steps(tmp_path)
    t = pq.read_table(parts[2])
    pq.write_table(t.replace_schema_metadata({**t.schema.metadata, VERSION_KEY: b"99"}), parts[2])
    with pytest.raises(SchemaVersionError, match=r"version 99.*reads versions 1"):
        read_part(parts[2])
    with caplog.at_level(logging.WARNING, logger="forkwatch.store.views"):
        con = connect(tmp_path)
    assert con.execute("SELECT list(DISTINCT step ORDER BY step) FROM tokens").fetchone()[0] == [0, 1]
    assert any("version 99" in r.getMessage() and str(parts[2]) in r.getMessage() for r in caplog.records)


def test_part_of_an_older_version_missing_a_column_reads_it_as_null(tmp_path):
    parts = write_flushed_steps(tmp_path)
    t = pq.read_table(parts[0]).drop_columns(["entropy"])  # as if written before `entropy` existed
    pq.write_table(t, parts[0])
    con = connect(tmp_path)
    rows = con.execute("SELECT step, count(*), count(entropy) FROM tokens GROUP BY step ORDER BY step").fetchall()
    assert rows == [(0, 100, 0), (1, 100, 100), (2, 100, 100)]
    assert read_part(parts[0]).num_rows == 100
