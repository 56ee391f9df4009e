"""RunWriter's promises to the training loop: never block, never raise, count and report what it drops."""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import pytest
from forkwatch.store import RunWriter, connect
from forkwatch.store import part_file as parts_mod
from synthetic_records import step_batches


def _tokens(step: int, n: int, cid: int = 0) -> dict:
    return {
        "step": step,
        "completion_id": np.full(n, cid, np.int64),
        "position": np.arange(n, dtype=np.int32),
        "token_id": np.zeros(n, np.int32),
        "entropy": np.full(n, 0.5, np.float32),
    }


def test_full_queue_drops_counts_and_never_blocks(tmp_path, monkeypatch, caplog):
    gate, entered = threading.Event(), threading.Event()
    real_absorb = RunWriter._absorb

    def stuck_absorb(self, *a):  # the disk is "slow": the thread waits until the test opens the gate
        entered.set()
        gate.wait(10)
        return real_absorb(self, *a)

    monkeypatch.setattr(RunWriter, "_absorb", stuck_absorb)
    w = RunWriter(tmp_path, "r", max_queue_rows=1000)
    results, slowest = [], 0.0
    with caplog.at_level(logging.WARNING, logger="forkwatch.store.writer"):
        for step in range(20):
            t0 = time.perf_counter()
            results.append(w.put("tokens", _tokens(step, 100)))
            slowest = max(slowest, time.perf_counter() - t0)
            if step == 0:
                assert entered.wait(5)  # the thread holds the first batch, stuck on the "disk"
    assert slowest < 2.0  # far below the 10 s the stuck disk would cost a put that waited for it
    # The cap counts every row the writer holds: the first batch (stuck in the thread) and nine queued behind it
    # fill the 1000 rows; the other ten are dropped.
    assert results == [True] * 10 + [False] * 10
    assert w.dropped["tokens"] == 100 * results.count(False)
    assert sum("queue full" in r.message for r in caplog.records) == 1  # logged once
    gate.set()
    w.close()
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert meta["dropped"]["tokens"] == 100 * results.count(False)
    assert connect(tmp_path).execute("SELECT count(*) FROM tokens").fetchone()[0] == 100 * results.count(True)


def test_unwritable_log_dir_reports_and_drops_while_caller_runs(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="forkwatch.store.writer"):
        w = RunWriter(blocker / "logs", "r")  # every mkdir/write under a regular file fails
        for step in range(5):
            w.put("tokens", _tokens(step, 10))
            w.put("steps", {"step": [step], "n_tokens": [10]})
        assert w.flush(timeout=10) is False
        w.update_meta(status="still going")
        w.close()
        w.close()  # twice is fine
    assert w.dropped["tokens"] == 50 and w.dropped["steps"] == 5
    assert any("cannot" in r.message for r in caplog.records)
    assert len(caplog.records) <= 6  # once per kind of failure, not once per batch


def test_disk_failure_mid_run_is_counted_in_run_json(tmp_path, monkeypatch, caplog):
    real_write = parts_mod.write_part_file
    calls = {"n": 0}

    def failing_write(*a, **kw):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(28, "No space left on device")
        return real_write(*a, **kw)

    monkeypatch.setattr(parts_mod, "write_part_file", failing_write)
    w = RunWriter(tmp_path, "r")
    with caplog.at_level(logging.WARNING, logger="forkwatch.store.writer"):
        for step in range(6):
            assert w.put("tokens", _tokens(step, 10))
            w.flush()  # one part per step, so the disk fills up between steps
        w.close()
    assert w.dropped["tokens"] == 40  # steps 0 and 1 written, 2..5 dropped
    assert sum("No space left" in r.message for r in caplog.records) == 1
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert meta["dropped"]["tokens"] == 40 and meta["status"] == "finished"
    assert not list(tmp_path.rglob(".*.tmp"))  # failed temp files are cleaned up
    assert connect(tmp_path).execute("SELECT list(DISTINCT step ORDER BY step) FROM tokens").fetchone()[0] == [0, 1]


def test_bad_batch_is_dropped_not_raised(tmp_path):
    w = RunWriter(tmp_path, "r")
    assert w.put("tokens", {**_tokens(0, 3), "no_such_column": [1, 2, 3]}) is True  # checked on the thread
    assert w.put("nonsense", {"step": [0]}) is False
    assert w.put("tokens", _tokens(1, 4))
    w.close()
    assert w.dropped["tokens"] == 3 and w.dropped["nonsense"] == 1
    assert connect(tmp_path).execute("SELECT count(*) FROM tokens").fetchone()[0] == 4
    assert w.put("tokens", _tokens(2, 1)) is False  # after close


def test_run_json_fields_and_update_meta(tmp_path):
    w = RunWriter(tmp_path, "r", meta={"name": "my run", "model": "tiny", "world_size_note": 1})
    assert w.flush(10)  # run.json is written by the writer thread, like the parts
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert {k: meta[k] for k in ("run_id", "name", "status", "schema_version")} == {
        "run_id": "r",
        "name": "my run",
        "status": "running",
        "schema_version": 1,
    }
    assert "created_at" in meta and "forkwatch_version" in meta and meta["model"] == "tiny"
    w.update_meta(alarms=["collapse"], last_step=7)
    assert w.flush(10)
    assert json.loads((tmp_path / "r" / "run.json").read_text())["alarms"] == ["collapse"]
    w.put("tokens", _tokens(3, 2))
    w.close("stopped")
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert meta["status"] == "stopped" and meta["last_step"] == 7 and meta["alarms"] == ["collapse"]
    assert not list((tmp_path / "r").glob(".*"))  # no temp file left next to run.json


