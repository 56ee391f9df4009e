"""One owner per concept in the store: the demo's ground truth apart from the core (reached only through the views),
run.json parsed in one module, and the one list of runs counting what the tokens view reads; the detector table
measures precision at the run's own fork share, as its docstring says."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from forkwatch.store import connect, ground_truth, queries
from forkwatch.store.detector_metrics import FLAG_RATE, precision_at
from synthetic import write_run

ROOT = Path(__file__).resolve().parents[2]


def _calls_and_imports(path: Path) -> tuple[set[str], set[str]]:
    """(names called as functions or methods, modules imported, relative ones by their last part) in one file."""
    calls, imports = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            calls.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
        elif isinstance(node, ast.ImportFrom):
            imports.add((node.module or "").rsplit(".", 1)[-1])
            imports.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            imports.update(a.name.rsplit(".", 1)[-1] for a in node.names)
    return calls, imports


def test_the_core_store_reaches_the_ground_truth_only_through_the_views():
    # detector_metrics is a generic scorer (AUROC / AP of any score against any target, design-weighted or not): the
    # ground truth and fork value both use it; only the demo's ground truth itself is reached through the views
    users = {f.name for f in (ROOT / "store").glob("*.py") if "ground_truth" in _calls_and_imports(f)[1]}
    assert users - {"ground_truth.py"} == {"views.py"}, "the core store knows the ground truth at one place (the view)"
    assert not {"ground_truth", "roles", "fork_values"} & _calls_and_imports(ROOT / "store" / "detector_metrics.py")[1]


def test_one_implementation_of_auroc_and_average_precision():
    # store/detector_metrics.py owns them (design-weighted, the unweighted case as equal weights); others import it
    def names(f: Path) -> set[str]:
        return {n.name for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.FunctionDef)}

    defined = {f.name for f in (ROOT / "store").glob("*.py")
               if any("auroc" in n or "average_precision" in n for n in names(f))}
    assert defined == {"detector_metrics.py"}


@pytest.mark.parametrize("folder", ["store", "dashboard"])
def test_run_json_is_parsed_in_one_module(folder):
    readers = {f.name for f in (ROOT / folder).glob("*.py") if _calls_and_imports(f)[0] & {"read_json", "loads"}}
    # location.py is the filesystem's read_json itself; run_meta.py is the one caller and the one interpreter;
    # importer.py parses other programs' logs (trainer_state.json, JSONL metrics) and dashboard/launch.py the demo
    # launcher's own status file, never run.json (checked below)
    others = {"importer.py", "launch.py"}
    assert readers <= {"run_meta.py", "location.py", *others}, readers
    for name in others & readers:
        assert "RUN_JSON" not in (ROOT / folder / name).read_text(), name


def _annotate(log_dir: Path, run: str, n: int) -> None:
    """A ground truth for the first n positions of completion 0 at step 0: a decision at every even position."""
    folder = log_dir / run / ground_truth.TRUTH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    con = connect(log_dir)
    cid = con.execute("SELECT min(completion_id) FROM tokens WHERE run_id = ? AND step = 0", [run]).fetchone()[0]
    decision = [i % 2 == 0 for i in range(n)]
    pq.write_table(pa.table({"run_id": [run] * n, "step": [0] * n, "completion_id": [cid] * n,
                             "position": list(range(n)), "is_decision": decision, "on_path": [True] * n,
                             "role": ["decision" if d else "forced" for d in decision]}, schema=ground_truth.TRUTH),
                   folder / "part-0.parquet")


def _set_fork_fraction(log_dir: Path, run: str, fraction: float) -> None:
    path = log_dir / run / "run.json"
    meta = json.loads(path.read_text())
    meta["config"] = {**meta.get("config", {}), "fork_fraction": fraction}
    path.write_text(json.dumps(meta))


def test_detector_precision_is_measured_at_the_runs_own_fork_fraction(tmp_path):
    for run in ("own", "unsaid"):
        write_run(tmp_path, run, "healthy", n_steps=2, token_steps=1)
        _annotate(tmp_path, run, 12)
    _set_fork_fraction(tmp_path, "own", 0.5)
    con = connect(tmp_path)
    own, unsaid = ground_truth.detector_by_step(con, "own"), ground_truth.detector_by_step(con, "unsaid")
    assert set(own["rate"]) == {0.5} and set(unsaid["rate"]) == {FLAG_RATE}
    tokens = ground_truth.detector_tokens(con, "own")
    row = own[(own.target == "decision") & (own.predictor == "entropy")].iloc[0]
    expected = precision_at(tokens["entropy"].to_numpy(), tokens["role"].eq("decision").to_numpy(), 0.5)
    assert (row.precision, row.ceiling) == pytest.approx(expected)


def test_the_list_of_runs_counts_the_token_rows_the_tokens_view_reads(tmp_path, caplog):
    write_run(tmp_path, "a", "healthy", n_steps=4, token_steps=3)
    write_run(tmp_path, "b", "healthy", n_steps=4, token_steps=2)
    (tmp_path / "b" / "tokens" / "part-r000-s000009-000009-deadbeef-000099.parquet").write_bytes(b"not parquet")
    con = connect(tmp_path)
    runs = queries.run_overview(con).set_index("run_id")
    counted = dict(con.execute("SELECT run_id, count(*) FROM tokens GROUP BY run_id").fetchall())
    assert runs["recorded_tokens"].to_dict() == counted and np.all(runs["recorded_tokens"] > 0)
    assert "skipping unreadable part" in caplog.text
    assert runs["n_steps"].tolist() == [4, 4] and runs["last_step"].tolist() == [3, 3]
