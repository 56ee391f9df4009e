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
    assert "collapse.mean at step 39: COLLAPSE ALARM — mean entropy fell below" in out
    assert "signal: steps" in out and "threshold" in out
    assert "what to do: keep entropy up" in out and "(source: Clip-Cov/KL-Cov: arXiv:2505.22617" in out
    assert "evidence: reward falling" in out  # the explosion's evidence of harm
    assert "at the flag: reward_mean " in out and "(early " in out
    assert "not evaluated: explosion.non_finite (no loss or gradient norm logged" in out
    assert "law: R = -a·exp(H) + b with a = " in out  # the collapsing run follows the law
    assert "judged with the default rules: run.json records none" in out


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
    assert {"rule", "severity", "fired_at", "steps", "values", "threshold", "message", "evidence"} <= flag.keys()
    first_alarm = next(f for f in runs["collapse"]["flags"] if f["severity"] == "alarm")
    assert runs["collapse"]["severity"] == "alarm" and runs["collapse"]["rules_source"] == "default"
    assert (runs["collapse"]["rule"], runs["collapse"]["fired_at"]) == (first_alarm["rule"], first_alarm["fired_at"])
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


def _one_run(tmp_path, rules: dict | None):
    from synthetic import write_run

    write_run(tmp_path, "r", "healthy", n_steps=40, token_steps=1, health_rules=rules)
    return tmp_path


# The healthy series' noise (±10 %) crosses 1.01 × its early level: an alarm under these rules, nothing by default.
TOUCHY = {"explosion_factor": 1.01, "sustain_steps": 1, "alarm_needs_evidence": False}


def test_check_judges_a_run_with_the_rules_it_was_trained_under(tmp_path, capsys):
    log_dir = _one_run(tmp_path, TOUCHY)
    assert main(["check", str(log_dir)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("r: EXPLOSION (alarm: explosion.mean at step ")
    assert "judged with the rules the run was trained under (run.json: sustain_steps=1, explosion_factor=1.01" in out


def test_check_rules_re_judges_with_other_rules_and_says_so(tmp_path, capsys):
    log_dir = _one_run(tmp_path, TOUCHY)
    assert main(["check", str(log_dir), "--rules", "{}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("r: HEALTHY") and "re-judged with the rules given to --rules (the defaults)" in out
    path = tmp_path / "rules.json"
    path.write_text('{"explosion_factor": 1.01, "sustain_steps": 1, "alarm_needs_evidence": false}')
    _one_run(tmp_path / "plain", None)
    assert main(["check", str(tmp_path / "plain"), "--rules", str(path)]) == 1


def test_check_refuses_bad_rules_naming_the_field(tmp_path, capsys):
    log_dir = _one_run(tmp_path, None)
    assert main(["check", str(log_dir), "--rules", '{"colapse_fraction": 0.1}']) == 2
    err = capsys.readouterr().err
    assert "colapse_fraction" in err and "valid names" in err
    assert main(["check", str(log_dir), "--rules", "not json"]) == 2


def test_a_warning_is_printed_but_does_not_fail_check(tmp_path, capsys):
    log_dir = _one_run(tmp_path, {"explosion_factor": 1.01, "sustain_steps": 1})  # evidence still required
    assert main(["check", str(log_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("r: HEALTHY (warning: explosion.mean at step ") and "EXPLOSION WARNING" in out
    assert "no evidence of harm yet" in out


def test_runs_shows_the_same_verdict_as_check(tmp_path, capsys):
    log_dir = _one_run(tmp_path, TOUCHY)
    main(["check", str(log_dir)])
    label = capsys.readouterr().out.splitlines()[0].split(": ", 1)[1].split("  (")[0]
    assert main(["runs", str(log_dir)]) == 0
    assert label in capsys.readouterr().out


def test_check_help_describes_warnings_alarms_their_evidence_and_tuning(capsys):
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    out = capsys.readouterr().out
    assert "WARNING" in out and "ALARM" in out and "evidence of harm" in out and "--rules" in out
    assert "run.json" in out and "docs/methods.md" in out


def _verl_csv(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "corpus"))
    import shapes

    data = shapes.series("mechanism_collapse", 0)
    path = tmp_path / "verl_metrics.csv"
    lines = ["step,actor/entropy,critic/score/mean,response_length/mean"]
    lines += [f"{int(s)},{e:.8g},{r:.8g},{n:.8g}" for s, e, r, n in zip(data["step"], data["entropy_mean"],
                                                                  data["reward_mean"],
                                                                  data["completion_length_mean"], strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_check_judges_a_csv_forkwatch_did_not_record_with_the_same_report(tmp_path, capsys):
    path = _verl_csv(tmp_path)
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("verl_metrics: COLLAPSE (alarm: collapse.mean at step ")
    assert "(600 steps, status not recorded by forkwatch)" in out
    assert "what to do: keep entropy up" in out
    assert "not evaluated: collapse.tail (no entropy_p90 logged in the series)" in out
    assert "note: read csv " in out and "preset verl" in out and "entropy_mean<-actor/entropy" in out
    assert main(["check", str(path), "--json"]) == 1
    [payload] = json.loads(capsys.readouterr().out)
    assert payload["verdict"] == "collapse" and "collapse.tail" in payload["not_evaluated"]


def test_import_writes_the_run_and_check_reads_the_same_verdict_back(tmp_path, capsys):
    path = _verl_csv(tmp_path)
    main(["check", str(path)])
    direct = capsys.readouterr().out.splitlines()[0].split("  (")[0]
    log_dir = tmp_path / "runs"
    assert main(["import", str(path), str(log_dir), "--run", "verl"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"imported {path} (csv, preset verl, 600 steps) as run verl in {log_dir}")
    assert f"judge it: forkwatch check {log_dir} --run verl" in out
    assert main(["check", str(log_dir), "--run", "verl"]) == 1
    assert capsys.readouterr().out.startswith(direct.replace("verl_metrics", "verl"))
    assert main(["import", str(path), str(log_dir), "--run", "verl"]) == 2
    assert "exists already" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "expected"), [
    (["--columns", "entropy=H"], "--columns and --preset are for a run forkwatch did not record"),
    (["--preset", "verl"], "--columns and --preset are for a run forkwatch did not record"),
])
def test_source_options_on_a_log_dir_are_refused(log_dir, capsys, args, expected):
    assert main(["check", str(log_dir), *args]) == 2
    assert expected in capsys.readouterr().err


def test_a_broken_source_is_one_line_naming_the_file_and_the_fix(tmp_path, capsys):
    bad = tmp_path / "trainer_state.json"
    bad.write_text('{"log_history": [')
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and "is the file complete" in err
    assert main(["check", str(_verl_csv(tmp_path)), "--run", "x"]) == 2
    assert "drop --run" in capsys.readouterr().err
