"""Serving the Streamlit app on one log directory (what `forkwatch dashboard LOG_DIR` runs).

Streamlit runs in a child process (`python -m streamlit run app.py`) so that its signal handling and event loop stay
its own; Ctrl-C stops the child and returns 0. The log directory reaches the app one way only: the environment
variable `LOG_DIR_ENV`, set here for the child. The app binds 127.0.0.1 unless told otherwise: its SQL page runs
text a person typed (sandboxed, but still nothing to expose by accident). This module prints nothing; the CLI says
what is served where.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from forkwatch.store.location import LOG_DIR_ENV

logger = logging.getLogger(__name__)

APP = Path(__file__).with_name("app.py")
# Where the app listens unless told otherwise: this machine only (the SQL page runs text a person typed).
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8501


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


def environment(log_dir: str | Path) -> dict[str, str]:
    """The child's environment: this process's, with the log directory the app reads."""
    from forkwatch.store.location import resolve

    return os.environ | {LOG_DIR_ENV: resolve(log_dir).url}  # an absolute folder, or s3://bucket/prefix


def serve(log_dir: str | Path, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> int:
    """Run the app on `log_dir` (an existing folder) until it exits or Ctrl-C / SIGTERM stops it (then 0)."""
    proc = subprocess.Popen(command(host=host, port=port), env=environment(log_dir))
    # SIGTERM (a service manager, a test's terminate()) takes the Ctrl-C path, so Streamlit is never left orphaned.
    # SIGINT is set explicitly too: a process started in the background by a non-interactive shell inherits SIGINT
    # ignored, and Ctrl-C (or a test's SIGINT) would then do nothing.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    previous_int = signal.signal(signal.SIGINT, _interrupt)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # The terminal sent SIGINT to the whole process group; give Streamlit a moment to shut down on its own.
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            logger.warning("streamlit did not stop within 10 s; terminating it")
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()  # bounded: a stop request never hangs the command
                proc.wait()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
