"""Alarms in real GRPOTrainer runs on a tiny model: alerts reach a real HTTP server on 127.0.0.1 with their
recommended action, and an endpoint that is down, slow or failing leaves training unharmed with the failure
counted; TRL's own loss, gradient norm, KL and clip ratios join the steps table and the evidence (a non-finite
gradient norm is an alarm at its step); a run's trainer_state.json, imported, is judged with TRL's own steps.

A randomly initialised model samples near log V, so the explosion rules fire within a few steps under FAST_RULES.
"""

from __future__ import annotations

import json
import logging

import pytest
from forkwatch.store import alerts, connect
from forkwatch.store.check import check_runs
from webhook_server import WebhookServer, dead_url

import forkwatch
from forkwatch.cli import main

FAST_RULES = {"min_steps": 2, "sustain_steps": 2, "early_steps": 1}


def _train(make_trainer, tmp_path, *, on_alarm="log", max_steps=4, **options):
    grpo = {k: options.pop(k) for k in list(options) if k in ("beta", "logging_steps", "learning_rate",
                                                              "num_iterations", "save_strategy", "save_steps")}
    trainer = make_trainer(max_steps=max_steps, **grpo)
    forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r", health_rules=FAST_RULES,
                     on_alarm=on_alarm, handoff_interval_s=0.0, **options)
    trainer.train()
    meta = json.loads((tmp_path / "runs" / "r" / "run.json").read_text())
    return trainer, meta


def test_alerts_from_a_real_run_reach_the_server_with_the_flags_check_finds(make_trainer, tmp_path):
    with WebhookServer() as hook:
        trainer, meta = _train(make_trainer, tmp_path, alert_webhook=hook.url, dashboard_url="http://127.0.0.1:8501")
        bodies = list(hook.bodies)
    assert trainer.state.global_step == 4
    [checked] = check_runs(tmp_path / "runs")
    flags = checked["report"].flags
    assert flags and any(f.is_alarm for f in flags)
    assert sorted((b["rule"], b["severity"], b["step"]) for b in bodies) == sorted(f.key for f in flags), \
        "one alert per flag, the same flags as check reads back"
    for b in bodies:
        assert b["run_id"] == "r" and b["action"]["text"] and b["action"]["source"] and b["evidence"]
        assert b["link"] == f"http://127.0.0.1:8501/entropy?run=r&step={b['step']}"
        assert b["text"].startswith(f"forkwatch {b['severity']} on run r: {b['rule']} at step {b['step']}")
    assert meta["alerts"] == {"sent": len(bodies), "failed": 0}
    assert meta["config"]["alert_webhook"] == "http://127.0.0.1:" + hook.url.split(":")[2].split("/")[0] + "/…"


@pytest.mark.parametrize("endpoint", ["down", "slow", "500"])
def test_an_endpoint_down_slow_or_failing_leaves_a_real_run_unharmed_and_the_failure_counted(
        make_trainer, tmp_path, monkeypatch, caplog, capsys, endpoint):
    monkeypatch.setattr(alerts, "TIMEOUT_S", 0.5)  # a slow endpoint costs the writer 0.5 s per try, not 3 s
    monkeypatch.setattr(alerts, "BACKOFF_S", 0.05)
    with WebhookServer(status=500 if endpoint == "500" else 200, delay_s=2.0 if endpoint == "slow" else 0) as hook:
        url = dead_url() if endpoint == "down" else hook.url
        with caplog.at_level(logging.WARNING, logger="forkwatch"):
            trainer, meta = _train(make_trainer, tmp_path, alert_webhook=url)
        assert hook.bodies == []
    assert trainer.state.global_step == 4 and meta["status"] == "finished"
    assert meta["alerts"]["failed"] >= 1 and meta["alerts"]["sent"] == 0
    assert meta["faults"] == {}, "a failed alert is not a recording fault"
    messages = [r.getMessage() for r in caplog.records]
    assert any("alert for explosion" in m and "not sent to http://127.0.0.1:" in m for m in messages)
    assert any("alert(s) could not be sent" in m for m in messages)
    capsys.readouterr()
    main(["check", str(tmp_path / "runs")])
    assert f"ALERTS NOT SENT: {meta['alerts']['failed']} of {meta['alerts']['failed']}" in capsys.readouterr().out


def test_a_malformed_webhook_is_refused_at_attach_also_from_the_environment(make_trainer, monkeypatch):
    with pytest.raises(ValueError, match="alert_webhook='hooks.example/x'"):
        forkwatch.attach(make_trainer(max_steps=1), alert_webhook="hooks.example/x")
    monkeypatch.setenv("FORKWATCH_ALERT_WEBHOOK", "not a url")
    with pytest.raises(ValueError, match="alert_webhook='not a url'"):
        forkwatch.attach(make_trainer(max_steps=1))


