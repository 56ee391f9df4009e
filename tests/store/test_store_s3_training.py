"""Real GRPOTrainer runs writing to s3:// (SeaweedFS on 127.0.0.1, tests/s3_server.py) through the faults a run
meets past one machine: the training process SIGKILLed mid-run, the server down for a few steps, a resume from a
checkpoint onto the same s3 run; and FORKWATCH_LOG_DIR as attach's default log_dir."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import test_store_s3
from forkwatch.store import connect, run_folder, run_meta
from forkwatch.store.location import LOG_DIR_ENV, LogDirError, resolve
from test_store_s3 import BUCKET, _objects
from transformers import TrainerCallback

import forkwatch
from forkwatch.cli import main as cli

TESTS = Path(__file__).resolve().parents[1]  # the shared helpers (s3_server, sharded_run, synthetic)
# the same server fixture as test_store_s3 (one server for this module, stopped at its end)
s3 = pytest.fixture(scope="module", name="s3")(test_store_s3.s3.__wrapped__)


def _parts(prefix: str) -> list[str]:
    return [p for p in _objects(prefix) if p.endswith(".parquet")]


def _rows(paths: list[str], log_dir: str) -> int:
    fs = resolve(log_dir).fs
    return sum(pq.read_table(p, filesystem=fs).num_rows for p in paths)


# ------------------------------------------------------------------ a training process killed mid-run

KILLED_TRAINING = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from pathlib import Path
import conftest, forkwatch
from transformers import TrainerCallback

class SavedStep(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        print("saved", state.global_step, flush=True)  # after forkwatch's on_save: the parts up to this step are uploaded

trainer = conftest.make_trainer.__wrapped__(Path({tmp!r}))(
    max_steps=1000, save_strategy="steps", save_steps=1, save_total_limit=1, output_dir={out!r})
trainer.add_callback(SavedStep())
forkwatch.attach(trainer, log_dir={log_dir!r}, run_name="killed", handoff_interval_s=0)
trainer.train()
"""


@pytest.mark.timeout(150)
def test_a_training_process_killed_mid_run_leaves_whole_readable_parts(s3, tmp_path, capsys):
    log_dir = f"s3://{BUCKET}/killed-training"
    script = tmp_path / "train.py"
    script.write_text(KILLED_TRAINING.format(tests=str(TESTS), tmp=str(tmp_path), out=str(tmp_path / "out"),
                                             log_dir=log_dir))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env, cwd=tmp_path)
    saved = []
    try:
        for line in proc.stdout:  # (libraries print to stdout too)
            if not line.startswith("saved "):
                continue
            saved.append(int(line.split()[1]))
            if saved[-1] >= 3:
                break
    finally:
        proc.kill()  # SIGKILL mid-training: step 4 is running, its records pending or on their way up
        proc.wait(10)
    assert saved[:3] == [1, 2, 3], f"training did not reach its third checkpoint (rc {proc.returncode})"
    fs = resolve(log_dir).fs
    objects = _objects(f"{BUCKET}/killed-training/killed")
    names = {p.rsplit("/", 1)[1] for p in objects}
    assert names - {"run.json"} and all(run_folder.PART.match(n) for n in names - {"run.json"}), names
    for p in objects:  # nothing half-visible: each part's footer and every row read, its step range as named
        if p.endswith(".parquet"):
            t = pq.read_table(p, filesystem=fs)
            assert t.num_rows == pq.read_metadata(p, filesystem=fs).num_rows > 0
            span = run_folder.step_range(p)
            if span is not None:
                steps = t["step"].to_pylist()
                assert span == (min(steps), max(steps)), p
    assert run_meta.read_run_json(log_dir, "killed")["status"] == "running"  # never closed: it was killed
    con = connect(log_dir)
    steps = [s for (s,) in con.execute("SELECT step FROM steps ORDER BY step").fetchall()]
    assert steps[:3] == [1, 2, 3] and steps == list(range(1, len(steps) + 1))  # every uploaded step, once
    # the records of each checkpointed step, whole (a later step's may have been on their way up)
    assert con.execute("SELECT count(*) FROM completions WHERE step <= 3").fetchone()[0] == 8 * 3
    assert con.execute("SELECT count(*) FROM tokens WHERE step <= 3").fetchone()[0] > 0
    assert cli(["runs", log_dir]) == 0
    out = capsys.readouterr().out
    assert "killed" in out and "running" in out
    assert cli(["check", log_dir]) in (0, 1)  # 1: a health rule fired on a few steps, a verdict not an error
    assert "killed:" in capsys.readouterr().out


