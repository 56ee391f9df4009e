"""The store's optional `truth` view (store/ground_truth.py) that the demo's ground truth is read through: empty with its
columns when no run has annotations, the annotated rows when one has, a broken part skipped, and the sandboxed SQL
connection allowed to read it."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from forkwatch.store import connect, open_sandboxed
from forkwatch.store.ground_truth import TRUTH, TRUTH_DIR, truth_marks
from synthetic import write_run


def _annotate(log_dir, run: str, rows: list[tuple[int, int, int, bool, bool]]) -> None:
    folder = log_dir / run / TRUTH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    cols = list(zip(*rows, strict=True))
    table = pa.table(
        {"run_id": [run] * len(rows), "step": cols[0], "completion_id": cols[1], "position": cols[2],
         "is_decision": cols[3], "on_path": cols[4],
         "role": ["decision" if d else "forced" if p else "off_path" for d, p in zip(cols[3], cols[4], strict=True)]},
        schema=TRUTH,
    )  # fmt: skip
    pq.write_table(table, folder / "part-0.parquet")


def test_truth_view_is_empty_with_its_columns_when_no_run_is_annotated(tmp_path):
    write_run(tmp_path, "plain", "healthy", n_steps=3, token_steps=1)
    con = connect(tmp_path)
    assert con.execute("SELECT count(*) FROM truth").fetchone()[0] == 0
    assert [r[0] for r in con.execute("DESCRIBE truth").fetchall()] == TRUTH.names
    assert truth_marks(con, "plain", 1, 0).empty


def test_truth_marks_return_one_completions_annotation_in_position_order(tmp_path):
    write_run(tmp_path, "demo", "healthy", n_steps=3, token_steps=1)
    _annotate(tmp_path, "demo", [(1, 7, 2, False, True), (1, 7, 0, True, True), (1, 7, 1, False, True),
                                 (1, 8, 0, True, False)])
    marks = truth_marks(connect(tmp_path), "demo", 1, 7)
    assert marks["position"].tolist() == [0, 1, 2]
    assert marks["is_decision"].tolist() == [True, False, False]


def test_a_broken_truth_part_is_skipped_and_the_others_still_read(tmp_path, caplog):
    write_run(tmp_path, "a", "healthy", n_steps=3, token_steps=1)
    write_run(tmp_path, "b", "healthy", n_steps=3, token_steps=1)
    _annotate(tmp_path, "a", [(1, 0, 0, True, True)])
    (tmp_path / "b" / TRUTH_DIR).mkdir()
    (tmp_path / "b" / TRUTH_DIR / "part-0.parquet").write_bytes(b"not parquet")
    con = connect(tmp_path)
    assert con.execute("SELECT run_id, count(*) FROM truth GROUP BY run_id").fetchall() == [("a", 1)]
    assert "skipping annotation part" in caplog.text


def test_the_sandboxed_sql_connection_may_read_the_truth_view(tmp_path):
    write_run(tmp_path, "demo", "healthy", n_steps=3, token_steps=1)
    _annotate(tmp_path, "demo", [(1, 0, 0, True, True), (1, 0, 1, False, True)])
    con = open_sandboxed(tmp_path)
    try:
        assert con.query("SELECT sum(is_decision::INT) AS n FROM truth")["n"].tolist() == [1]
    finally:
        con.close()
