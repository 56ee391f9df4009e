"""Two processes (torchrun, gloo on the CPU) write one run that reads back as one.

`accelerate launch --num_processes 2 --cpu` falls back to a single process on a machine without MPI, so the test
launches with torchrun, which accelerate picks up from the environment (RANK, WORLD_SIZE) the same way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from forkwatch.store import connect

SCRIPT = '''
import json, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from pathlib import Path
import conftest, forkwatch
make = conftest.make_trainer.__wrapped__(Path({tmp!r}))
# per-device batch 2 < num_generations 4: every prompt group is split over the two ranks
trainer = make(max_steps=2, per_device_train_batch_size=2, num_generations=4, output_dir={out!r})
cb = forkwatch.attach(trainer, log_dir={runs!r}, group_js=True, record_completions_per_step=None)
if {fault!r} and trainer.accelerator.process_index == 1:  # a fault on rank 1 only
    def boom(out):
        raise RuntimeError("injected on rank 1")
    cb.capture.on_generation = boom
trainer.train()
if trainer.accelerator.process_index == 0:
    logged = [h["forkwatch/faults"] for h in trainer.state.log_history if "forkwatch/faults" in h]
    Path({out!r}, "faults_logged.json").write_text(json.dumps(logged))
'''


def _launch(tmp_path: Path, *, fault: bool, port: int) -> Path:
    tests = str(Path(__file__).parents[1])
    script = tmp_path / "run.py"
    runs = tmp_path / "runs"
    (tmp_path / "out").mkdir()
    script.write_text(SCRIPT.format(tests=tests, tmp=str(tmp_path), out=str(tmp_path / "out"), runs=str(runs),
                                    fault=fault))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(script)],
        capture_output=True, text=True, timeout=110, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs


@pytest.mark.timeout(120)
def test_two_processes_write_one_run(tmp_path):
    runs = _launch(tmp_path, fault=False, port=29533)
    (run_dir,) = [d for d in runs.iterdir() if d.is_dir()]
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["world_size"] == 2 and meta["status"] == "finished"
    assert meta["group_js_split_groups"] > 0  # documented: group_js over the locally present siblings
    con = connect(str(runs))
    assert con.sql("SELECT count(DISTINCT run_id) FROM tokens").fetchall()[0][0] == 1
    steps = con.sql("SELECT step, n_completions FROM steps ORDER BY step").fetchall()
    assert steps == [(1, 4), (2, 4)]  # one row per step, aggregated over both ranks
    ranks = con.sql("SELECT DISTINCT rank FROM completions ORDER BY rank").fetchall()
    assert ranks == [(0,), (1,)]
    n_ids = con.sql("SELECT count(DISTINCT completion_id), count(*) FROM completions").fetchall()[0]
    assert n_ids[0] == n_ids[1] == 8  # completion ids are unique across ranks
    assert con.sql("SELECT faults, faults_detail FROM runs").fetchall() == [(0, "")]


@pytest.mark.timeout(120)
def test_a_fault_on_rank_1_is_counted_in_its_file_the_run_and_the_logged_scalar(tmp_path):
    runs = _launch(tmp_path, fault=True, port=29534)
    (run_dir,) = [d for d in runs.iterdir() if d.is_dir()]
    rank1 = json.loads((run_dir / "rank-001.json").read_text())
    assert rank1["faults"] == {"generation": 2}  # one per step, on rank 1 only
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["faults"] == {} and meta["faults_by_rank"] == {"1": {"generation": 2}}
    logged = json.loads((tmp_path / "out" / "faults_logged.json").read_text())
    assert logged == [1.0, 2.0]  # rank 0 logs every rank's faults as of each step: one generation per step
    con = connect(str(runs))
    assert con.sql("SELECT faults, faults_detail FROM runs").fetchall() == [(2, "rank 1: generation 2")]


STOP_SCRIPT = '''
import json, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from pathlib import Path
import conftest, forkwatch
make = conftest.make_trainer.__wrapped__(Path({tmp!r}))
trainer = make(max_steps=8, per_device_train_batch_size=2, num_generations=4, output_dir={out!r})
forkwatch.attach(trainer, log_dir={runs!r}, run_name="r", on_alarm="stop", handoff_interval_s=3600.0,
                 health_rules={{"min_steps": 2, "sustain_steps": 2, "early_steps": 1}})
trainer.train()
Path({out!r}, f"step-{{trainer.accelerator.process_index}}.json").write_text(json.dumps(trainer.state.global_step))
'''


@pytest.mark.timeout(120)
def test_an_alarm_stops_every_rank_at_the_same_step(tmp_path):
    """With on_alarm="stop" every rank evaluates the rules over the same gathered rows, so all stop together at the
    alarm's step (one rank stopping alone would leave the other waiting in a collective until the timeout)."""
    import re

    tests = str(Path(__file__).parents[1])
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "run.py"
    script.write_text(STOP_SCRIPT.format(tests=tests, tmp=str(tmp_path), out=str(out), runs=str(tmp_path / "runs")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
         str(script)],
        capture_output=True, text=True, timeout=110, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "runs" / "r" / "run.json").read_text())
    fired = int(re.search(r"at step (\d+)", meta["stopped_by_alarm"]).group(1))
    steps = [json.loads((out / f"step-{r}.json").read_text()) for r in (0, 1)]
    assert steps == [fired, fired] and fired < 8 and meta["status"] == "stopped"