def test_a_non_finite_gradient_norm_stops_a_real_run_at_its_step_and_check_agrees(make_trainer, tmp_path, capsys):
    # num_iterations=2: step 2 trains again on step 1's completions, after an update of size 1e30 — its loss pass
    # overflows (the next generation would crash on NaN probabilities: the alarm stops the run before it)
    trainer, meta = _train(make_trainer, tmp_path, on_alarm="stop", max_steps=6, learning_rate=1e30,
                           num_iterations=2, save_strategy="steps", save_steps=1)
    assert trainer.state.global_step == 2
    assert meta["status"] == "stopped" and meta["stopped_by_alarm"].startswith("explosion.non_finite at step 2:")
    assert "what to do: stop and resume from the last checkpoint" in meta["stopped_by_alarm"]
    con = connect(str(tmp_path / "runs"))
    rows = con.sql("SELECT step, non_finite, isnan(grad_norm) FROM steps ORDER BY step").fetchall()
    con.close()
    assert rows == [(1, False, False), (2, True, True)], "each step once, completed by TRL's log"
    capsys.readouterr()
    assert main(["check", str(tmp_path / "runs")]) == 1
    assert capsys.readouterr().out.startswith("r: EXPLOSION (alarm: explosion.non_finite at step 2)")
    # the same run as TRL saved it: its checkpoint's trainer_state.json gives the same alarm
    assert main(["check", trainer.args.output_dir]) == 1
    out = capsys.readouterr().out
    assert "EXPLOSION (alarm: explosion.non_finite at step 2)" in out and "grad_norm nan" in out


def test_kl_and_clip_ratios_join_the_steps_table_and_the_evidence_at_a_flag(make_trainer, tmp_path, capsys):
    trainer, meta = _train(make_trainer, tmp_path, beta=0.04)
    con = connect(str(tmp_path / "runs"))
    rows = con.sql("SELECT step, kl, clip_ratio_region, loss, grad_norm, non_finite FROM steps ORDER BY step").fetchall()
    con.close()
    logged = {h["step"]: h for h in trainer.state.log_history if "kl" in h}
    assert [r[0] for r in rows] == [1, 2, 3, 4] == sorted(logged)
    for step, kl, clip, loss, grad, non_finite in rows:
        assert kl == pytest.approx(logged[step]["kl"], rel=1e-6) and clip == pytest.approx(
            logged[step]["clip_ratio/region_mean"], abs=1e-7)
        assert grad == pytest.approx(logged[step]["grad_norm"], rel=1e-6) and non_finite is False
        assert loss == pytest.approx(logged[step]["loss"], rel=1e-6, abs=1e-9)
    [checked] = check_runs(tmp_path / "runs")
    alarm = checked["report"].deciding
    assert alarm.is_alarm and "kl_at_flag" in alarm.supporting and "clip_ratio_region_at_flag" in alarm.supporting
    capsys.readouterr()
    main(["check", str(tmp_path / "runs")])
    assert ", kl " in capsys.readouterr().out


def test_a_run_logging_every_3_steps_is_judged_on_trls_own_steps_when_imported(make_trainer, tmp_path, capsys):
    trainer, meta = _train(make_trainer, tmp_path, max_steps=9, logging_steps=3, save_strategy="steps",
                           save_steps=9)
    con = connect(str(tmp_path / "runs"))
    own = con.sql("SELECT step, entropy_mean, loss FROM steps ORDER BY step").fetchall()
    con.close()
    assert [s for s, *_ in own] == list(range(1, 10))
    assert [s for s, _, loss in own if loss is not None] == [3, 6, 9], "TRL's scalars only where TRL logged"
    from forkwatch.store.importer import read_source

    run = read_source(trainer.args.output_dir)
    assert run.values["step"] == [3.0, 6.0, 9.0] and run.format == "trainer_state"
    for i, step in enumerate((3, 6, 9)):  # TRL's entropy: the mean of its 3 steps' token means
        window = [e for s, e, _ in own if step - 3 < s <= step]
        assert run.values["entropy_mean"][i] == pytest.approx(sum(window) / 3, rel=1e-4)
    capsys.readouterr()
    main(["check", trainer.args.output_dir, "--rules", json.dumps(FAST_RULES)])
    out = capsys.readouterr().out
    assert "(3 steps, status not recorded by forkwatch)" in out
    assert "not evaluated: collapse.tail (no entropy_p90 logged in the series)" in out
    assert "explosion.log_vocab (the vocabulary size is not known)" in out
