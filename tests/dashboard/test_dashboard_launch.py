"""`forkwatch dashboard`: the streamlit command it runs (local-only by default) and its refusal of a missing dir.
Serving and Ctrl-C are exercised for real in test_dashboard_browser.py."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from forkwatch.dashboard import launch

from forkwatch.cli import main


def test_command_binds_localhost_by_default():
    cmd = launch.command()
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"]
    assert cmd[4].endswith("app.py")
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.port") + 1] == "8501"
    assert cmd[cmd.index("--server.headless") + 1] == "true"


def test_the_log_dir_reaches_the_app_only_in_its_environment(tmp_path):
    assert launch.environment(tmp_path)[launch.LOG_DIR_ENV] == str(tmp_path.resolve())
    assert str(tmp_path) not in " ".join(launch.command())


def test_command_takes_host_and_port():
    cmd = launch.command(host="0.0.0.0", port=9000)
    assert cmd[cmd.index("--server.address") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--server.port") + 1] == "9000"


def test_missing_log_dir_exits_2_without_starting_streamlit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: (_ for _ in ()).throw(AssertionError("started")))
    assert main(["dashboard", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _serving(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.mark.timeout(120)
def test_sigterm_stops_streamlit_too(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "forkwatch.cli", "dashboard", str(tmp_path), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not _serving(url):
            assert proc.poll() is None and time.monotonic() < deadline, "the dashboard did not come up"
            time.sleep(0.5)
        proc.terminate()  # SIGTERM to forkwatch only, as a service manager sends it
        assert proc.wait(timeout=30) == 0
        assert not _serving(url)  # the Streamlit child went with it
    finally:
        if proc.poll() is None:
            proc.kill()
