"""The writer groups small steps into one part and still reads one step cheaply, loses only what its policy says."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from forkwatch.store import RunWriter, connect, queries
from synthetic import simple_tokens, write_flushed_steps


def _parts(log_dir, table="tokens", run="r"):
    return sorted(p.name for p in (log_dir / run / table).glob("part-*.parquet"))


def _wait_for(predicate, timeout=10.0):
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            return False
        time.sleep(0.01)
    return True


def test_small_steps_share_one_part_sorted_by_step(tmp_path):
    w = RunWriter(tmp_path, "r")
    for step in (*range(10, 50), *range(10)):  # out of order: the part is still sorted by step
        w.put("tokens", simple_tokens(step, 100))
    w.close()
    (name,) = _parts(tmp_path)
    assert "-s000000-000049-" in name
    steps = pq.read_table(tmp_path / "r" / "tokens" / name, columns=["step"])["step"].to_numpy()
    assert np.all(np.diff(steps) >= 0) and len(steps) == 5000
    con = connect(tmp_path)
    assert con.execute("SELECT count(DISTINCT step), count(*) FROM tokens").fetchone() == (50, 5000)
    assert con.execute("SELECT typeof(step) FROM tokens LIMIT 1").fetchone()[0] == "INTEGER"


def test_a_big_step_gets_a_part_of_its_own_without_waiting(tmp_path):
    w = RunWriter(tmp_path, "r", part_rows=1000, flush_interval_s=3600)
    for step in range(3):
        w.put("tokens", simple_tokens(step, 100))
    w.put("tokens", simple_tokens(3, 1500))
    assert _wait_for(lambda: len(_parts(tmp_path)) == 2)  # no flush: the big step went out on its own
    w.put("tokens", simple_tokens(4, 100))
    w.close()
    spans = [n.split("-")[2:4] for n in _parts(tmp_path)]
    assert spans == [["s000000", "000002"], ["s000003", "000003"], ["s000004", "000004"]]


def test_part_rows_bounds_a_part_of_small_steps(tmp_path):
    w = RunWriter(tmp_path, "r", part_rows=1000, flush_interval_s=3600)
    for step in range(25):
        w.put("tokens", simple_tokens(step, 100))
    assert _wait_for(lambda: len(_parts(tmp_path)) == 2)  # steps 0-9 and 10-19, written before any flush
    w.close()
    assert [n.split("-")[2:4] for n in _parts(tmp_path)] == [
        ["s000000", "000009"],
        ["s000010", "000019"],
        ["s000020", "000024"],
    ]


def test_flush_and_close_write_what_is_buffered(tmp_path):
    w = RunWriter(tmp_path, "r", flush_interval_s=3600)
    for step in range(3):
        w.put("tokens", simple_tokens(step, 100))
        w.put("forks", {"step": step, "completion_id": [step], "position": [0], "alt_token_ids": [[1, 2]]})
    assert _parts(tmp_path) == []  # buffered, nothing due yet
    assert w.flush(10)
    assert len(_parts(tmp_path)) == 1 and len(_parts(tmp_path, "forks")) == 1
    assert connect(tmp_path).execute("SELECT count(*) FROM tokens").fetchone()[0] == 300
    w.put("tokens", simple_tokens(3, 100))
    w.close()
    assert connect(tmp_path).execute("SELECT count(*), max(step) FROM tokens").fetchone() == (400, 3)


def test_buffered_rows_are_written_when_the_interval_passes(tmp_path):
    w = RunWriter(tmp_path, "r", flush_interval_s=0.3)
    w.put("tokens", simple_tokens(0, 100))
    assert _wait_for(lambda: len(_parts(tmp_path)) == 1, timeout=5)
    w.close()


KILLED = textwrap.dedent(
    """
    import sys, time, numpy as np
    from forkwatch.store import RunWriter
    interval, part_rows, steps = float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    w = RunWriter(sys.argv[1], "killed", flush_interval_s=interval, part_rows=part_rows)
    for step in range(steps):
        w.put("tokens", {"step": step, "completion_id": np.zeros(100, np.int64),
                         "position": np.arange(100, dtype=np.int32), "token_id": np.zeros(100, np.int32)})
        print(step, time.monotonic(), flush=True)
        time.sleep(0.02 if steps > 100 else 0)
    while not w._q.empty():  # every batch taken by the thread: what is not on disk now is only buffered
        time.sleep(0.01)
    time.sleep(0.3)
    print("idle", flush=True)
    time.sleep(60)
    """
)


def _run_and_kill(log_dir, interval, part_rows, steps, kill_after_s=None):
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(log_dir), str(interval), str(part_rows), str(steps)],
        stdout=subprocess.PIPE,
        text=True,
    )
    put_at = {}
    try:
        t0 = None  # from the first put: importing pyarrow and DuckDB takes seconds on a loaded machine
        for line in proc.stdout:
            t0 = time.monotonic() if t0 is None else t0
            if line.startswith("idle") or (kill_after_s is not None and time.monotonic() - t0 > kill_after_s):
                break
            step, at = line.split()
            put_at[int(step)] = float(at)
        killed_at = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    per_step = dict(connect(log_dir).execute("SELECT step, count(*) FROM tokens GROUP BY step").fetchall())
    return put_at, killed_at, per_step


def test_killed_writer_loses_only_the_rows_buffered_below_part_rows(tmp_path):
    put_at, _, per_step = _run_and_kill(tmp_path, 3600, 1000, 35)
    assert len(put_at) == 35
    assert per_step == {s: 100 for s in range(30)}  # parts of steps 0-9, 10-19, 20-29; 30-34 were buffered


def test_killed_writer_loses_at_most_the_flush_interval(tmp_path):
    interval = 0.5
    put_at, killed_at, per_step = _run_and_kill(tmp_path, interval, 10**6, 10**6, kill_after_s=3.0)
    assert len(put_at) > 30
    assert set(per_step.values()) == {100}  # whole steps only
    # Everything put more than the interval (plus a write's time on a loaded machine) before the kill is on disk.
    old = [s for s, at in put_at.items() if at < killed_at - interval - 1.0]
    assert old and all(s in per_step for s in old), sorted(set(old) - set(per_step))


def _garble_row_groups(path, keep_step):
    """Overwrite the column data of every row group not holding `keep_step` (its footer stays valid)."""
    meta = pq.read_metadata(path)
    data = bytearray(path.read_bytes())
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        stats = rg.column(meta.schema.names.index("step")).statistics
        if stats.min <= keep_step <= stats.max:
            continue
        for j in range(rg.num_columns):
            cc = rg.column(j)
            start = cc.dictionary_page_offset if cc.has_dictionary_page else cc.data_page_offset
            data[start : start + cc.total_compressed_size] = os.urandom(cc.total_compressed_size)
    path.write_bytes(bytes(data))


def test_one_step_is_read_without_decoding_other_steps(tmp_path):
    w = RunWriter(tmp_path, "r", row_group_rows=100)
    for step in range(30):
        w.put("tokens", simple_tokens(step, 100))
        if step % 10 == 9:
            w.flush()
    w.close()
    files = sorted((tmp_path / "r" / "tokens").glob("part-*.parquet"))
    assert len(files) == 3 and all(pq.read_metadata(f).num_row_groups == 10 for f in files)
    for f in files:
        _garble_row_groups(f, keep_step=17)
    con = connect(tmp_path)
    # Step 17's rows are whole: the 29 other steps' row groups (in its part and the two others) were never decoded.
    got = con.execute("SELECT count(*), sum(entropy) FROM tokens WHERE run_id = 'r' AND step = 17").fetchone()
    assert got[0] == 100 and got[1] == pytest.approx(float(np.sum(simple_tokens(17, 100)["entropy"])), rel=1e-3)
    assert len(queries.completion_tokens(con, "r", 17, 17003)) == 10
    with pytest.raises(duckdb.Error):  # the garbling is real: reading any other step fails
        con.execute("SELECT sum(entropy) FROM tokens WHERE step = 16").fetchone()


def test_resume_splits_a_part_spanning_the_checkpoint(tmp_path):
    w = RunWriter(tmp_path, "r")
    for step in range(10):
        w.put("tokens", simple_tokens(step, 100))
    w.close("failed")
    (original,) = _parts(tmp_path)
    RunWriter(tmp_path, "r", resume_step=4).close()
    con = connect(tmp_path)
    assert con.execute("SELECT count(*), max(step) FROM tokens").fetchone() == (500, 4)
    (moved,) = (tmp_path / "r" / "superseded").rglob("part-*.parquet")
    assert moved.name == original and pq.read_metadata(moved).num_rows == 1000  # nothing deleted


def test_layout_1_step_folders_are_still_read_and_superseded(tmp_path):
    for i, name in enumerate(p.name for p in write_flushed_steps(tmp_path)):  # as the previous writer laid them out: step=NNNNNN/, no range
        folder = tmp_path / "r" / "tokens" / f"step={i:06d}"
        folder.mkdir()
        os.replace(tmp_path / "r" / "tokens" / name, folder / f"part-r000-01d0a77e-{i:06d}.parquet")
    meta_path = tmp_path / "r" / "run.json"
    meta = json.loads(meta_path.read_text())
    del meta["layout_version"]
    meta_path.write_text(json.dumps(meta))
    con = connect(tmp_path)
    assert con.execute("SELECT step, count(*) FROM tokens GROUP BY step ORDER BY step").fetchall() == [
        (0, 100),
        (1, 100),
        (2, 100),
    ]
    RunWriter(tmp_path, "r", resume_step=0).close()
    assert connect(tmp_path).execute("SELECT list(DISTINCT step) FROM tokens").fetchone()[0] == [0]
    assert len(list((tmp_path / "r" / "superseded").rglob("step=*/part-*.parquet"))) == 2


def test_unknown_layout_is_skipped_with_a_clear_warning(tmp_path, caplog):
    for run in ("good", "future", "foreign"):
        w = RunWriter(tmp_path, run)
        w.put("tokens", simple_tokens(0, 100))
        w.close()
    (tmp_path / "foreign" / "tokens" / "step_block=000000").mkdir()
    meta = json.loads((tmp_path / "future" / "run.json").read_text())
    (tmp_path / "future" / "run.json").write_text(json.dumps({**meta, "layout_version": 99}))
    with caplog.at_level(logging.WARNING, logger="forkwatch.store.views"):
        con = connect(tmp_path)
    assert con.execute("SELECT list(DISTINCT run_id) FROM tokens").fetchone()[0] == ["good"]
    assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 3  # the runs are listed, their parts skipped
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "unknown store layout (sub-folder 'step_block=000000')" in text
    assert "store layout 99; this forkwatch reads layouts 1, 2" in text
