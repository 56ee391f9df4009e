"""`forkwatch dashboard LOG_DIR [--host 127.0.0.1] [--port 8501]`: serve the Streamlit app on one log directory.

Streamlit runs in a child process (`python -m streamlit run app.py -- LOG_DIR`) so that its signal handling and
event loop stay its own; Ctrl-C stops the child and returns 0. The app binds 127.0.0.1 unless told otherwise: its
SQL page runs text a person typed (sandboxed, but still nothing to expose by accident).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

APP = Path(__file__).with_name("app.py")
LOG_DIR_ENV = "FORKWATCH_LOG_DIR"


def command(log_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8501) -> list[str]:
    """The `streamlit run` command line that serves `log_dir`."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "viewer",  # no "Deploy" button: this app serves local logs
        "--", str(Path(log_dir).resolve()),
    ]  # fmt: skip


def main(args) -> int:
    log_dir = Path(args.log_dir)
    if not log_dir.is_dir():
        sys.stderr.write(f"forkwatch dashboard: log directory {str(log_dir)!r} does not exist\n")
        return 2
    host, port = getattr(args, "host", "127.0.0.1"), getattr(args, "port", 8501)
    env = os.environ | {LOG_DIR_ENV: str(log_dir.resolve())}
    sys.stderr.write(f"forkwatch dashboard: serving {log_dir} on http://{host}:{port} (Ctrl-C stops)\n")
    proc = subprocess.Popen(command(log_dir, host=host, port=port), env=env)
    # SIGTERM (a service manager, a test's terminate()) takes the Ctrl-C path, so Streamlit is never left orphaned.
    previous = signal.signal(signal.SIGTERM, _interrupt)
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
            proc.wait()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
