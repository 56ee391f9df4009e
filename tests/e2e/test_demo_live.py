"""`forkwatch demo` with its dashboard: the dashboard answers before training starts, the runs land on disk while
they train (parts every few seconds) and the status file says what the demo is doing; Ctrl-C stops the training,
leaves what was written readable and takes the dashboard down. The app draws the launcher's status and re-reads the
log directory when it changes; the writer's flush interval comes from the environment where the demo sets it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from forkwatch.dashboard import launch
from forkwatch.store import connect
from synthetic import write_run

pytestmark = pytest.mark.timeout(900)  # the first demo test of a test run trains the shared warm-up (demo_cache)
APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serving(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _steps_on_disk(log_dir: Path) -> dict[str, int]:
    """Steps per run as the dashboard would read them now (only parts already written count)."""
    if not any(log_dir.glob("*/steps/*.parquet")):
        return {}
    con = connect(log_dir)
    try:
        return dict(con.sql("SELECT run_id, count(DISTINCT step) FROM steps GROUP BY run_id").fetchall())
    finally:
        con.close()


def test_demo_serves_first_shows_runs_growing_and_ctrl_c_stops_it_cleanly(tmp_path, demo_cache):
    out, port = tmp_path / "demo", _free_port()
    log = (tmp_path / "demo.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "forkwatch.cli", "demo", "--quick", "--out", str(out), "--cache", str(demo_cache),
         "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 400  # a generous bound, not a timing: the machine may be shared
        seen: list[dict[str, int]] = []  # the steps on disk each time they changed while the first run trained
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            steps = _steps_on_disk(out / "logs")
            if steps and (not seen or steps != seen[-1]):
                seen.append(steps)
                status = launch.read_status(out / "status.json")
            if len(seen) >= 3:
                break
            time.sleep(0.5)
        assert proc.poll() is None, log.seek(0) or log.read()
        # the dashboard answered before any run had a step on disk, and it answers now, while the runs train
        log.seek(0)
        said = log.read()
        assert re.search(r"dashboard answered at http://127\.0\.0\.1:\d+, \d+\.\d s after the command started", said)
        assert said.index("dashboard answered") < said.index("GRPO runs:")  # the runs' progress bar
        assert _serving(port)
        # the first run grew on disk in several parts while it trained, and the status file said so
        assert len(seen) >= 3, seen
        first = next(iter(seen[0]))
        assert seen[0][first] < seen[-1][first], seen
        assert status is not None and status["active"] and "GRPO run 1 of 6" in status["text"], status

        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    said = log.read()
    assert "interrupted; the runs written so far stay readable" in said
    assert not _serving(port)  # the Streamlit child went with it
    meta = json.loads((out / "logs" / first / "run.json").read_text())
    assert meta["status"] == "stopped"
    assert _steps_on_disk(out / "logs")[first] >= seen[-1][first]  # everything written before Ctrl-C is readable
    assert not launch.read_status(out / "status.json")["active"]


def test_app_draws_the_launchers_status_and_rereads_the_logs_when_it_changes(tmp_path, monkeypatch):
    pytest.importorskip("streamlit.testing.v1")
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    logs, status = tmp_path / "logs", tmp_path / "status.json"
    write_run(logs, "first", "healthy", n_steps=5, token_steps=1, status=None)
    monkeypatch.setenv(launch.LOG_DIR_ENV, str(logs))
    monkeypatch.setenv(launch.STATUS_ENV, str(status))
    launch.write_status(status, "demo: warm-up, step 5 of 20", progress=0.25)
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    bars = at.get("progress")
    assert len(bars) == 1 and "warm-up, step 5 of 20" in str(bars[0].proto)
    assert {r for r in at.dataframe[0].value["run"]} == {"first"}

    # a new run on disk and a new status: the next draw shows both at once, long before the snapshot's own refresh
    write_run(logs, "second", "healthy", n_steps=3, token_steps=1, status=None)
    launch.write_status(status, "demo: GRPO run 2 of 6", progress=0.5)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert {r for r in at.dataframe[0].value["run"]} == {"first", "second"}
    assert "GRPO run 2 of 6" in str(at.get("progress")[0].proto)

    launch.write_status(status, "demo: finished", active=False)  # done: the page is the plain dashboard again
    at.run()
    assert not at.get("progress") and not any("finished" in str(i.value) for i in at.info)
    st.cache_data.clear()
    st.cache_resource.clear()


def test_app_without_a_status_file_draws_no_status(tmp_path, monkeypatch):
    pytest.importorskip("streamlit.testing.v1")
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    write_run(tmp_path, "first", "healthy", n_steps=5, token_steps=1)
    monkeypatch.setenv(launch.LOG_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(launch.STATUS_ENV, raising=False)
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception and not at.get("progress")
    st.cache_data.clear()
    st.cache_resource.clear()


def test_writer_flush_interval_comes_from_the_environment_and_refuses_a_bad_value(tmp_path, monkeypatch):
    from forkwatch.store.writer import FLUSH_INTERVAL_ENV, RunWriter

    monkeypatch.delenv(FLUSH_INTERVAL_ENV, raising=False)
    with RunWriter(tmp_path, "default") as w:
        assert w.flush_interval_s == 30.0  # a user's default is unchanged
    monkeypatch.setenv(FLUSH_INTERVAL_ENV, "2")
    with RunWriter(tmp_path, "demo") as w:
        assert w.flush_interval_s == 2.0
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv(FLUSH_INTERVAL_ENV, bad)
        with pytest.raises(ValueError, match=FLUSH_INTERVAL_ENV):
            RunWriter(tmp_path, "bad")
