"""How a run ends, as recorded in run.json: live health alarms in a real run (a randomly initialised model sits at
maximum entropy, ≈ log V, which the explosion rule flags once enough steps are seen; `on_alarm="log"` warns and
keeps training, "stop" ends the run), a person's Ctrl-C ("stopped") and a crash ("failed")."""

from __future__ import annotations

import json
import logging

import pytest

import forkwatch

FAST_RULES = {"min_steps": 2, "sustain_steps": 2, "early_steps": 1}


def _run(make_trainer, tmp_path, on_alarm: str, handoff_interval_s: float = 0.0):
    """handoff_interval_s=0: every step is handed over at its end, so an alarm acts at the next step."""
    trainer = make_trainer(max_steps=8)
    forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r", health_rules=FAST_RULES,
                     on_alarm=on_alarm, handoff_interval_s=handoff_interval_s)
    trainer.train()
    meta = json.loads((tmp_path / "runs" / "r" / "run.json").read_text())
    return trainer, meta


def test_alarm_is_logged_and_training_goes_on(make_trainer, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="forkwatch"):
        trainer, meta = _run(make_trainer, tmp_path, "log")
    assert trainer.state.global_step == 8
    assert any("forkwatch alarm" in r.message and "explosion" in r.message for r in caplog.records)
    alarms = [h["forkwatch/alarm/explosion"] for h in trainer.state.log_history if "forkwatch/alarm/explosion" in h]
    assert alarms[0] == 0.0 and alarms[-1] == 1.0  # quiet until the rule has enough steps, then raised
    assert "stopped_by_alarm" not in meta and meta["status"] == "finished"


def test_on_alarm_stop_ends_training_at_the_alarm(make_trainer, tmp_path):
    trainer, meta = _run(make_trainer, tmp_path, "stop")
    assert trainer.state.global_step < 8
    assert "explosion" in meta["stopped_by_alarm"] and meta["status"] == "stopped"


def test_a_run_stopped_by_its_own_rules_reads_the_same_rule_and_step_in_check(make_trainer, tmp_path, capsys):
    from forkwatch.cli import main

    # Custom rules: an alarm within a few steps (a random model's entropy sits near log V); the defaults would not
    # even give a verdict on so few steps.
    trainer, meta = _run(make_trainer, tmp_path, "stop")
    assert meta["status"] == "stopped" and trainer.state.global_step < 8
    rule, step = meta["stopped_by_alarm"].split(":")[0].split(" at step ")
    capsys.readouterr()  # TRL's own log lines
    assert main(["check", str(tmp_path / "runs")]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"r: EXPLOSION (alarm: {rule} at step {step})"), out
    assert "judged with the rules the run was trained under" in out
    assert main(["check", str(tmp_path / "runs"), "--rules", "{}"]) == 0  # its steps judged with the defaults
    assert capsys.readouterr().out.startswith("r: INSUFFICIENT_DATA")
    assert main(["runs", str(tmp_path / "runs")]) == 0
    assert f"EXPLOSION (alarm: {rule} at step {step})" in capsys.readouterr().out


def test_steps_batched_into_one_hand_off_are_all_written_and_their_alarm_still_warned(make_trainer, tmp_path,
                                                                                     caplog):
    from forkwatch.store import connect

    with caplog.at_level(logging.WARNING, logger="forkwatch"):
        trainer, meta = _run(make_trainer, tmp_path, "log", handoff_interval_s=3600.0)  # one hand-off, at the end
    con = connect(str(tmp_path / "runs"))
    assert con.sql("SELECT list(step ORDER BY step) FROM steps").fetchall()[0][0] == list(range(1, 9))
    assert con.sql("SELECT list(DISTINCT step ORDER BY step) FROM tokens").fetchall()[0][0] == list(range(1, 9))
    assert con.sql("SELECT count(DISTINCT step) FROM completions").fetchall()[0][0] == 8
    # the alarm came from the rules run at the end of training, over all 8 steps at once: warned, not logged
    assert any("forkwatch alarm" in r.message and "explosion" in r.message for r in caplog.records)
    assert meta["status"] == "finished"


def _raise_in_reward(exc: BaseException):
    calls = []

    def reward(completions, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second step's rewards: one step is already on disk
            raise exc
        return [float(len(c)) for c in completions]

    return reward


def _meta(tmp_path) -> dict:
    return json.loads((tmp_path / "runs" / "r" / "run.json").read_text())


def test_interrupted_run_is_marked_stopped_and_keeps_what_was_flushed(make_trainer, tmp_path):
    from forkwatch.store import connect

    trainer = make_trainer(max_steps=4, reward_funcs=_raise_in_reward(KeyboardInterrupt()))
    forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r")
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert _meta(tmp_path)["status"] == "stopped"
    assert connect(str(tmp_path / "runs")).sql("SELECT list(step) FROM steps").fetchall()[0][0] == [1]


def test_crashed_run_is_marked_failed(make_trainer, tmp_path):
    trainer = make_trainer(max_steps=4, reward_funcs=_raise_in_reward(RuntimeError("reward server down")))
    forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r")
    with pytest.raises(RuntimeError, match="reward server down"):
        trainer.train()
    assert _meta(tmp_path)["status"] == "failed"


def test_on_alarm_stop_ends_training_at_the_step_of_the_alarm_without_a_hand_off_due(make_trainer, tmp_path):
    import re

    from forkwatch.store import connect

    # handoff_interval_s far longer than the run: no hand-off is due by time, yet the alarm stops its own step
    trainer, meta = _run(make_trainer, tmp_path, "stop", handoff_interval_s=3600.0)
    fired = int(re.search(r"at step (\d+)", meta["stopped_by_alarm"]).group(1))
    assert "explosion" in meta["stopped_by_alarm"] and meta["status"] == "stopped"
    assert trainer.state.global_step == fired < 8
    steps = connect(str(tmp_path / "runs")).sql("SELECT list(step ORDER BY step) FROM steps").fetchall()[0][0]
    assert steps == list(range(1, fired + 1))  # every step up to the alarm written, none after