# ------------------------------------------------------------------ resume from a checkpoint onto the same s3 run


def test_resume_from_a_checkpoint_on_s3_moves_the_rerun_steps_aside_and_loses_nothing(s3, make_trainer, tmp_path):
    log_dir = f"s3://{BUCKET}/resumed"
    prefix = f"{BUCKET}/resumed/grpo"
    out = str(tmp_path / "out")
    first = make_trainer(max_steps=4, save_strategy="steps", save_steps=2, output_dir=out)
    forkwatch.attach(first, log_dir=log_dir, run_name="grpo")
    first.train()  # parts of steps 1-2 (flushed at checkpoint 2) and 3-4 (checkpoint 4) per table
    before = {p: resolve(log_dir).fs.get_file_info(p).size for p in _parts(prefix)}
    later = {p for p in before if (run_folder.step_range(p) or (0, 0))[1] > 2}
    assert later and later != set(before)

    resumed = make_trainer(max_steps=4, save_strategy="steps", save_steps=2, output_dir=out)
    cb = forkwatch.attach(resumed, log_dir=log_dir)
    resumed.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    assert cb.run_id == "grpo"  # the run id stored in the checkpoint

    con = connect(log_dir)
    assert [s for (s,) in con.execute("SELECT step FROM steps ORDER BY step").fetchall()] == [1, 2, 3, 4]
    dup = con.execute("SELECT count(*) FROM (SELECT completion_id, position, count(*) c FROM tokens "
                      "GROUP BY ALL HAVING c > 1)").fetchone()[0]
    assert dup == 0
    assert con.execute("SELECT count(DISTINCT step), count(*) FROM completions").fetchone() == (4, 32)
    # moved aside by copy then delete: each part of steps 3-4 under superseded/<attempt>/, same size, gone from
    # its place; the parts of steps 1-2 untouched; nothing deleted
    after = {p: resolve(log_dir).fs.get_file_info(p).size for p in _parts(prefix)}
    aside = {p for p in after if f"/{run_folder.SUPERSEDED}/" in p}
    (attempt,) = {p.split(f"/{run_folder.SUPERSEDED}/")[1].split("/")[0] for p in aside}
    assert {p.replace(f"/{run_folder.SUPERSEDED}/{attempt}/", "/") for p in aside} == later
    assert all(after[p] == before[p.replace(f"/{run_folder.SUPERSEDED}/{attempt}/", "/")] for p in aside)
    assert not later & set(after)
    assert all(after.get(p) == before[p] for p in set(before) - later)
    meta = run_meta.read_run_json(log_dir, "grpo")
    assert meta["resumed_from_step"] == 2 and meta["status"] == "finished" and meta["last_step"] == 4


# ------------------------------------------------------------------ FORKWATCH_LOG_DIR: attach's default log_dir


def test_forkwatch_log_dir_is_the_default_log_dir_checked_at_attach(s3, make_trainer, monkeypatch, tmp_path):
    from forkwatch.plugin.config import ForkwatchConfig

    monkeypatch.delenv(LOG_DIR_ENV, raising=False)
    assert ForkwatchConfig().log_dir == "runs"
    monkeypatch.setenv(LOG_DIR_ENV, f"s3://{BUCKET}/from-env")
    trainer = make_trainer(max_steps=1)
    cb = forkwatch.attach(trainer, run_name="env")
    assert cb.config.log_dir == f"s3://{BUCKET}/from-env"
    trainer.train()
    assert _parts(f"{BUCKET}/from-env/env/steps") and not Path("runs/env").exists()
    assert connect(f"s3://{BUCKET}/from-env").execute("SELECT count(*) FROM steps").fetchone()[0] == 1

    for bad, error, match in [("gs://bucket/runs", ValueError, "FORKWATCH_LOG_DIR='gs://bucket/runs': unsupported "),
                              ("s3:/bucket/runs", ValueError, "FORKWATCH_LOG_DIR='s3:/bucket/runs'"),
                              ("s3://no-such-bucket/runs", LogDirError, "s3://no-such-bucket/runs.*bucket")]:
        monkeypatch.setenv(LOG_DIR_ENV, bad)
        fresh = make_trainer(max_steps=1)
        with pytest.raises(error, match=match):
            forkwatch.attach(fresh)
        assert getattr(fresh, "_forkwatch", None) is None
    # an explicit log_dir wins over the variable (which is then not read at all)
    assert forkwatch.attach(fresh, log_dir=str(tmp_path / "runs")).config.log_dir == str(tmp_path / "runs")


