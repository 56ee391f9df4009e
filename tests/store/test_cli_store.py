"""`forkwatch runs` and `forkwatch sql`: output formats, and one-line errors with a non-zero exit."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from forkwatch.store import RunWriter
from forkwatch.store.ledger import Ledger
from synthetic_records import step_batches

from forkwatch.cli import main

FORKWATCH = Path(sys.executable).with_name("forkwatch")


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    for run_id, status, steps in (("alpha", "finished", 3), ("beta", "failed", 2)):
        w = RunWriter(d, run_id, meta={"name": f"{run_id}-name"})
        for b in step_batches(steps=steps, completions_per_step=2, min_len=5, max_len=8, seed=len(run_id)):
            for table, cols in b.items():
                w.put(table, cols)
        w.close(status)
    # beta's second rank had faults in two places (its writer writes them into rank-001.json)
    ledger = Ledger()
    for where in ("records", "records", "step_end"):
        with ledger.guard(where):
            raise RuntimeError("injected")
    RunWriter(d, "beta", rank=1, world_size=2, ledger=ledger).close("failed")
    return d


def test_runs_lists_name_steps_recorded_tokens_status_and_health(log_dir, capsys):
    assert main(["runs", str(log_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["name", "run_id", "steps", "recorded_tokens", "last_step", "status", "dropped", "faults",
                              "health"]
    rows = {line.split()[0]: line.split() for line in out[1:] if not line.startswith("!")}
    assert rows["alpha-name"][2] == "3" and rows["alpha-name"][5] == "finished"
    assert rows["beta-name"][2] == "2" and rows["beta-name"][5] == "failed"
    assert int(rows["alpha-name"][3]) > 0


def test_runs_shows_a_run_with_faults_with_its_ranks_and_places(log_dir, capsys):
    assert main(["runs", str(log_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in out[1:] if not line.startswith("!")}
    assert rows["alpha-name"][7] == "0" and rows["beta-name"][7] == "3"
    assert [line for line in out if line.startswith("!")] == [
        "! beta: 3 recording fault(s) — rank 1: records 2, step_end 1"]


def test_sql_formats(log_dir, capsys):
    q = "SELECT run_id, step, count(*) AS n FROM tokens GROUP BY ALL ORDER BY run_id, step"
    assert main(["sql", str(log_dir), q, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["run_id"], r["step"]) for r in rows] == [
        ("alpha", "0"),
        ("alpha", "1"),
        ("alpha", "2"),
        ("beta", "0"),
        ("beta", "1"),
    ]
    assert main(["sql", str(log_dir), q, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["n"] for d in data] == [int(r["n"]) for r in rows]
    assert main(["sql", str(log_dir), q]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["run_id", "step", "n"] and len(table) == 6


def test_sql_table_is_capped_at_max_rows(log_dir, capsys):
    assert main(["sql", str(log_dir), "SELECT * FROM range(100)", "--max-rows", "7"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 8 and "first 7 rows" in captured.err


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["runs", "{missing}"], 2, "no such directory"),
        (["sql", "{missing}", "SELECT 1"], 2, "no such directory"),
        (["runs", "{empty}"], 2, "no runs in"),
        (["sql", "{empty}", "SELECT 1"], 2, "no runs in"),
        (["sql", "{log}", "SELEC 1"], 1, "syntax error"),
        (["sql", "{log}", "SELECT nope FROM tokens"], 1, "nope"),
        (["sql", "{log}", "DROP VIEW tokens"], 1, "refused"),
        (["sql", "{log}", "SELECT * FROM read_csv('/etc/passwd')"], 1, "disabled by configuration"),
    ],
)
def test_errors_are_one_line_with_nonzero_exit(log_dir, tmp_path, capsys, argv, code, message):
    (tmp_path / "empty").mkdir()
    subs = {"{missing}": str(tmp_path / "missing"), "{empty}": str(tmp_path / "empty"), "{log}": str(log_dir)}
    assert main([subs.get(a, a) for a in argv]) == code
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_installed_command_reports_a_bad_query_without_traceback(log_dir):
    proc = subprocess.run(
        [str(FORKWATCH), "sql", str(log_dir), "SELECT * FROM tokens; SELECT 1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == "forkwatch: error: refused: one statement at a time (2 given)"


def test_store_cli_never_imports_torch(log_dir):
    code = (
        "import sys; from forkwatch.cli import main; "
        f"main(['runs', {str(log_dir)!r}]); main(['sql', {str(log_dir)!r}, 'SELECT 1']); "
        "sys.exit(1 if any(m.split('.')[0] in ('torch', 'transformers', 'trl') for m in sys.modules) else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
