"""Live health alarms in a real run: a randomly initialised model sits at maximum entropy (≈ log V), which the
explosion rule flags once enough steps are seen. `on_alarm="log"` warns and keeps training; "stop" ends the run."""

from __future__ import annotations

import json
import logging

import forkwatch

FAST_RULES = {"min_steps": 2, "sustain_steps": 2, "early_steps": 1}


def _run(make_trainer, tmp_path, on_alarm: str):
    trainer = make_trainer(max_steps=8)
    forkwatch.attach(trainer, log_dir=str(tmp_path / "runs"), run_name="r", health_rules=FAST_RULES,
                     on_alarm=on_alarm)
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