# ------------------------------------------------------------------ the server down for a few steps mid-run (last:
# it takes this module's server down and back)


class Outage(TrainerCallback):
    """Kills the S3 server once step `down_at` is logged and starts it again at the end of step `up_at`, once the
    writer has given up on a part (so the outage is long enough to cost records on any machine). Records when each
    step ended and what was dropped by the restart."""

    def __init__(self, trainer, server, down_at: int, up_at: int) -> None:
        self.trainer, self.server, self.down_at, self.up_at = trainer, server, down_at, up_at
        self.ended: dict[int, float] = {}
        self.dropped_at: dict[int, int] = {}  # records the writer had dropped when each step ended
        self.down_t = self.up_t = 0.0
        self.dropped_while_down = 0

    def on_train_begin(self, args, state, control, **kwargs):
        # parts every 0.2 s instead of every 30 s: on these ~0.3 s steps, what a 30 s interval does on a long run
        writer = self.trainer._forkwatch.writer
        writer.flush_interval_s = 0.2
        writer.flush(30)  # (the next timed flush is due 0.2 s after this one)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # the outage starts once the trainer has logged step `down_at`: forkwatch's on_log (first in the list) has
        # then handed that step's row over, completed with TRL's scalars
        if state.global_step == self.down_at and self.down_t == 0.0:
            self.trainer._forkwatch.writer.flush(30)  # the steps before the outage are on the server
            self.server.kill()
            self.down_t = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        self.ended[step] = time.monotonic()
        self.dropped_at[step] = self.trainer._forkwatch.capture.faults.total_dropped()
        if step == self.up_at:
            ledger = self.trainer._forkwatch.capture.faults
            deadline = time.monotonic() + 60
            while ledger.total_dropped() == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            self.dropped_while_down = ledger.total_dropped()
            self.up_t = time.monotonic()
            self.server.start()


@pytest.mark.timeout(150)
def test_the_server_down_for_some_steps_costs_counted_records_and_never_training(s3, make_trainer, capsys):
    log_dir = f"s3://{BUCKET}/outage"
    steps_total = 8
    trainer = make_trainer(max_steps=steps_total)
    outage = Outage(trainer, s3, down_at=2, up_at=5)
    trainer.add_callback(outage)  # after forkwatch's callback: the writer exists at its on_train_begin
    forkwatch.attach(trainer, log_dir=log_dir, run_name="flaky", handoff_interval_s=0)
    result = trainer.train()  # returns: the store's outage raised nothing into training

    assert result.global_step == steps_total
    # training went on while the server was down: steps 3-5 ended after the kill and before the restart; steps 3
    # and 4 ended while the writer was still retrying its first failed part (it gives up only after >= 1.5 s of
    # backoff; a step here takes ~0.1 s): the training thread never waits out an upload's retries
    assert all(outage.down_t < outage.ended[s] <= outage.up_t for s in (3, 4, 5))
    assert outage.dropped_at[2] == outage.dropped_at[3] == outage.dropped_at[4] == 0
    assert outage.dropped_while_down > 0  # ... and gave up on that part while the server was still down
    meta = run_meta.read_run_json(log_dir, "flaky")
    assert meta["status"] == "finished" and meta["last_step"] == steps_total
    dropped = meta["dropped"]
    con = connect(log_dir)
    steps = [s for (s,) in con.execute("SELECT step FROM steps ORDER BY step").fetchall()]
    # every step accounted for exactly once: written, or counted as dropped by table
    assert dropped["steps"] > 0 and len(steps) + dropped["steps"] == steps_total and len(set(steps)) == len(steps)
    assert {1, 2, steps_total} <= set(steps)  # before the outage, and parts after it landed
    completions = con.execute("SELECT count(*) FROM completions").fetchone()[0]
    assert dropped["completions"] > 0 and completions + dropped["completions"] == 8 * steps_total
    assert con.execute("SELECT max(step) FROM tokens").fetchone()[0] == steps_total
    (shown,) = con.execute("SELECT dropped FROM runs WHERE run_id = 'flaky'").fetchone()
    assert shown == sum(dropped.values())
    assert cli(["runs", log_dir]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, row = next(lines[i:i + 2] for i, line in enumerate(lines) if line.split()[:2] == ["name", "run_id"])
    listed = dict(zip(header.split(), row.split(), strict=False))
    assert (listed["run_id"], listed["dropped"], listed["last_step"]) == ("flaky", str(shown), str(steps_total))
    assert cli(["check", log_dir]) in (0, 1)
    assert f"DROPPED RECORDS: {shown}" in capsys.readouterr().out
