"""Alerts (store/alerts.py) against a real HTTP server on 127.0.0.1: the body (Slack's `text` and the fields, with
the recommended action and the dashboard link), bounded retries, the writer thread's hook and its counts in
run.json, `forkwatch check --alert`, and URLs refused before anything runs."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from forkwatch.store import RunWriter
from forkwatch.store.alerts import AlertSink, check_url, payload, post, redact
from forkwatch.store.health import HealthRules, judge
from forkwatch.store.ledger import Ledger
from synthetic import step_series, write_sample_runs
from webhook_server import WebhookServer, dead_url

from forkwatch.cli import main


def _alarm():
    report = judge(step_series("explosion", 60))
    assert report.alarm
    return report.deciding


def test_the_body_is_slack_text_plus_every_field_with_the_action_and_the_link():
    flag = _alarm()
    body = payload(flag, run_id="r 1", run_name="my run", dashboard_url="http://127.0.0.1:8501/")
    assert body["text"].startswith(f"forkwatch alarm on run my run: {flag.rule} at step {flag.fired_at}: EXPLOSION")
    assert "what to do: " in body["text"] and body["text"].endswith(body["link"])
    assert body["link"] == f"http://127.0.0.1:8501/entropy?run=r%201&step={flag.fired_at}"
    assert (body["run_id"], body["step"], body["kind"], body["rule"], body["severity"]) == (
        "r 1", flag.fired_at, "explosion", flag.rule, "alarm")
    assert body["evidence"] == flag.evidence and body["action"] == {"text": flag.action, "source": flag.action_source}
    assert body["action"]["text"] and "arXiv" in body["action"]["source"]
    json.dumps(body, allow_nan=False)
    assert payload(flag, run_id="r")["link"] is None


def test_a_non_finite_flag_is_still_valid_json():
    data = {"step": np.arange(10), "entropy_mean": np.ones(10), "non_finite": np.r_[np.zeros(9), 1.0],
            "grad_norm": np.r_[np.ones(9), np.nan]}
    flag = judge(data).deciding
    assert flag.rule == "explosion.non_finite"
    json.dumps(payload(flag, run_id="r"), allow_nan=False)


def test_post_reaches_the_server_and_retries_a_500_a_bounded_number_of_times():
    with WebhookServer() as hook:
        assert post(hook.url, {"text": "hi"}) is None
        assert hook.bodies == [{"text": "hi"}]
        hook.status = 500
        error = post(hook.url, {"text": "again"}, tries=3, backoff=0.01)
        assert error == "HTTP 500 Internal Server Error" and hook.requests == 1 + 3
        hook.status = 404  # the endpoint refuses the body: no retry
        assert post(hook.url, {"text": "x"}, tries=3, backoff=0.01) == "HTTP 404 Not Found" and hook.requests == 5


def test_a_slow_or_dead_endpoint_costs_its_timeout_not_more():
    with WebhookServer(delay_s=2.0) as hook:
        t0 = time.monotonic()
        error = post(hook.url, {"text": "slow"}, timeout=0.3, tries=2, backoff=0.01)
        assert error is not None and "timed out" in error
        assert time.monotonic() - t0 < 1.5
    assert "refused" in post(dead_url(), {"text": "x"}, tries=2, backoff=0.01).lower()


def test_the_sink_counts_sends_and_failures_and_gives_a_dead_endpoint_one_try_after_the_first_failure():
    ledger = Ledger()
    flag = _alarm()
    with WebhookServer(status=500) as hook:
        sink = AlertSink(hook.url, run_id="r", ledger=ledger, tries=3, backoff=0.01)
        assert sink.send(flag) is False and hook.requests == 3
        assert sink.send(flag) is False and hook.requests == 4, "after a failure: one try each"
        hook.status = 200
        assert sink.send(flag) is True and hook.requests == 5
        assert sink.send(flag) is True and hook.requests == 6
    assert ledger.alerts == {"sent": 2, "failed": 2}


def test_the_writer_sends_alerts_from_its_thread_and_records_the_counts_in_run_json(tmp_path):
    flag = _alarm()
    with WebhookServer() as hook:
        writer = RunWriter(tmp_path, "r", meta={"name": "named"}, alert_webhook=hook.url,
                           dashboard_url="http://127.0.0.1:8501")
        writer.alert(flag)
        writer.close()
        [body] = hook.bodies
    assert body["run_name"] == "named" and body["rule"] == flag.rule and body["link"].endswith(f"step={flag.fired_at}")
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert meta["alerts"] == {"sent": 1, "failed": 0}
    other = RunWriter(tmp_path, "r1", rank=1, world_size=2, alert_webhook=dead_url())  # ranks > 0 never send
    other.alert(flag)
    other.close()
    assert "alerts" not in json.loads((tmp_path / "r1" / "rank-001.json").read_text())


def test_a_failed_alert_is_counted_in_run_json_and_shown_by_check_and_runs(tmp_path, capsys, caplog):
    write_sample_runs(tmp_path, n_steps=40, token_steps=1)
    writer = RunWriter(tmp_path, "collapse", alert_webhook=dead_url())  # the run resumed by another writer
    writer.alert(_alarm())
    writer.close()
    assert json.loads((tmp_path / "collapse" / "run.json").read_text())["alerts"] == {"sent": 0, "failed": 1}
    assert any("not sent to http://127.0.0.1:" in r.getMessage() for r in caplog.records)
    assert any("1 of 1 alert(s) could not be sent" in r.getMessage() for r in caplog.records)
    main(["check", str(tmp_path), "--run", "collapse"])
    assert "ALERTS NOT SENT: 1 of 1" in capsys.readouterr().out
    main(["runs", str(tmp_path)])
    assert "! collapse: 1 alert(s) could not be sent" in capsys.readouterr().out


def test_check_alert_sends_one_body_per_flag_of_a_finished_run(tmp_path, capsys):
    write_sample_runs(tmp_path, n_steps=40, token_steps=1)
    with WebhookServer() as hook:
        assert main(["check", str(tmp_path), "--run", "explosion", "--alert", hook.url,
                     "--dashboard-url", "http://127.0.0.1:8501"]) == 1
        err = capsys.readouterr().err
        n = len(hook.bodies)
        assert n >= 1 and f"{n} alert(s) sent to http://127.0.0.1:" in err
        assert {b["run_id"] for b in hook.bodies} == {"explosion"} and all(b["action"]["text"] for b in hook.bodies)
        assert any(b["severity"] == "alarm" for b in hook.bodies)
    assert main(["check", str(tmp_path), "--run", "explosion", "--alert", dead_url()]) == 1  # the verdict's code
    assert "alert(s) NOT sent" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["hooks.slack.com/x", "ftp://host/x", "http:///x", "http://host:port/x",
                                 "http://a b/x", ""])
def test_malformed_urls_are_refused_naming_the_option(bad, tmp_path, capsys):
    with pytest.raises(ValueError, match="alert_webhook=.*http"):
        check_url(bad, "alert_webhook")
    assert main(["check", str(tmp_path), "--alert", bad or "nope"]) == 2
    assert "--alert" in capsys.readouterr().err


def test_run_json_keeps_the_webhooks_host_only():
    assert redact("https://hooks.slack.com/services/T000/B000/SECRET") == "https://hooks.slack.com/…"
    assert redact("http://127.0.0.1:9000/x?token=1") == "http://127.0.0.1:9000/…"


def test_rules_with_a_reward_range_round_trip_through_json():
    rules = HealthRules.from_dict(json.loads(json.dumps({"reward_range": (0, 1)})))
    assert rules.reward_range == (0.0, 1.0)
    with pytest.raises(ValueError, match="reward_range"):
        HealthRules(reward_range=(1, 0))
