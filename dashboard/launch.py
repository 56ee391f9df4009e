"""Serving the Streamlit app on one log directory (what `forkwatch dashboard LOG_DIR` and `forkwatch demo` run).

Streamlit runs in a child process (`python -m streamlit run app.py`) so that its signal handling and event loop stay
its own; Ctrl-C stops the child and returns 0. The log directory reaches the app one way only: the environment
variable `LOG_DIR_ENV`, set here for the child. The app binds 127.0.0.1 unless told otherwise: its SQL page runs
text a person typed (sandboxed, but still nothing to expose by accident). This module prints nothing; the CLI says
what is served where.

A launcher that trains while the app serves (the demo) may also give the app a status file (`STATUS_ENV`): a small
JSON object it rewrites as it goes (`write_status`). While the file says the launcher is active, the app shows its
text and progress on every page and re-reads the log directory every few seconds, so the runs grow on screen as
they train. Without a status file the app behaves as it always has.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from forkwatch.store.location import LOG_DIR_ENV

logger = logging.getLogger(__name__)

APP = Path(__file__).with_name("app.py")
# Where the app listens unless told otherwise: this machine only (the SQL page runs text a person typed).
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8501
STATUS_ENV = "FORKWATCH_DASHBOARD_STATUS"  # the launcher's status file (JSON: text, progress, active)


def command(*, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> list[str]:
    """The `streamlit run` command line of the app (the log directory goes in the environment: `environment`)."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "viewer",  # no "Deploy" button: this app serves local logs
    ]  # fmt: skip


def environment(log_dir: str | Path, *, status_file: str | Path | None = None) -> dict[str, str]:
    """The child's environment: this process's, with the log directory the app reads (and the status file)."""
    from forkwatch.store.location import resolve

    env = os.environ | {LOG_DIR_ENV: resolve(log_dir).url}  # an absolute folder, or s3://bucket/prefix
    if status_file is not None:
        env[STATUS_ENV] = str(Path(status_file).resolve())
    return env


def start(
    log_dir: str | Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    status_file: str | Path | None = None,
    output: IO[Any] | None = None,
) -> subprocess.Popen:
    """Start the app on `log_dir` (an existing folder) in a child process and return at once. `output`: a file for
    Streamlit's own lines (None: this terminal). Stop it with `stop`."""
    return subprocess.Popen(command(host=host, port=port), env=environment(log_dir, status_file=status_file),
                            stdout=output, stderr=output)


def stop(proc: subprocess.Popen) -> None:
    """Stop the app's child: Ctrl-C, then SIGTERM, then SIGKILL, 10 s apart (at once on a further Ctrl-C); returns
    once it has exited."""
    if proc.poll() is not None:
        return
    # After a terminal's Ctrl-C Streamlit got SIGINT too and is shutting down; a second SIGINT is harmless.
    proc.send_signal(signal.SIGINT)
    for harder in (proc.terminate, proc.kill):
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            logger.warning("streamlit did not stop within 10 s; stopping it harder")
        except KeyboardInterrupt:  # another Ctrl-C while it shuts down: the person wants it gone now
            pass
        harder()
    proc.wait()  # bounded: SIGKILL cannot be refused


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Inside, SIGTERM and SIGINT raise KeyboardInterrupt, so that one `except KeyboardInterrupt` stops the child.

    SIGTERM (a service manager, a test's terminate()) takes the Ctrl-C path, so Streamlit is never left orphaned.
    SIGINT is set explicitly too: a process started in the background by a non-interactive shell inherits SIGINT
    ignored, and Ctrl-C (or a test's SIGINT) would then do nothing."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    previous_int = signal.signal(signal.SIGINT, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def wait_until_serving(proc: subprocess.Popen, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                       timeout: float = 60.0) -> bool:
    """Poll the app's health endpoint until it answers (True), the child exits or `timeout` passes (False)."""
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/_stcore/health"
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.2)
    return False


def serve(log_dir: str | Path, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> int:
    """Run the app on `log_dir` (an existing folder) until it exits or Ctrl-C / SIGTERM stops it (then 0)."""
    proc = start(log_dir, host=host, port=port)
    with interruptible():
        try:
            return proc.wait()
        except KeyboardInterrupt:
            stop(proc)
            return 0


def write_status(path: str | Path, text: str, *, progress: float | None = None, active: bool = True) -> None:
    """Replace the status file the app shows (`STATUS_ENV`): one line of text, a progress in [0, 1] or None, and
    whether the launcher is still at work (while it is, the app re-reads the log directory every few seconds).
    Written to a temp name, then renamed: the app never reads half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"text": text, "progress": progress, "active": active, "updated": time.time()}))
    os.replace(tmp, path)


def read_status(path: str | Path | None) -> dict[str, Any] | None:
    """The status file's object, or None when there is none (no file given, not written yet, or unreadable)."""
    if path is None:
        return None
    try:
        status = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) and isinstance(status.get("text"), str) else None


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
