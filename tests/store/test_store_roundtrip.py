"""Round trip of every table through RunWriter -> Parquet parts -> DuckDB views, and the named queries."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from forkwatch.store import TABLES, VIEWS, RunWriter, connect, queries, stat_relative_tolerance
from forkwatch.store.writer import round_mantissa
from synthetic_records import step_batches, vocab_columns


def _write_run(log_dir, run_id="r1", steps=3, **kw):
    batches = list(step_batches(steps=steps, completions_per_step=4, group_size=2, min_len=5, max_len=30, seed=1))
    w = RunWriter(log_dir, run_id, meta={"model": "tiny", "trl_version": "1.16.0", "config": {"lr": 1e-6}}, **kw)
    w.put("vocab", vocab_columns(200))
    for b in batches:
        for table, cols in b.items():
            assert w.put(table, cols)
    w.close()
    return batches


def test_every_table_round_trips(tmp_path):
    batches = _write_run(tmp_path)
    con = connect(tmp_path)
    tol = stat_relative_tolerance()
    tok = con.sql("SELECT * FROM tokens ORDER BY step, completion_id, position").to_arrow_table()
    exp = {
        k: np.concatenate([np.broadcast_to(b["tokens"][k], len(b["tokens"]["entropy"])) for b in batches])
        for k in TABLES["tokens"].names
        if k != "run_id"
    }
    assert tok.num_rows == len(exp["entropy"])
    for k in ("step", "completion_id", "position", "token_id", "is_fork", "selected"):
        np.testing.assert_array_equal(tok[k].to_numpy(), exp[k], err_msg=k)
    for k in ("logprob", "entropy", "renyi2", "group_js", "covariance"):
        np.testing.assert_allclose(tok[k].to_numpy(), exp[k], rtol=tol, atol=0, err_msg=k)
    assert set(tok["run_id"].to_pylist()) == {"r1"}

    comp = con.execute("SELECT * FROM completions ORDER BY completion_id").df()
    assert comp["completion_id"].tolist() == [c for b in batches for c in b["completions"]["completion_id"]]
    assert comp["prompt"].tolist() == [p for b in batches for p in b["completions"]["prompt"]]
    assert dict(comp["rewards"][0]) == {"accuracy": batches[0]["completions"]["rewards"][0]["accuracy"], "format": 1.0}

    forks = con.execute("SELECT * FROM forks ORDER BY step, completion_id, position").df()
    assert len(forks) == sum(len(b["forks"]["position"]) for b in batches)
    first = batches[0]["forks"]
    np.testing.assert_array_equal(forks["alt_token_ids"][0], first["alt_token_ids"][0])
    np.testing.assert_allclose(forks["alt_probs"][0], first["alt_probs"][0], rtol=1e-7)

    steps = con.execute("SELECT step, n_tokens, entropy_mean, select_method, time FROM steps ORDER BY step").df()
    assert steps["step"].tolist() == [0, 1, 2]
    assert steps["n_tokens"].tolist() == [b["steps"]["n_tokens"][0] for b in batches]
    assert steps["select_method"].tolist() == ["none"] * 3

    vocab = con.execute("SELECT token_id, text FROM vocab ORDER BY token_id").df()
    assert vocab["text"].tolist()[:3] == ["<0>", "<1>", "<2>"]
    text = con.execute("SELECT token_id, text FROM token_text WHERE token_id < 200 LIMIT 5").df()
    assert (text["text"] == "<" + text["token_id"].astype(str) + ">").all()

    runs = con.execute(
        "SELECT run_id, name, status, model, trl_version, schema_version, last_step, dropped, meta FROM runs"
    ).df()
    assert runs.loc[0, ["run_id", "status", "model", "last_step", "dropped"]].tolist() == [
        "r1",
        "finished",
        "tiny",
        2,
        0,
    ]
    assert json.loads(runs.loc[0, "meta"])["config"] == {"lr": 1e-6}


def test_views_exist_and_are_empty_before_any_part(tmp_path):
    RunWriter(tmp_path, "fresh").close()
    con = connect(tmp_path)
    for view in VIEWS:
        assert con.execute(f"SELECT count(*) FROM {view}").fetchone()[0] == (1 if view == "runs" else 0), view
    cols = {r[0]: r[1] for r in con.execute("DESCRIBE tokens").fetchall()}
    assert cols["entropy"] == "FLOAT" and cols["step"] == "INTEGER" and cols["completion_id"] == "BIGINT"


def test_named_queries_return_what_was_written(tmp_path):
    batches = _write_run(tmp_path)
    con = connect(tmp_path)
    runs = queries.run_overview(con)
    assert runs[["run_id", "n_steps", "recorded_tokens", "status"]].values.tolist() == [
        ["r1", 3, sum(len(b["tokens"]["entropy"]) for b in batches), "finished"]
    ]
    assert queries.step_series(con, "r1")["step"].tolist() == [0, 1, 2]
    cid = int(batches[1]["completions"]["completion_id"][2])
    toks = queries.completion_tokens(con, "r1", 1, cid)
    assert toks["position"].tolist() == list(range(batches[1]["completions"]["length"][2]))
    assert toks["text"].notna().all() or (toks["token_id"] >= 200).any()
    per_step = con.sql("SELECT count(*) FROM tokens WHERE run_id = 'r1' GROUP BY step ORDER BY step").fetchall()
    assert [n for (n,) in per_step] == [b["steps"]["n_tokens"][0] for b in batches]


def test_mantissa_rounding_stays_within_documented_tolerance():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.exp(rng.normal(-5, 3, 100_000)), -rng.random(1000), [0.0, np.inf, -np.inf]]).astype(
        np.float32
    )
    for bits in (7, 10, 16):
        r = round_mantissa(x, bits)
        finite = np.isfinite(x)
        assert np.all(np.abs(r[finite] - x[finite]) <= np.abs(x[finite]) * stat_relative_tolerance(bits))
        assert np.array_equal(r[~finite], x[~finite])
        assert np.all((r.view(np.uint32) & np.uint32((1 << (23 - bits)) - 1)) == 0)  # low bits really zero
    assert np.isnan(round_mantissa(np.array([np.nan], np.float32), 10)[0])


def test_exact_float32_when_rounding_is_off(tmp_path):
    w = RunWriter(tmp_path, "exact", stat_mantissa_bits=None)
    vals = np.array([0.1234567, 1e-7 / 3], np.float32)
    w.put(
        "tokens",
        {
            "step": 0,
            "completion_id": np.zeros(2, np.int64),
            "position": np.arange(2, dtype=np.int32),
            "token_id": np.zeros(2, np.int32),
            "entropy": vals,
        },
    )
    w.close()
    got = connect(tmp_path).sql("SELECT entropy FROM tokens ORDER BY position").to_arrow_table()
    assert got["entropy"].to_numpy().tolist() == vals.tolist()


def test_put_accepts_arrow_arrays_and_rounds_them(tmp_path):
    w = RunWriter(tmp_path, "arrow")
    ent = pa.array([0.123456789, None], pa.float32())
    w.put(
        "tokens",
        {
            "step": pa.array([0, 0], pa.int32()),
            "completion_id": pa.array([0, 0], pa.int64()),
            "position": pa.array([0, 1], pa.int32()),
            "token_id": pa.array([1, 2], pa.int32()),
            "entropy": ent,
        },
    )
    w.close()
    got = connect(tmp_path).execute("SELECT entropy FROM tokens ORDER BY position").fetchall()
    assert got[1][0] is None
    assert got[0][0] == pytest.approx(0.123456789, rel=stat_relative_tolerance())
    assert got[0][0] != np.float32(0.123456789)  # really rounded
