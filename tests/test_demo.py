"""`forkwatch demo --quick --no-dashboard` end to end: real warm-up, five real GRPO runs with forkwatch attached,
and what they wrote (run folders, steps, forks with alternatives, health verdicts)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from forkwatch.demo.run import QUICK
from forkwatch.demo.runs import demo_runs
from forkwatch.store import connect

RUNS = [s.name for s in demo_runs(QUICK.grpo)]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # ~25 s on 2 idle cores. The bound is a generous timeout rather than a timed assertion: CI machines are shared.
    proc = subprocess.run(
        [sys.executable, "-m", "forkwatch.cli", "demo", "--quick", "--no-dashboard", "--out", str(out)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def test_every_run_has_a_finished_folder(demo_out):
    out, _ = demo_out
    for name in RUNS:
        meta = json.loads((out / "logs" / name / "run.json").read_text())
        assert meta["status"] == "finished", name
    assert list((out / "warmup").glob("*/warmup.json"))  # the cached warm-up model


def test_every_run_recorded_one_steps_row_per_step(demo_out):
    con = connect(demo_out[0] / "logs")
    counts = dict(con.sql("SELECT run_id, count(DISTINCT step) FROM steps GROUP BY run_id").fetchall())
    assert counts == {name: QUICK.grpo.steps for name in RUNS}


def test_forks_carry_top_k_alternatives_most_likely_first(demo_out):
    con = connect(demo_out[0] / "logs")
    rows = con.sql("SELECT run_id, alt_token_ids, alt_probs FROM forks").fetchall()
    assert {r[0] for r in rows} == set(RUNS)
    for _, ids, probs in rows:
        assert len(ids) == len(probs) > 1
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-3


def test_check_flags_the_high_learning_rate_run_as_collapsed_and_plain_grpo_as_healthy(demo_out):
    log_dir = demo_out[0] / "logs"
    proc = subprocess.run(
        [sys.executable, "-m", "forkwatch.cli", "check", str(log_dir), "--json"], capture_output=True, text=True
    )
    assert proc.returncode == 1  # a collapsed run fails the gate
    verdicts = {r["name"]: r["verdict"] for r in json.loads(proc.stdout)}
    assert verdicts["grpo_lr_high"] == "collapse"
    assert verdicts["grpo"] == "healthy"


def test_demo_prints_the_verdicts_and_how_to_open_the_dashboard(demo_out):
    out, stdout = demo_out
    assert "COLLAPSE" in stdout and "HEALTHY" in stdout
    assert f"forkwatch dashboard {out / 'logs'}" in stdout