def test_resume_moves_later_steps_aside_and_does_not_duplicate(tmp_path):
    first = RunWriter(tmp_path, "r")
    for b in step_batches(steps=6, completions_per_step=2, min_len=3, max_len=5, seed=0):
        for table, cols in b.items():
            first.put(table, cols)
    first.close("failed")  # crashed after step 5; the checkpoint was at step 3
    second = RunWriter(tmp_path, "r", resume_step=3)
    for b in step_batches(steps=3, completions_per_step=2, min_len=3, max_len=5, seed=9, first_step=4):
        for table, cols in b.items():
            second.put(table, cols)
    second.close()
    con = connect(tmp_path)
    for table in ("steps", "completions", "tokens", "forks"):
        per_step = dict(
            con.execute(
                f"SELECT step, count(DISTINCT completion_id) FROM {table} GROUP BY step"
                if table != "steps"
                else "SELECT step, count(*) FROM steps GROUP BY step"
            ).fetchall()
        )
        assert sorted(per_step) == list(range(7)), table
        if table != "forks":
            assert set(per_step.values()) == {1 if table == "steps" else 2}, (table, per_step)
    superseded = list((tmp_path / "r" / "superseded").rglob("*.parquet"))
    assert superseded, "earlier attempt's parts must be kept aside, not deleted"
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert meta["resumed_from_step"] == 3 and meta["last_step"] == 6 and meta["status"] == "finished"


def test_each_rank_writes_its_own_parts(tmp_path):
    writers = [RunWriter(tmp_path, "r", rank=r, world_size=2) for r in range(2)]
    for r, w in enumerate(writers):
        w.put("tokens", _tokens(0, 5 + r, cid=r))
    writers[1].put("nonsense", {"step": [0]})
    for w in writers:
        w.close()
    names = sorted(p.name for p in (tmp_path / "r" / "tokens").iterdir())
    assert [n[:9] for n in names] == ["part-r000", "part-r001"]
    con = connect(tmp_path)
    assert con.execute("SELECT completion_id, count(*) FROM tokens GROUP BY 1 ORDER BY 1").fetchall() == [
        (0, 5),
        (1, 6),
    ]
    assert json.loads((tmp_path / "r" / "rank-001.json").read_text())["dropped"]["nonsense"] == 1
    assert con.execute("SELECT dropped FROM runs").fetchone()[0] == 1


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden"])
def test_run_id_must_be_a_plain_folder_name(tmp_path, bad):
    with pytest.raises(ValueError, match="run_id"):
        RunWriter(tmp_path, bad)


def test_put_of_a_non_mapping_is_dropped_not_raised(tmp_path):
    w = RunWriter(tmp_path, "r")
    assert w.put("tokens", None) is False  # type: ignore[arg-type]
    w.close()


def test_resume_over_a_corrupt_part_does_not_raise(tmp_path, caplog):
    w = RunWriter(tmp_path, "r")
    for step in range(3):
        w.put("steps", {"step": [step], "n_tokens": [1]})
    w.close()
    (part,) = (tmp_path / "r" / "steps").glob("part-*.parquet")
    part.write_bytes(b"PAR1 garbage")
    with caplog.at_level(logging.WARNING, logger="forkwatch.store.writer"):
        w2 = RunWriter(tmp_path, "r", resume_step=1)  # must split that part, cannot read it: reports, goes on
        assert w2.put("steps", {"step": [2], "n_tokens": [1]})
        w2.close()
    assert any("cannot prepare" in r.getMessage() for r in caplog.records)


def test_a_deferred_producer_runs_on_the_writer_thread_and_its_batches_are_written(tmp_path):
    seen = []

    def producer():
        seen.append(threading.current_thread().name)
        return [("tokens", _tokens(1, 5)), ("tokens", _tokens(2, 3, cid=1))]

    w = RunWriter(tmp_path, "r")
    assert w.submit(producer, rows={"tokens": 8})
    w.close()
    assert seen == ["forkwatch-writer-r0"]
    con = connect(tmp_path)
    assert con.sql("SELECT step, count(*) FROM tokens GROUP BY step ORDER BY step").fetchall() == [(1, 5), (2, 3)]


def test_a_failing_producer_is_a_fault_and_its_rows_are_dropped(tmp_path):
    def producer():
        raise RuntimeError("injected")

    w = RunWriter(tmp_path, "r")
    assert w.submit(producer, rows={"tokens": 7, "forks": 2}, where="records")
    w.close()
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert meta["faults"] == {"records": 1}
    assert meta["dropped"]["tokens"] == 7 and meta["dropped"]["forks"] == 2


def test_a_producer_over_the_queue_bound_is_dropped_unrun(tmp_path):
    ran = []
    w = RunWriter(tmp_path, "r", max_queue_rows=10)
    assert not w.submit(lambda: ran.append(1) or [], rows={"tokens": 11})
    w.close()
    assert ran == [] and w.dropped["tokens"] == 11
