"""`forkwatch check`: verdicts with evidence, the exit codes a pipeline gates on, and plain errors."""

from __future__ import annotations

import json

import pytest
from synthetic import write_run, write_sample_runs

from forkwatch.cli import main


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    write_sample_runs(d, n_steps=40, token_steps=2)
    return d


def test_check_exits_1_and_prints_evidence_when_a_run_collapsed_or_exploded(log_dir, capsys):
    assert main(["check", str(log_dir)]) == 1
    out = capsys.readouterr().out
    assert "collapse: COLLAPSE" in out and "explosion: EXPLOSION" in out and "healthy: HEALTHY" in out
    assert "[collapse.mean] fired at step" in out
    assert "evidence: steps" in out and "threshold" in out
    assert "supporting: completion_length_mean_early=" in out  # explosion's company
    assert "law R = -a·exp(H) + b: a=" in out  # the collapsing run follows the law


def test_check_reports_a_run_with_faults_prominently(tmp_path, capsys):
    from forkwatch.store import RunWriter
    from forkwatch.store.ledger import Ledger

    write_run(tmp_path, "healthy", "healthy", n_steps=40, token_steps=1)
    ledger = Ledger()
    with ledger.guard("health"):
        raise RuntimeError("injected")
    RunWriter(tmp_path, "healthy", rank=1, world_size=2, ledger=ledger).close()
    assert main(["check", str(tmp_path)]) == 0  # faults do not fail the gate: the verdict is about training
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("  RECORDING FAULTS: 1 (rank 1: health 1)")


def test_check_one_healthy_run_exits_0(log_dir, capsys):
    assert main(["check", str(log_dir), "--run", "healthy"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("healthy: HEALTHY") and "collapse" not in out
    assert "law: no ceiling (" in out  # a noisy run gets no ceiling, with the reason


def test_check_json_lists_verdicts_flags_and_law(log_dir, capsys):
    assert main(["check", str(log_dir), "--json"]) == 1
    runs = {r["run_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert {k: r["verdict"] for k, r in runs.items()} == {
        "collapse": "collapse", "explosion": "explosion", "healthy": "healthy",
    }  # fmt: skip
    flag = runs["collapse"]["flags"][0]
    assert {"rule", "fired_at", "steps", "values", "threshold", "message"} <= flag.keys()
    assert runs["collapse"]["law"]["ceiling"] is not None


def test_missing_log_dir_exits_2_with_one_line(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err


def test_empty_log_dir_exits_2(tmp_path, capsys):
    assert main(["check", str(tmp_path)]) == 2
    assert "no forkwatch run" in capsys.readouterr().err


def test_unknown_run_exits_2(log_dir, capsys):
    assert main(["check", str(log_dir), "--run", "nope"]) == 2
    assert "no run 'nope'" in capsys.readouterr().err


def test_run_without_steps_is_insufficient_data_not_an_alarm(tmp_path, capsys):
    write_run(tmp_path, "fresh", "healthy", n_steps=0, status=None)
    assert main(["check", str(tmp_path)]) == 0
    assert "fresh: INSUFFICIENT_DATA" in capsys.readouterr().out
